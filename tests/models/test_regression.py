"""NTKGPRegression: posterior against the textbook dense GP formulas, the CG path against the
Cholesky path, agreement with GPRegression + EmpiricalNTK + NetworkMean, fitting by
gp.util.train and SVI, Predictive, diagnostics and bad input."""

import math

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import pytest
import torch
from networks import assert_unchanged, group_scale, snapshot
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.nn.module import PyroSample
from torch import nn

from pyro_ntk import LinearizedNetwork, NTKGPRegression
from pyro_ntk.options import SolverOptions
from pyro_ntk.testing import reference_ntk, reference_output


def mlp(d_in=2, width=8, d_out=1):
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, d_out))


def textbook(net, X, y, Xs, scale, noise, jitter):
    """μ* = m* + K*X A⁻¹ (y − m), Σ* = K** − K*X A⁻¹ KX*, A = KXX + (s² + ε) I (dense)."""
    Kxx = reference_ntk(net, X, scale=scale)
    Ksx = reference_ntk(net, Xs, X, scale=scale)
    Kss = reference_ntk(net, Xs, scale=scale)
    A = Kxx + (noise + jitter) * torch.eye(Kxx.shape[0])
    r = y.reshape(-1) - reference_output(net, X).reshape(-1)
    mean = reference_output(net, Xs).reshape(-1) + Ksx @ torch.linalg.solve(A, r)
    cov = Kss - Ksx @ torch.linalg.solve(A, Ksx.T)
    return mean, cov


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# ------------------------------------------------------------------ exact posterior
@pytest.mark.parametrize("d_out, layer", [(1, False), (2, False), (2, True)])
def test_posterior_equals_textbook(d_out, layer):
    net = mlp(d_out=d_out)
    X, Xs = torch.randn(12, 2), torch.randn(5, 2)
    y = torch.randn(12, d_out).squeeze(-1) if d_out == 1 else torch.randn(12, d_out)
    variance = torch.tensor([0.5, 2.0]) if layer else torch.tensor(0.7)
    noise = torch.tensor(0.05)
    model = NTKGPRegression(
        X,
        y,
        net,
        noise=noise,
        variance=variance,
        layer_variances=layer,
        options=SolverOptions(solver="cholesky"),
    )
    scale = group_scale(net, variance) if layer else variance
    mean_ref, cov_ref = textbook(net, X, y, Xs, scale, 0.05, 1e-6)
    mean, var = model(Xs)
    shape = (5,) if d_out == 1 else (5, d_out)
    assert mean.shape == shape and var.shape == shape
    assert rel(mean.reshape(-1), mean_ref) <= 1e-6
    assert rel(var.reshape(-1), cov_ref.diagonal()) <= 1e-6
    mean2, cov = model(Xs, full_cov=True)
    assert cov.shape == (5 * d_out, 5 * d_out)
    assert rel(cov, cov_ref) <= 1e-6
    torch.testing.assert_close(mean2, mean)
    _, var_y = model(Xs, noiseless=False)
    assert rel(var_y.reshape(-1), cov_ref.diagonal() + 0.05) <= 1e-6
    assert model.last_solve.method == "cholesky" and model.last_solve.relative_residual < 1e-10


def test_marginal_likelihood_site_equals_reference():
    net = mlp(d_out=2)
    X, y = torch.randn(7, 2), torch.randn(7, 2)
    model = NTKGPRegression(X, y, net, noise=torch.tensor(0.2), variance=torch.tensor(1.5))
    tr = pyro.poutine.trace(model.model).get_trace()
    tr.compute_log_prob()
    K = reference_ntk(net, X) * 1.5 + (0.2 + 1e-6) * torch.eye(14)
    ref = torch.distributions.MultivariateNormal(reference_output(net, X).reshape(-1), K)
    torch.testing.assert_close(tr.nodes["y"]["log_prob"], ref.log_prob(y.reshape(-1)))
    assert tr.nodes["y"]["value"].shape == (7, 2)


