"""The spectral dense log-density of :mod:`pyro_ntk.gp.spectral` against the Cholesky route and
an independent dense float64 ``MultivariateNormal``: values and gradients in σ², s² (and the
residuals), scalar and batched hyperparameters, single- and multi-output networks."""

from __future__ import annotations

import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.gp import KernelSpectrum, NTKSystem, spectral_log_prob
from pyro_ntk.options import Solver, SolverOptions
from pyro_ntk.testing import reference_ntk

RTOL = 1e-10


def _case(n=12, outputs=2, hidden=6):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, outputs))
    X = torch.randn(n, 3)
    return net, X, reference_ntk(net, X)


def _reference(K, diff, variance, diag):
    """Dense float64 MVN, one factorization per hyperparameter value (no shared code)."""
    n = K.shape[-1]
    A = variance[..., None, None] * K + diag[..., None, None] * torch.eye(n)
    return torch.distributions.MultivariateNormal(torch.zeros(n), covariance_matrix=A).log_prob(
        diff
    )


def _grads(fn, *leaves):
    out = fn()
    return (out.detach(), *torch.autograd.grad(out.sum(), leaves))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * float(b.abs().max()))


@pytest.mark.parametrize("outputs", [1, 2])
def test_spectral_route_matches_cholesky_and_the_dense_reference(outputs):
    net, X, K = _case(outputs=outputs)
    n = K.shape[0]
    lin = Linearization(net)
    auto, chol = NTKSystem(lin, X), NTKSystem(lin, X, SolverOptions(solver=Solver.CHOLESKY))
    diff = torch.randn(n)
    v = torch.tensor(0.7, requires_grad=True)
    d = torch.tensor(0.05, requires_grad=True)
    first = _grads(lambda: auto.log_prob(diff, v, False, d), v, d)
    assert auto.last_route == "cholesky"  # a one-off evaluation pays no decomposition
    got = _grads(lambda: auto.log_prob(diff, v, False, d), v, d)
    assert auto.last_route == "spectral"  # the second one makes it
    for g, f in zip(got, first, strict=True):
        _close(g, f)
    via_chol = _grads(lambda: chol.log_prob(diff, v, False, d), v, d)
    assert chol.last_route == "cholesky"
    ref = _grads(lambda: _reference(K, diff, v, d), v, d)
    for g, c, r in zip(got, via_chol, ref, strict=True):
        _close(g, r)
        _close(c, r)


def test_batched_hyperparameters_and_samples_as_vectorised_particles():
    net, X, K = _case()
    n = K.shape[0]
    sysm = NTKSystem(Linearization(net), X)
    assert sysm.spectrum() is not None  # made up front: the first evaluation uses it
    # σ² of 4 particles, one s², 3 samples of the residual broadcast against them
    v = torch.tensor([0.3, 1.0, 2.5, 7.0]).requires_grad_(True)
    d = torch.tensor(0.02, requires_grad=True)
    diff = torch.randn(3, 1, n)
    got = _grads(lambda: sysm.log_prob(diff, v, False, d), v, d)
    assert sysm.last_route == "spectral" and got[0].shape == (3, 4)
    ref = _grads(lambda: _reference(K, diff, v, d), v, d)
    for g, r in zip(got, ref, strict=True):
        _close(g, r)
    # σ² and s² batched together, elementwise; the observed residual expanded to the batch
    d2 = torch.tensor([0.01, 0.1, 0.2, 1.0]).requires_grad_(True)
    y = torch.randn(n).expand(4, n)
    got = _grads(lambda: sysm.log_prob(y, v, False, d2), v, d2)
    ref = _grads(lambda: _reference(K, y, v, d2), v, d2)
    for g, r in zip(got, ref, strict=True):
        _close(g, r)


