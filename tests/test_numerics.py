"""Numerical faults: Cholesky with jitter (warn with figures, sound result, or raise)."""

from __future__ import annotations

import re

import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import nn

import pyro_ntk
from pyro_ntk.options import SolverOptions
from pyro_ntk.solvers import cholesky_with_jitter


def _singular_ntk():
    """K of a network with fewer parameters (P = 4) than outputs (N·O = 10): rank 4."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 1), nn.Tanh())
    X = torch.randn(10, 3)
    return net, X, pyro_ntk.Linearization(net).ntk_dense(X)


def test_singular_kernel_warns_with_figures_and_gives_a_sound_factor():
    _, _, K = _singular_ntk()
    assert int(torch.linalg.matrix_rank(K)) == 4
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(K)  # the plain factorization does fail
    with pytest.warns(NumericalWarning, match=r"jitter ([0-9.e+-]+) added .* after \d+ tries"):
        L = cholesky_with_jitter(K)
    scale = float(K.diagonal().mean())
    # L Lᵀ = K + ε I with a small ε: the factor describes K up to the documented cap
    eps = float((L @ L.T - K).diagonal().mean())
    assert 0 < eps <= 1e-2 * scale
    assert torch.allclose(L @ L.T, K + eps * torch.eye(10), rtol=0, atol=1e-9 * scale)
    assert torch.allclose(L.tril(), L)


def test_jitter_grows_tenfold_and_reports_it():
    _, _, K = _singular_ntk()
    scale = float(K.diagonal().abs().mean())
    with pytest.warns(NumericalWarning) as record:
        cholesky_with_jitter(K, jitter=1e-14 * scale)
    msg = str(record[0].message)
    used = float(re.search(r"jitter ([0-9.e+-]+) added", msg).group(1))
    tries = int(re.search(r"after (\d+) tries", msg).group(1))
    assert used == pytest.approx(1e-14 * scale * 10 ** (tries - 1), rel=1e-3)


def test_linearized_network_on_singular_kernel_warns_and_is_finite():
    net, X, K = _singular_ntk()
    d = pyro_ntk.LinearizedNetwork(
        net, X, variance=1.0, jitter=0.0, options=SolverOptions(solver="cholesky")
    )
    f = d.mean
    with pytest.warns(NumericalWarning, match="LinearizedNetwork: .*jitter"):
        lp = d.log_prob(f)
    assert torch.isfinite(lp)


def test_regression_on_singular_kernel_is_sound():
    net, X, K = _singular_ntk()
    y = torch.randn(10)
    gp = pyro_ntk.NTKGPRegression(X, y, net, noise=torch.tensor(1e-30), jitter=0.0)
    with pytest.warns(NumericalWarning, match="NTKGPRegression: .*jitter"):
        mean, var = gp(X[:3])
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()


@pytest.mark.parametrize(
    "A, pattern",
    [
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), r"2 NaN or Inf entries"),
        (torch.tensor([[1.0, 0.0], [0.0, float("inf")]]), r"1 NaN or Inf entries"),
        (
            -torch.eye(3),
            r"not positive definite even with jitter 0.01 .*cap max_jitter = 0.01, 9 tries",
        ),
        (torch.diag(torch.tensor([1.0, -1.0])), r"smallest diagonal entry -1"),
    ],
    ids=["nan", "inf", "negative_definite", "indefinite"],
)
def test_hopeless_matrix_raises_with_figures(A, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        cholesky_with_jitter(A)
    assert info.value.args[0].startswith("cholesky_with_jitter:")


def test_cap_and_tries_are_respected():
    A = torch.diag(torch.tensor([1.0, -1e-3]))  # needs jitter > 1e-3
    with pytest.raises(ValueError, match=r"cap max_jitter = 0\.0001, \d+ tries"):
        cholesky_with_jitter(A, max_jitter=1e-4)
    with pytest.raises(ValueError, match=r", 2 tries"):
        cholesky_with_jitter(A, max_tries=2)
    with pytest.warns(NumericalWarning):
        L = cholesky_with_jitter(A, max_jitter=1e-1)
    assert torch.allclose(L @ L.T - A, torch.eye(2) * float((L @ L.T - A)[0, 0]))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"jitter": -1.0}, "jitter"),
        ({"max_jitter": float("nan")}, "max_jitter"),
        ({"max_tries": 0}, "max_tries"),
    ],
)
def test_bad_jitter_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        cholesky_with_jitter(-torch.eye(2), **kwargs)


def test_spd_matrix_is_untouched():
    B = torch.randn(5, 5)
    A = B @ B.T + 5 * torch.eye(5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L = cholesky_with_jitter(A)
    assert torch.equal(L, torch.linalg.cholesky(A))


# ---------------------------------------------------------------------- memory guard
def _lin(d_out: int = 2):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, d_out))
    return pyro_ntk.Linearization(net), torch.randn(6, 3)


def test_ntk_dense_refuses_above_the_budget_and_allows_at_it():
    lin, X = _lin()
    need = (6 * 2) ** 2 * 8  # N·O · N·O · itemsize (float64)
    lin.max_dense_bytes = need
    assert lin.ntk_dense(X).shape == (12, 12)
    lin.max_dense_bytes = need - 1
    with pytest.raises(MemoryError, match=r"Linearization.ntk_dense: K of shape .* = \(12, 12\)"):
        lin.ntk_dense(X)
    with pytest.raises(ValueError, match=r"1152 bytes.*max_dense_bytes=1151.*ntk_mvm"):
        lin.ntk_dense(X)
    lin.max_dense_bytes = 12 * 4 * 8
    assert lin.ntk_dense(X, X[:2]).shape == (12, 4)
    lin.max_dense_bytes = 12 * 4 * 8 - 1
    with pytest.raises(MemoryError, match=r"\(12, 4\)"):
        lin.ntk_dense(X, X[:2])
    assert lin.ntk_mvm(X, None, torch.randn(12)).shape == (12,)  # matrix-free still works


def test_jacobian_refuses_above_the_budget():
    lin, X = _lin()
    need = 6 * 2 * lin.num_params * 8  # N·O·P·itemsize
    lin.max_dense_bytes = need
    assert lin.jacobian(X).shape == (6, 2, lin.num_params)
    lin.max_dense_bytes = need - 1
    with pytest.raises(MemoryError, match=rf"J of shape \(N, O, P\) = \(6, 2, {lin.num_params}\)"):
        lin.jacobian(X)


def test_kernels_and_models_inherit_the_guard():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    X = torch.randn(6, 3)
    kernel = pyro_ntk.EmpiricalNTK(net)
    kernel.linearization.max_dense_bytes = 100
    with pytest.raises(MemoryError, match="ntk_dense"):
        kernel(X)
    assert kernel(X, diag=True).shape == (6,)  # the exact diagonal is not dense
    lin = pyro_ntk.Linearization(net)
    lin.max_dense_bytes = 6 * 6 * 8  # one kernel fits, two per-layer kernels do not
    d = pyro_ntk.LinearizedNetwork(
        lin,
        X,
        variance=torch.ones(2),
        layer_variances=True,
        options=SolverOptions(solver="cholesky"),
    )
    with pytest.raises(MemoryError, match=r"LinearizedNetwork: 2 per-layer kernels"):
        d.log_prob(d.mean)


def test_default_budget_is_a_share_of_available_memory():
    from pyro_ntk._memory import (
        DEFAULT_MEMORY_FRACTION,
        available_memory_bytes,
        check_dense_memory,
        dense_memory_budget,
    )

    free = available_memory_bytes()
    assert free is not None and free > 0
    budget = dense_memory_budget(None)
    assert 0.5 * DEFAULT_MEMORY_FRACTION * free < budget < 2 * DEFAULT_MEMORY_FRACTION * free
    check_dense_memory("w", "small", 1024, None)  # fits
    with pytest.raises(MemoryError, match=r"w: huge needs .*max_dense_bytes=None: 50% of"):
        check_dense_memory("w", "huge", 1 << 62, None)
    lin, X = _lin()
    assert lin.max_dense_bytes is None
    lin.max_dense_bytes = float("inf")
    assert lin.ntk_dense(X).shape == (12, 12)