@pytest.mark.parametrize("preconditioner", ["auto", None])
def test_cg_path_equals_cholesky_path(preconditioner):
    """Mean: one CG solve (tolerance 1e-10). Variances: S pathwise posterior draws; the
    unbiased estimate (known mean) has relative standard deviation sqrt(2/S) per point.
    The rank-100 Fisher preconditioner is exact here (P = 42), plain CG is not."""
    net = mlp(d_out=2)
    X, y, Xs = torch.randn(20, 2), torch.randn(20, 2), torch.randn(6, 2)
    kw = dict(noise=torch.tensor(0.05), variance=torch.tensor(0.8))
    exact = NTKGPRegression(X, y, net, **kw, options=SolverOptions(solver="cholesky"))
    S = 2000
    cg = NTKGPRegression(
        X,
        y,
        net,
        num_posterior_samples=S,
        **kw,
        options=SolverOptions(
            solver="cg", preconditioner=preconditioner, cg_tolerance=1e-10, max_cg_iterations=2000
        ),
    )
    assert cg.solver == "cg"
    m0, v0 = exact(Xs)
    m1, v1 = cg(Xs)
    assert rel(m1, m0) <= 1e-7
    assert ((v1 - v0).abs() <= 4.5 * math.sqrt(2 / S) * v0).all()
    assert cg.last_solve.converged and cg.last_solve.num_rhs == S + 1
    assert cg.last_solve.method == ("cg" if preconditioner is None else "pcg")
    assert cg.last_solve.relative_residual <= 1e-10
    # full covariance from the same draws: entry-wise Monte Carlo bound
    _, c0 = exact(Xs, full_cov=True)
    _, c1 = cg(Xs, full_cov=True)
    sd = c0.diagonal().sqrt()
    se = ((sd[:, None] * sd[None, :]) ** 2 + c0**2).sqrt() / math.sqrt(S)
    assert ((c1 - c0).abs() <= 4.5 * se).all()
    # the same draws at a fixed seed: deterministic
    torch.testing.assert_close(cg(Xs)[1], v1)


def test_matches_gpregression_with_empirical_ntk_and_network_mean():
    from pyro_ntk import EmpiricalNTK, NetworkMean

    net = mlp()
    X, y, Xs = torch.randn(10, 2), torch.randn(10), torch.randn(4, 2)
    kernel = EmpiricalNTK(net, variance=torch.tensor(0.6))
    ref = gp.models.GPRegression(
        X, y, kernel, noise=torch.tensor(0.1), mean_function=NetworkMean(net), jitter=1e-6
    )
    ours = NTKGPRegression(X, y, net, noise=torch.tensor(0.1), variance=torch.tensor(0.6))
    for full_cov in (False, True):
        a_mean, a_cov = ref(Xs, full_cov=full_cov, noiseless=True)
        b_mean, b_cov = ours(Xs, full_cov=full_cov)
        assert rel(b_mean, a_mean) <= 1e-8
        assert rel(b_cov, a_cov) <= 1e-8
    loss_ref = pyro.infer.Trace_ELBO().differentiable_loss(ref.model, ref.guide)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(ours.model, ours.guide)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ fitting
def test_train_recovers_noise_and_leaves_network_unchanged():
    torch.manual_seed(4)
    net = mlp(width=12)
    before = snapshot(net)
    X = torch.randn(300, 2)
    true_noise = 0.04
    y = LinearizedNetwork(net, X, variance=0.5, noise=true_noise, squeeze_output=True).sample()
    model = NTKGPRegression(X, y, net, noise=torch.tensor(0.3), variance=torch.tensor(0.1))
    assert [n for n, _ in model.named_parameters()] == [
        "noise_unconstrained",
        "variance_unconstrained",
    ]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = gp.util.train(model, optimizer, num_steps=150)
    assert losses[-1] < losses[0]
    noise = float(model.noise.detach())
    assert abs(noise - true_noise) <= 0.2 * true_noise, noise
    assert_unchanged(net, before)


