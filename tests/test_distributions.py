"""LinearizedNetwork: sampling and density against dense references, the Pyro distribution
contract (shapes, expand, validation), and use as a site under SVI, Predictive, trace and
condition."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from networks import assert_unchanged, group_scale, snapshot
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from torch import nn

from pyro_ntk import Linearization, LinearizedNetwork
from pyro_ntk.options import SolverOptions
from pyro_ntk.testing import reference_ntk, reference_output


def mlp(d_in=2, width=6, d_out=2):
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, d_out))


def reference_log_prob(net, X, value, scale, diag, mean=None):
    N = X.shape[0]
    K = reference_ntk(net, X, scale=scale)
    cov = K + diag * torch.eye(K.shape[0])
    loc = reference_output(net, X) if mean is None else mean
    mvn = torch.distributions.MultivariateNormal(loc.reshape(-1), cov)
    return mvn.log_prob(value.reshape(value.shape[:-2] + (N * loc.shape[-1],)))


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("layer", [False, True], ids=["scalar", "per_layer"])
def test_rsample_mean_and_covariance(layer):
    net = mlp()
    X = torch.randn(4, 2)
    variance = torch.tensor([0.3, 1.7]) if layer else torch.tensor(0.8)
    scale = group_scale(net, variance) if layer else variance
    jitter = 1e-3
    d = LinearizedNetwork(net, X, variance=variance, jitter=jitter, layer_variances=layer)
    S = 20000
    torch.manual_seed(1)
    f = d.rsample((S,)).reshape(S, -1)
    loc = reference_output(net, X).reshape(-1)
    cov = reference_ntk(net, X, scale=scale) + jitter * torch.eye(8)
    sd = cov.diagonal().sqrt()
    # sample mean: each entry within 4.5 Monte Carlo standard errors
    assert ((f.mean(0) - loc).abs() <= 4.5 * sd / math.sqrt(S)).all()
    # sample covariance (known mean): Var[ĉ_ij] = (Σ_ii Σ_jj + Σ_ij²) / S
    c = (f - loc).T @ (f - loc) / S
    se = ((sd[:, None] * sd[None, :]) ** 2 + cov**2).sqrt() / math.sqrt(S)
    assert ((c - cov).abs() <= 4.5 * se).all()


def test_rsample_is_reparameterized():
    net = mlp()
    X = torch.randn(3, 2)
    v = torch.tensor(0.5, requires_grad=True)
    d = LinearizedNetwork(net, X, variance=v, jitter=0.0)
    torch.manual_seed(2)
    f = d.rsample((5,))
    (g,) = torch.autograd.grad(f.sum(), v)
    torch.manual_seed(2)
    f2 = LinearizedNetwork(net, X, variance=torch.tensor(2.0), jitter=0.0).rsample((5,))
    # f = m + sqrt(v) J z with the same z: d f / d v = (f - m) / (2 v)
    m = reference_output(net, X)
    torch.testing.assert_close((f2 - m), (f - m).detach() * 2.0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, ((f - m) / (2 * v)).sum().detach(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ density
@pytest.mark.parametrize("layer", [False, True], ids=["scalar", "per_layer"])
def test_log_prob_dense_equals_reference_with_gradients(layer):
    net = mlp()
    X = torch.randn(5, 2)
    v0 = torch.tensor([0.4, 1.3]) if layer else torch.tensor(0.7)
    v = v0.clone().requires_grad_()
    noise = torch.tensor(0.05, requires_grad=True)
    value = torch.randn(3, 5, 2)
    d = LinearizedNetwork(net, X, variance=v, noise=noise, jitter=1e-6, layer_variances=layer)
    assert d.system.method == "cholesky"
    lp = d.log_prob(value)
    vr = v0.clone().requires_grad_()
    nr = torch.tensor(0.05, requires_grad=True)
    scale = group_scale(net, vr) if layer else vr
    ref = reference_log_prob(net, X, value, scale, nr + 1e-6)
    torch.testing.assert_close(lp, ref, rtol=1e-10, atol=1e-10)
    g = torch.autograd.grad(lp.sum(), (v, noise))
    r = torch.autograd.grad(ref.sum(), (vr, nr))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_spectral_log_prob_of_particles_equals_reference_and_cholesky():
    """σ² and s² batched as SVI's vectorised particles give them: the spectral route, the
    Cholesky route (``solver="cholesky"``) and the dense reference, values and gradients."""
    net = mlp()
    X = torch.randn(5, 2)
    v0, n0 = torch.tensor([0.2, 0.7, 3.0]), torch.tensor([0.5, 0.05, 0.01])
    value = torch.randn(5, 2)
    results = []
    for options in (None, SolverOptions(solver="cholesky")):
        v, noise = v0.clone().requires_grad_(), n0.clone().requires_grad_()
        d = LinearizedNetwork(net, X, variance=v, noise=noise, jitter=1e-6, options=options)
        d.log_prob(value)  # the first evaluation of a system is a factor on either route
        lp = d.log_prob(value)
        assert d.batch_shape == (3,) and lp.shape == (3,)
        assert d.system.last_route == ("spectral" if options is None else "cholesky")
        results.append((lp, *torch.autograd.grad(lp.sum(), (v, noise))))
    vr, nr = v0.clone().requires_grad_(), n0.clone().requires_grad_()
    lps = [
        reference_log_prob(net, X, value, vr[i], nr[i] + 1e-6) for i in range(3)
    ]  # one dense MVN per particle
    ref = torch.stack(lps)
    want = (ref, *torch.autograd.grad(ref.sum(), (vr, nr)))
    for got in results:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_log_prob_cg_equals_cholesky():
    """Matrix-free CG + SLQ against the exact path. The rank-100 Fisher preconditioner is
    exact here (P = 32), so the value is tight; the σ²-gradient's log-det part is a
    Hutchinson estimate of tr(A⁻¹K), whose standard deviation is at most
    sqrt(2‖A⁻¹K‖_F² / T) for T Gaussian probes."""
    net = mlp()
    X = torch.randn(6, 2)
    value = torch.randn(2, 6, 2)
    v1 = torch.tensor(0.9, requires_grad=True)
    v2 = torch.tensor(0.9, requires_grad=True)
    kw = dict(noise=torch.tensor(0.1), jitter=1e-6)
    T = 2000
    exact = LinearizedNetwork(net, X, variance=v1, **kw, options=SolverOptions(solver="cholesky"))
    cg = LinearizedNetwork(
        net,
        X,
        variance=v2,
        **kw,
        options=SolverOptions(solver="cg", cg_tolerance=1e-10, num_trace_samples=T),
    )
    assert cg.system.method == "cg"
    a, b = exact.log_prob(value), cg.log_prob(value)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    (ga,) = torch.autograd.grad(a.sum(), v1)
    (gb,) = torch.autograd.grad(b.sum(), v2)
    K = reference_ntk(net, X)
    AinvK = torch.linalg.solve(0.9 * K + (0.1 + 1e-6) * torch.eye(12), K)
    # loss = sum over 2 values: log-det part of the gradient is -tr(A⁻¹K)
    sd = math.sqrt(2 * float(AinvK.square().sum()) / T)
    assert abs(float(gb) - float(ga)) <= 4 * sd
    assert 4 * sd < 0.8 * abs(float(ga))  # the check is informative


def test_zero_and_tensor_mean():
    net = mlp()
    X = torch.randn(4, 2)
    value = torch.randn(4, 2)
    scale = torch.tensor(1.0)
    d0 = LinearizedNetwork(net, X, mean="zero")
    torch.testing.assert_close(
        d0.log_prob(value), reference_log_prob(net, X, value, scale, 1e-6, torch.zeros(4, 2))
    )
    m = torch.randn(4, 2)
    d1 = LinearizedNetwork(net, X, mean=m)
    torch.testing.assert_close(
        d1.log_prob(value), reference_log_prob(net, X, value, scale, 1e-6, m)
    )
    torch.testing.assert_close(d1.mean, m)


# ------------------------------------------------------------------ distribution contract
def test_shapes_batch_and_expand():
    net = mlp()
    X = torch.randn(3, 2)
    d = LinearizedNetwork(net, X, variance=0.5)
    assert d.batch_shape == () and d.event_shape == (3, 2)
    assert d.rsample().shape == (3, 2) and d.sample((4,)).shape == (4, 3, 2)
    assert d.variance.shape == (3, 2) and d.mean.shape == (3, 2)
    value = d.sample((4,))
    assert d.log_prob(value).shape == (4,)
    e = d.expand((5,))
    assert e.batch_shape == (5,) and e.rsample().shape == (5, 3, 2)
    assert e.log_prob(value[:, None]).shape == (4, 5)

    v = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1)
    b = LinearizedNetwork(net, X, variance=v)
    assert b.batch_shape == (3, 1)
    assert b.rsample((2,)).shape == (2, 3, 1, 3, 2)
    lp = b.log_prob(value[:, None, None])
    assert lp.shape == (4, 3, 1)
    for i in range(3):
        single = LinearizedNetwork(net, X, variance=v[i, 0])
        torch.testing.assert_close(lp[:, i, 0], single.log_prob(value))
    # the marginal variance is exact: σ² diag K + jitter
    torch.testing.assert_close(
        b.variance[1, 0].reshape(-1), reference_ntk(net, X).diagonal() + 1e-6, rtol=1e-10, atol=0
    )


def test_batched_cg_log_prob_matches_unbatched():
    net = mlp()
    X = torch.randn(4, 2)
    v = torch.tensor([0.5, 2.0])
    value = torch.randn(3, 1, 4, 2)
    b = LinearizedNetwork(
        net, X, variance=v, noise=0.1, layer_variances=False, options=SolverOptions(solver="cg")
    )
    lp = b.log_prob(value)
    assert lp.shape == (3, 2)
    for i in range(2):
        ref = LinearizedNetwork(
            net, X, variance=v[i], noise=0.1, options=SolverOptions(solver="cholesky")
        )
        torch.testing.assert_close(lp[:, i], ref.log_prob(value[:, 0]), rtol=1e-4, atol=1e-4)


def test_squeeze_output_and_prebuilt_linearization():
    net = mlp(d_out=1)
    X = torch.randn(4, 2)
    lin = Linearization(net)
    d = LinearizedNetwork(lin, X, squeeze_output=True)
    assert d.event_shape == (4,)
    f = d.sample((2,))
    assert f.shape == (2, 4)
    torch.testing.assert_close(
        d.log_prob(f), LinearizedNetwork(net, X).log_prob(f.unsqueeze(-1)), rtol=1e-12, atol=0
    )


def test_validate_args_rejects_wrong_shape():
    net = mlp()
    X = torch.randn(3, 2)
    d = LinearizedNetwork(net, X, validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.randn(4, 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variance=-1.0), r"variance must be positive and finite \(σ² > 0\), got -1\.0"),
        (
            dict(variance=torch.tensor([1.0, 0.0])),
            r"variance must be positive and finite \(σ² > 0\), got \[1\.0, 0\.0\]",
        ),
        (dict(noise=0.0), r"noise must be positive and finite, got 0\.0"),
        (dict(jitter=-1e-3), r"jitter must be a float >= 0"),
        (dict(mean="net"), r"mean must be one of"),
        (dict(mean=torch.zeros(3, 1)), r"mean has shape \(3, 1\); expected \(\.\.\., 3, 2\)"),
        (
            dict(variance=torch.ones(3), layer_variances=True),
            r"variance has shape \(3,\); expected \(\*batch, 2\), one per layer .*layer_variances=True",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    net = mlp()
    with pytest.raises(ValueError, match=match):
        LinearizedNetwork(net, torch.randn(3, 2), **kwargs)


def test_bad_solver_options():
    net = mlp()
    with pytest.raises(ValueError, match="SolverOptions: solver must be one of"):
        LinearizedNetwork(net, torch.randn(3, 2), options=SolverOptions(solver="lu"))
    with pytest.raises(ValueError, match="SolverOptions: preconditioner must be one of"):
        LinearizedNetwork(net, torch.randn(3, 2), options=SolverOptions(preconditioner="ilu"))
    with pytest.raises(TypeError, match="LinearizedNetwork: options must be"):
        LinearizedNetwork(net, torch.randn(3, 2), options="cg")


def test_bad_inputs():
    net = mlp()
    X = torch.randn(3, 2)
    X[1, 0] = float("nan")
    with pytest.raises(ValueError, match="LinearizedNetwork: X contains 1 NaN"):
        LinearizedNetwork(net, X)
    with pytest.raises(ValueError, match=r"LinearizedNetwork: X has shape \(3, 5\)"):
        LinearizedNetwork(net, torch.randn(3, 5))


# ------------------------------------------------------------------ Pyro
def test_trace_and_condition():
    net = mlp()
    X = torch.randn(3, 2)

    def model():
        return pyro.sample("f", LinearizedNetwork(net, X, variance=0.5))

    tr = poutine.trace(model).get_trace()
    site = tr.nodes["f"]
    assert site["value"].shape == (3, 2)
    tr.compute_log_prob()
    ref = reference_log_prob(net, X, site["value"], torch.tensor(0.5), 1e-6)
    torch.testing.assert_close(site["log_prob"], ref)
    value = torch.randn(3, 2)
    tr = poutine.trace(poutine.condition(model, data={"f": value})).get_trace()
    assert tr.nodes["f"]["is_observed"] and torch.equal(tr.nodes["f"]["value"], value)


def test_svi_fits_variance_and_leaves_network_unchanged():
    net = mlp(d_out=1, width=10)
    before = snapshot(net)
    X = torch.randn(15, 2)
    truth = LinearizedNetwork(net, X, variance=2.0, noise=0.01)
    torch.manual_seed(3)
    y = truth.sample()

    def model():
        v = pyro.param("v", torch.tensor(0.2), constraint=dist.constraints.positive)
        pyro.sample("y", LinearizedNetwork(net, X, variance=v, noise=0.01), obs=y)

    def guide():
        pass

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    losses = [svi.step() for _ in range(25)]
    assert losses[-1] < losses[0]
    assert float(pyro.param("v").detach()) > 0.4  # moved from 0.2 towards the truth (2.0)
    assert_unchanged(net, before)


def test_latent_site_under_svi_and_predictive():
    """f as a latent site (guide: its own LinearizedNetwork, reparameterized) and a
    vectorized Predictive whose variance carries a batch dimension."""
    net = mlp(d_out=1, width=5)
    X = torch.randn(4, 2)
    y = torch.randn(4, 1)

    def model():
        v = pyro.sample("v", dist.LogNormal(0.0, 0.5))
        f = pyro.sample("f", LinearizedNetwork(net, X, variance=v, jitter=1e-4))
        pyro.sample("y", dist.Normal(f, 0.5).to_event(2), obs=y)

    def guide():
        q = pyro.param("q", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("v", dist.Delta(q))
        pyro.sample("f", LinearizedNetwork(net, X, variance=q, mean="zero", jitter=1e-4))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step() for _ in range(5)]
    assert all(math.isfinite(x) for x in losses)

    pred = Predictive(model, num_samples=7, parallel=True, return_sites=["v", "f", "y"])()
    assert pred["f"].shape[0] == 7 and pred["f"].shape[-2:] == (4, 1)
    assert pred["v"].shape[0] == 7
    pred = Predictive(model, guide=guide, num_samples=3)()
    assert pred["f"].shape == (3, 4, 1)


# ------------------------------------------------------------------ solver="auto" and preconditioner
def test_auto_above_threshold_is_cg_with_fisher_preconditioner():
    """N·O = 12 > max_cholesky_size = 11: CG with the Fisher preconditioner; at 12 ≤ 12 dense."""
    from pyro_ntk.preconditioners import FisherPreconditioner

    net, X = mlp(), torch.randn(6, 2)  # O = 2
    d = LinearizedNetwork(
        net, X, variance=0.7, noise=0.1, options=SolverOptions(max_cholesky_size=11)
    )
    assert d.system.method == "cg"
    pre = d.system.preconditioner()
    assert isinstance(pre, FisherPreconditioner) and pre.kind == "fisher"
    d_dense = LinearizedNetwork(
        net, X, variance=0.7, noise=0.1, options=SolverOptions(max_cholesky_size=12)
    )
    assert d_dense.system.method == "cholesky"
    value = torch.randn(6, 2)
    torch.testing.assert_close(
        LinearizedNetwork(
            net,
            X,
            variance=0.7,
            noise=0.1,
            options=SolverOptions(max_cholesky_size=11, cg_tolerance=1e-11),
        ).log_prob(value),
        d_dense.log_prob(value),
        rtol=1e-6,
        atol=1e-6,
    )


def test_preconditioner_none_is_plain_cg_not_gpytorch_default():
    """None attaches an identity override, so linear_operator's pivoted Cholesky stays off
    even where its settings would switch it on; plain CG needs more iterations than Fisher."""
    import linear_operator

    from pyro_ntk.preconditioners import IdentityPreconditioner

    net, X = mlp(width=12), torch.randn(30, 2)
    kw = dict(solver="cg", cg_tolerance=1e-8, max_cg_iterations=500)
    plain = LinearizedNetwork(
        net, X, variance=1.0, noise=1e-3, options=SolverOptions(preconditioner=None, **kw)
    )
    assert isinstance(plain.system.preconditioner(), IdentityPreconditioner)
    op = plain.system.operator(torch.tensor(1.0), torch.tensor(1e-3))
    with (
        linear_operator.settings.min_preconditioning_size(0),
        linear_operator.settings.max_preconditioner_size(15),
    ):
        assert op._preconditioner() == (None, None, None)
    rhs = torch.randn(60, 1)
    x = plain.system.solve(rhs, torch.tensor(1.0), False, torch.tensor(1e-3))
    assert plain.system.last_solve.method == "cg"
    fisher = LinearizedNetwork(
        net, X, variance=1.0, noise=1e-3, options=SolverOptions(preconditioner="fisher", **kw)
    )
    x_f = fisher.system.solve(rhs, torch.tensor(1.0), False, torch.tensor(1e-3))
    assert fisher.system.last_solve.method == "pcg"
    assert fisher.system.last_solve.iterations < plain.system.last_solve.iterations
    K = reference_ntk(net, X) + 1e-3 * torch.eye(60)
    torch.testing.assert_close(x, torch.linalg.solve(K, rhs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_f, torch.linalg.solve(K, rhs), rtol=1e-5, atol=1e-5)


def test_choose_solver_rule():
    from pyro_ntk.options import DEFAULT_MAX_CHOLESKY_SIZE
    from pyro_ntk.solvers import available_memory, choose_solver

    n = DEFAULT_MAX_CHOLESKY_SIZE
    need64 = 2 * n * n * 8  # dense K + factor, float64
    # size rule
    assert choose_solver(n, torch.float64, memory_budget=2**62) == "cholesky"
    assert choose_solver(n + 1, torch.float64, memory_budget=2**62) == "cg"
    assert choose_solver(10, torch.float64, max_cholesky_size=9, memory_budget=2**62) == "cg"
    # memory rule: exactly at the boundary of fraction × budget
    assert choose_solver(n, torch.float64, memory_budget=2 * need64) == "cholesky"
    assert choose_solver(n, torch.float64, memory_budget=2 * need64 - 1) == "cg"
    assert choose_solver(n, torch.float64, memory_budget=need64, memory_fraction=1.0) == "cholesky"
    # float32 needs half the memory
    assert choose_solver(n, torch.float32, memory_budget=need64) == "cholesky"
    assert choose_solver(n, torch.float64, memory_budget=need64) == "cg"
    # budget read from the machine: a positive number of bytes here, and the rule uses it
    mem = available_memory("cpu")
    assert mem is None or mem > 0
    expected = "cholesky" if mem is None or 4 * 100**2 * 8 <= mem else "cg"
    assert choose_solver(100, torch.float64, "cpu") == expected
    for kwargs, match in [
        (dict(size=0, dtype=torch.float64), "size"),
        (dict(size=10, dtype=torch.int64), "dtype"),
        (dict(size=10, dtype=torch.float64, memory_budget=-1), "memory_budget"),
        (dict(size=10, dtype=torch.float64, memory_fraction=0.0), "memory_fraction"),
    ]:
        with pytest.raises((ValueError, TypeError), match=f"choose_solver: {match}"):
            choose_solver(**kwargs)