def test_residual_gradient_and_projection_cache():
    net, X, K = _case()
    n = K.shape[0]
    sysm = NTKSystem(Linearization(net), X)
    sysm.spectrum()
    v, d = torch.tensor(1.3), torch.tensor(0.1)
    diff = torch.randn(2, n, requires_grad=True)
    got = _grads(lambda: sysm.log_prob(diff, v, False, d), diff)
    ref = _grads(lambda: _reference(K, diff, v, d), diff)
    for g, r in zip(got, ref, strict=True):
        _close(g, r)
    spec = sysm.spectrum()
    assert spec._projections == []  # residuals that need a gradient are never cached
    y = torch.randn(n)
    first = sysm.log_prob(y, v, False, d)
    again = sysm.log_prob(y.clone(), 2 * v, False, d)  # equal values: the cached projection
    assert len(spec._projections) == 1
    _close(again, _reference(K, y, 2 * v, d))
    _close(first, _reference(K, y, v, d))
    sysm.log_prob(y + 1.0, v, False, d)  # new values: projected again
    assert len(spec._projections) == 2
    assert sysm.spectrum() is spec  # one eigendecomposition per data set


def test_rank_deficient_kernel_clamps_rounding_and_stays_exact():
    torch.manual_seed(1)
    J = torch.randn(40, 5)  # K = J Jᵀ has rank 5: 35 eigenvalues are rounding around 0
    K = J @ J.T
    spec = KernelSpectrum.of(K)
    assert spec is not None and float(spec.lam.min()) >= 0.0
    diff, v, d = torch.randn(40), torch.tensor(0.4), torch.tensor(1e-3)
    _close(spec.log_prob(diff, v, d), _reference(K, diff, v, d))
    # the formula alone, on its documented shapes
    proj_sq = (diff @ spec.Q).square()
    _close(spectral_log_prob(proj_sq, spec.lam, v, d), _reference(K, diff, v, d))
    # a singular A (d = 0 on a rank-deficient K) is left to the Cholesky route
    assert spec.log_prob(diff, v, torch.tensor(0.0)) is None


def test_not_psd_kernel_warns_and_keeps_the_cholesky_route():
    net, X, K = _case()
    n = K.shape[0]
    sysm = NTKSystem(Linearization(net), X)
    sysm._K = K - 0.05 * float(K.diagonal().mean()) * torch.eye(n)  # indefinite
    v, d = torch.tensor(1.0), torch.tensor(10.0)
    sysm.log_prob(torch.randn(n), v, False, d)  # the first: a factor, no decomposition
    with pytest.warns(NumericalWarning, match=r"not positive semi-definite: its smallest"):
        lp = sysm.log_prob(torch.randn(n), v, False, d)
    assert sysm.last_route == "cholesky" and bool(torch.isfinite(lp))
    sysm.log_prob(torch.randn(n), v, False, d)  # decided once: no second warning
    assert sysm.last_route == "cholesky"


def test_per_layer_variances_and_forced_cholesky_keep_the_factor():
    net, X, K = _case()
    lin = Linearization(net)
    n, G = K.shape[0], len(lin.groups)
    diff, d = torch.randn(n), torch.tensor(0.1)
    layered = NTKSystem(lin, X)
    for _ in range(2):
        layered.log_prob(diff, torch.full((G,), 0.5), True, d)
        assert layered.last_route == "cholesky"
    forced = NTKSystem(lin, X, SolverOptions(solver="cholesky"))
    for _ in range(2):
        forced.log_prob(diff, torch.tensor(0.5), False, d)
        assert forced.last_route == "cholesky" and forced._spectrum is False  # never made


def test_float32_rounding_warning_is_shown_once():
    """Rank 4 < n = 30 in float32 with d = 1e-8: σ²λ_min + d is below the eigenvalues'
    rounding; the warning comes once per spectrum, with its figures, and the values stay finite."""
    import warnings

    torch.manual_seed(2)
    J = torch.randn(30, 4, dtype=torch.float32)
    spec = KernelSpectrum.of(J @ J.T, where="here")
    v, d = torch.tensor(1.0), torch.tensor(1e-8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = [spec.log_prob(torch.randn(30).float(), v.float(), d.float()) for _ in range(3)]
    assert len(caught) == 1 and issubclass(caught[0].category, NumericalWarning)
    assert str(caught[0].message).startswith("here: the smallest eigenvalue σ²λ_min + d")
    assert all(bool(torch.isfinite(x)) for x in values)
    # float64, same kernel, same d: its rounding is 9 orders lower, no warning
    J64 = J.double()
    assert KernelSpectrum.of(J64 @ J64.T).log_prob(torch.randn(30), v, d) is not None