def test_svi_fits_layer_variances():
    net = mlp(d_out=2)
    X, y = torch.randn(15, 2), torch.randn(15, 2)
    model = NTKGPRegression(X, y, net, layer_variances=True, noise=torch.tensor(0.5))
    assert model.variance.shape == (2,)
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step() for _ in range(30)]
    assert losses[-1] < losses[0]
    v = model.variance.detach()
    assert v.shape == (2,) and (v > 0).all() and not torch.allclose(v, torch.ones(2))


def test_cg_model_trains():
    net = mlp()
    X, y = torch.randn(15, 2), torch.randn(15)
    model = NTKGPRegression(X, y, net, noise=torch.tensor(0.5), options=SolverOptions(solver="cg"))
    losses = gp.util.train(model, num_steps=3)
    precond = model._system.preconditioner()
    assert precond is not None
    losses += gp.util.train(model, num_steps=2)
    assert model._system.preconditioner() is precond  # built once, reused for every σ², s²
    assert all(math.isfinite(x) for x in losses)
    assert model.noise.detach() != 0.5


def test_predictive_and_prior():
    net = mlp()
    X, y = torch.randn(8, 2), torch.randn(8)
    model = NTKGPRegression(X, y, net, noise=torch.tensor(0.1))
    model.variance = PyroSample(dist.LogNormal(0.0, 1.0))
    gp.util.train(model, num_steps=3)
    model.set_data(X, None)
    samples = Predictive(model.model, guide=model.guide, num_samples=4)()
    assert samples["y"].shape == (4, 8)
    samples = Predictive(model.model, num_samples=5, parallel=True, return_sites=["y"])()
    assert samples["y"].shape[0] == 5 and samples["y"].shape[-1] == 8


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda X, y, net: (X, y[:7], net, {}), r"y has shape \(7, 2\) but X has N = 8 rows"),
        (
            lambda X, y, net: (X, torch.randn(8, 3), net, {}),
            r"y has shape \(8, 3\), but the network gives O = 2 output",
        ),
        (lambda X, y, net: (X, y.clone().fill_(float("nan")), net, {}), r"y contains 16 NaN"),
        (
            lambda X, y, net: (
                X.clone().index_fill_(0, torch.tensor([0]), float("inf")),
                y,
                net,
                {},
            ),
            r"X contains 2 NaN or infinite",
        ),
        (lambda X, y, net: (torch.randn(8, 3), y, net, {}), r"X has shape \(8, 3\)"),
        (
            lambda X, y, net: (X, y, net, dict(noise=-0.1)),
            r"noise must be positive and finite, got -0\.1",
        ),
        (
            lambda X, y, net: (X, y, net, dict(variance=0.0)),
            r"variance must be positive and finite \(σ² > 0\), got 0\.0",
        ),
        (
            lambda X, y, net: (X, y, net, dict(variance=torch.ones(3), layer_variances=True)),
            r"variance has shape \(3,\); expected \(2,\)",
        ),
    ],
)
def test_bad_input(make, match):
    net = mlp(d_out=2)
    X, y = torch.randn(8, 2), torch.randn(8, 2)
    X_, y_, net_, kw = make(X, y, net)
    with pytest.raises(ValueError, match="NTKGPRegression: " + match):
        NTKGPRegression(X_, y_, net_, **kw)


def test_bad_solver_options():
    net = mlp(d_out=2)
    X, y = torch.randn(8, 2), torch.randn(8, 2)
    with pytest.raises(ValueError, match="SolverOptions: solver must be one of"):
        NTKGPRegression(X, y, net, options=SolverOptions(solver="qr"))
    with pytest.raises(TypeError, match="NTKGPRegression: options must be"):
        NTKGPRegression(X, y, net, options=dict(solver="cg"))


def test_bad_test_inputs():
    net = mlp()
    model = NTKGPRegression(torch.randn(5, 2), torch.randn(5), net)
    with pytest.raises(ValueError, match=r"NTKGPRegression.forward: Xnew has shape \(3, 4\)"):
        model(torch.randn(3, 4))
    bad = torch.randn(3, 2)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NTKGPRegression.forward: Xnew contains 1 NaN"):
        model(bad)


def test_auto_solver_above_threshold_uses_fisher_cg():
    from pyro_ntk.preconditioners import FisherPreconditioner, IdentityPreconditioner

    net = mlp()
    X, y, Xs = torch.randn(12, 2), torch.randn(12), torch.randn(4, 2)
    kw = dict(noise=torch.tensor(0.05), variance=torch.tensor(0.8))
    big = NTKGPRegression(
        X, y, net, **kw, options=SolverOptions(max_cholesky_size=11, cg_tolerance=1e-11)
    )
    assert big.solver == "cg"
    assert isinstance(big._system.preconditioner(), FisherPreconditioner)
    small = NTKGPRegression(X, y, net, **kw, options=SolverOptions(max_cholesky_size=12))
    assert small.solver == "cholesky"
    rel_err = (big(Xs)[0] - small(Xs)[0]).norm() / small(Xs)[0].norm()
    assert rel_err <= 1e-7
    assert big.last_solve.method == "pcg"
    none = NTKGPRegression(X, y, net, **kw, options=SolverOptions(solver="cg", preconditioner=None))
    assert isinstance(none._system.preconditioner(), IdentityPreconditioner)


# ------------------------------------------------------------------ data-aware start
@pytest.mark.parametrize("d_out, layer", [(1, False), (2, False), (2, True)])
def test_initial_values_come_from_the_data(d_out, layer):
    """s² = mean(r²)/10, σ² = mean(r²)/mean(diag K): dense float64 reference figures."""
    net = mlp(d_out=d_out)
    X = torch.randn(10, 2)
    y = 3.0 * torch.randn(10, d_out).squeeze(-1)
    model = NTKGPRegression(X, y, net, layer_variances=layer)
    r = y.reshape(10, d_out) - reference_output(net, X)
    v, k = float(r.square().mean()), float(reference_ntk(net, X).diagonal().mean())
    assert float(model.noise.detach()) == pytest.approx(v / 10, rel=1e-12)
    variance = model.variance.detach()
    assert variance.shape == ((2,) if layer else ())
    torch.testing.assert_close(variance, torch.full_like(variance, v / k), rtol=1e-12, atol=0)
    # a value the user gives is kept; the other still comes from the data
    given = NTKGPRegression(X, y, net, noise=0.3)
    assert float(given.noise.detach()) == pytest.approx(0.3) and float(
        given.variance.detach()
    ) == pytest.approx(v / k)
    # no targets: no scale to read
    prior = NTKGPRegression(X, None, net, layer_variances=layer)
    assert float(prior.noise.detach()) == 1.0 and bool((prior.variance == 1.0).all())


def test_float32_numerical_warning_is_shown_once_per_model():
    """A float32 kernel of rank 10 < N = 40 with s² = 1e-7: every evaluation needs the
    fallback, the warning (with its figures) appears at the first only, the losses stay finite."""
    import warnings

    from linear_operator.utils.warnings import NumericalWarning

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)).float()
    X = torch.linspace(-1, 1, 40, dtype=torch.float32).unsqueeze(-1)
    y = torch.sin(3 * X).squeeze(-1)
    elbo = Trace_ELBO()
    for options, route in ((None, "spectral"), (SolverOptions(solver="cholesky"), "cholesky")):
        model = NTKGPRegression(X, y, net, noise=1e-7, jitter=0.0, options=options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [float(elbo.differentiable_loss(model.model, model.guide)) for _ in range(4)]
            model(X[:3])  # the posterior shares the model's one warning
        shown = [w for w in caught if issubclass(w.category, NumericalWarning)]
        assert len(shown) == 1, [str(w.message) for w in caught]
        # the spectral route warns at its first evaluation (the eigenvalues are rounding);
        # the Cholesky route when the first factor needs jitter
        first = {
            "spectral": "NTKGPRegression: the smallest eigenvalue",
            "cholesky": "NTKGPRegression: the 40×40 matrix",
        }[route]
        assert str(shown[0].message).startswith(first)
        assert "jitter" in str(shown[0].message) and model._system.last_route == route
        assert all(math.isfinite(x) for x in losses)
        # a second model warns again: once per model, not once per process
        other = NTKGPRegression(X, y, net, noise=1e-7, jitter=0.0, options=options)
        with pytest.warns(NumericalWarning):
            elbo.differentiable_loss(other.model, other.guide)


def test_one_input_network_given_1d_inputs_gets_the_fix():
    net = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1))
    X = torch.linspace(0, 1, 8)
    msg = (
        r"^NTKGPRegression: X has shape \(8,\); the network's first layer \(Linear\) takes 1 "
        r"feature per example, so X should be \(8, 1\): use X\.unsqueeze\(-1\)\.$"
    )
    with pytest.raises(ValueError, match=msg) as info:
        NTKGPRegression(X, torch.sin(X), net)
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error, kept as the cause
    model = NTKGPRegression(X.unsqueeze(-1), torch.sin(X), net, noise=0.1)
    with pytest.raises(ValueError, match=r"^NTKGPRegression.forward: Xnew has shape \(3,\); .*"
                       r"should be \(3, 1\): use Xnew\.unsqueeze\(-1\)"):  # fmt: skip
        model(torch.rand(3))


def test_noise_floor_bounds_the_fitted_noise_on_noise_free_data():
    """s² > noise_floor (1e-4 var(y) when the noise is left to the data): the fit stops there.

    With 10 noise-free points the unbounded optimum has s² → 0; the bounded optimum is the
    dense marginal likelihood's minimiser over s² ≥ floor, i.e. the floor itself.
    """
    from pyro_ntk import fit

    torch.manual_seed(0)
    net = mlp(d_in=1, width=16)
    X = torch.linspace(-2, 2, 10).unsqueeze(-1)
    K, m = reference_ntk(net, X), reference_output(net, X).squeeze(-1)
    # a noise-free draw of the linearized network (σ² = 0.5): y lies in K's range
    y = m + torch.linalg.cholesky(0.5 * K + 1e-9 * torch.eye(10)) @ torch.randn(10)
    floor = 1e-4 * float(y.var())
    model = NTKGPRegression(X, y, net)
    assert model.noise_floor == pytest.approx(floor, rel=1e-12)
    with pytest.warns(UserWarning, match=r"fitted noise s² = .* ended on its default floor .* "
                      r"N = 10 targets.*give noise_floor explicitly"):  # fmt: skip
        result = fit(model, progress=False)
    assert result.converged
    noise = float(model.noise.detach())
    assert floor < noise < 1.01 * floor
    # the dense marginal likelihood decreases towards s² → 0 (why the floor is needed)

    def nll(v, s):
        cov = v * K + (s + model.jitter) * torch.eye(10)
        return float(-torch.distributions.MultivariateNormal(m, cov).log_prob(y))

    v = float(model.variance.detach())
    assert nll(v, 1e-9) < nll(v, noise)
    # a given noise means no default floor; an explicit floor is kept
    assert NTKGPRegression(X, y, net, noise=1e-6).noise_floor == 0.0
    assert NTKGPRegression(X, y, net, noise=0.1, noise_floor=1e-3).noise_floor == 1e-3
    assert NTKGPRegression(X, None, net).noise_floor == 0.0
    # a floor given explicitly is the user's choice: the same fit ends there without a warning
    pyro.clear_param_store()
    explicit = NTKGPRegression(X, y, net, noise_floor=floor)
    fit(explicit, progress=False)  # filterwarnings=error: a warning fails here
    assert float(explicit.noise.detach()) < 1.01 * floor


def test_no_floor_warning_when_the_noise_is_fitted_above_it():
    """Noisy targets: s² ends well above the default floor, and fit does not warn."""
    from pyro_ntk import fit

    torch.manual_seed(1)
    net = mlp(d_in=1, width=16)
    X = torch.linspace(-2, 2, 30).unsqueeze(-1)
    y = reference_output(net, X).squeeze(-1) + 0.3 * torch.randn(30)
    model = NTKGPRegression(X, y, net)
    fit(model, progress=False)  # filterwarnings=error: a warning fails here
    assert float(model.noise.detach()) > 10 * model.noise_floor


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(noise_floor=-1.0), ValueError, r"noise_floor must be a float >= 0, got -1\.0"),
        (dict(noise_floor="big"), TypeError, r"noise_floor must be a float >= 0 or None"),
        (dict(noise=1e-3, noise_floor=1e-2), ValueError, r"noise 0\.001 is not above noise_floor"),
    ],
)
def test_bad_noise_floor_is_named(kwargs, error, match):
    X = torch.linspace(-2, 2, 6).unsqueeze(-1)
    with pytest.raises(error, match=match):
        NTKGPRegression(X, torch.sin(X).squeeze(-1), mlp(d_in=1), **kwargs)


# ------------------------------------------------------------------ layer shrinkage
def test_layer_shrinkage_factor_is_the_hierarchical_log_prior():
    net = mlp(d_out=2)
    X, y = torch.randn(7, 2), torch.randn(7, 2)
    variance = torch.tensor([0.3, 2.0])
    common = dict(noise=torch.tensor(0.2), variance=variance, layer_variances=True)
    shrunk = NTKGPRegression(X, y, net, layer_shrinkage=0.5, **common)
    tr = pyro.poutine.trace(shrunk.model).get_trace()
    tr.compute_log_prob()
    dev = variance.log() - variance.log().mean()
    want = -0.5 * dev.square().sum() / 0.5**2
    torch.testing.assert_close(tr.nodes["layer_shrinkage"]["log_prob_sum"], want)
    K = reference_ntk(net, X, scale=group_scale(net, variance)) + (0.2 + 1e-6) * torch.eye(14)
    ref = torch.distributions.MultivariateNormal(reference_output(net, X).reshape(-1), K)
    torch.testing.assert_close(tr.nodes["y"]["log_prob"], ref.log_prob(y.reshape(-1)))
    plain = NTKGPRegression(X, y, net, **common)  # off by default
    assert plain.layer_shrinkage is None
    assert "layer_shrinkage" not in pyro.poutine.trace(plain.model).get_trace().nodes
    one = NTKGPRegression(X, y, net, noise=torch.tensor(0.2))  # one σ²: no factor
    assert "layer_shrinkage" not in pyro.poutine.trace(one.model).get_trace().nodes


def test_layer_shrinkage_keeps_few_target_variances_together():
    from pyro_ntk import fit

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    X = torch.randn(10, 2)
    y = torch.sin(2 * X[:, 0]) + 0.3 * torch.randn(10)
    spread = {}
    for tau in (None, 1.0, 0.1):
        pyro.clear_param_store()
        model = NTKGPRegression(X, y, net, layer_variances=True, layer_shrinkage=tau)
        fit(model, progress=False)
        log_v = model.variance.detach().log()
        spread[tau] = float((log_v - log_v.mean()).abs().max())
    assert spread[0.1] < spread[1.0] < spread[None]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "wide", True])
def test_bad_layer_shrinkage_is_named(bad):
    X = torch.linspace(-2, 2, 6).unsqueeze(-1)
    with pytest.raises(ValueError, match=r"layer_shrinkage must be a float > 0 or None, got"):
        NTKGPRegression(X, torch.sin(X).squeeze(-1), mlp(d_in=1), layer_shrinkage=bad)
