"""Linearized Laplace against dense float64 references (covariance, predictive, evidence)."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
from laplace_problems import OUTPUTS, dense_hessian, laplace_problem
from networks import assert_unchanged, snapshot

from pyro_ntk.laplace import LinearizedLaplace
from pyro_ntk.testing import reference_jacobian, reference_output


def _problem(likelihood, n=12, seed=0):
    return laplace_problem(likelihood, n, seed)


def _make(likelihood, net, method, layer=True, **kw):
    noise = 0.09 if likelihood == "gaussian" else None
    variance = torch.tensor([0.7, 1.8]) if layer else 1.3
    return LinearizedLaplace(
        net, likelihood, variance=variance, layer_variances=layer, noise=noise, method=method, **kw
    )


@pytest.mark.parametrize("likelihood", list(OUTPUTS))
@pytest.mark.parametrize("method", ["dense", "kernel"])
def test_covariance_and_predictive_equal_dense_reference(likelihood, method):
    net, X, y = _problem(likelihood)
    before = snapshot(net)
    la = _make(likelihood, net, method, chunk_size=5).fit(X, y)  # products in chunks of 5
    assert la.method_used == method
    J = reference_jacobian(net, X)  # (N, O, P)
    f_map = reference_output(net, X) + J @ la.delta
    F = torch.einsum("nop,noq,nqr->pr", J, dense_hessian(likelihood, f_map, 0.09), J)
    var = torch.tensor([0.7, 1.8])[la.lin.space.group_index()]
    Sigma = torch.linalg.inv(F + torch.diag(1 / var))
    torch.testing.assert_close(la.covariance(), Sigma, rtol=1e-7, atol=1e-10)

    Xs = torch.randn(5, 2)
    Js = reference_jacobian(net, Xs)
    cov = torch.einsum("nop,pq,nrq->nor", Js, Sigma, Js)
    mean, full = la.predictive_f(Xs, full_cov=True)
    mean2, diag = la.predictive_f(Xs)
    torch.testing.assert_close(mean, reference_output(net, Xs) + Js @ la.delta)
    torch.testing.assert_close(mean2, mean)
    torch.testing.assert_close(full, cov, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(diag, torch.diagonal(cov, dim1=1, dim2=2), rtol=1e-7, atol=1e-10)

    # the evidence, written out densely
    noise = 0.09 if likelihood == "gaussian" else None
    ll = _reference_log_likelihood(likelihood, f_map, y, noise)
    S = var.sqrt()
    logdet = torch.logdet(torch.eye(len(S)) + S[:, None] * F * S)
    ref = ll - 0.5 * (la.delta.square() / var).sum() - 0.5 * logdet
    torch.testing.assert_close(la.log_marginal_likelihood(), ref)
    assert_unchanged(net, before)


def test_full_predictive_covariance_is_built_one_chunk_at_a_time(monkeypatch):
    """``full_cov`` forms the Jacobian of at most ``chunk_size`` inputs at once: the blocks
    equal the dense ``J Σ Jᵀ`` and the unchunked formula ``J S² Jᵀ − (J S U) w (J S U)ᵀ``."""
    net, X, y = _problem("categorical")
    la = _make("categorical", net, "dense", chunk_size=3).fit(X, y)
    Xs = torch.randn(7, 2)  # chunks of 3, 3 and 1 inputs
    rows = []
    jacobian = la.lin.jacobian
    monkeypatch.setattr(la.lin, "jacobian", lambda Z: rows.append(Z.shape[0]) or jacobian(Z))
    mean, full = la.predictive_f(Xs, full_cov=True)
    monkeypatch.undo()
    assert rows == [3, 3, 1]
    Js = reference_jacobian(net, Xs)  # (N, O, P)
    dense = torch.einsum("nop,pq,nrq->nor", Js, la.covariance(), Js)
    torch.testing.assert_close(full, dense, rtol=1e-7, atol=1e-10)
    S, U, lam = la.prior_std(), la._U, la._lam
    W = torch.einsum("nop,pr->nor", Js, S[:, None] * U)
    unchunked = torch.einsum("nop,nqp->noq", Js * S.square(), Js) - torch.einsum(
        "nor,nqr->noq", W * (lam / (1 + lam)), W
    )
    torch.testing.assert_close(full, unchunked, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean, reference_output(net, Xs) + Js @ la.delta)


def _reference_log_likelihood(likelihood, f, y, noise):
    D = torch.distributions
    if likelihood == "categorical":
        return D.Categorical(logits=f).log_prob(y).sum()
    if likelihood == "bernoulli":
        return D.Bernoulli(logits=f[:, 0]).log_prob(y).sum()
    if likelihood == "poisson":
        return D.Poisson(f[:, 0].exp()).log_prob(y).sum()
    return D.Normal(f, math.sqrt(noise)).log_prob(y).sum()


@pytest.mark.parametrize("likelihood", ["categorical", "poisson"])
def test_map_is_a_stationary_point_of_the_log_joint(likelihood):
    net, X, y = _problem(likelihood, n=20)
    la = _make(likelihood, net, "dense").fit(X, y)
    J = reference_jacobian(net, X)
    delta = la.delta.clone().requires_grad_(True)
    f = reference_output(net, X) + J @ delta
    var = torch.tensor([0.7, 1.8])[la.lin.space.group_index()]
    lj = _reference_log_likelihood(likelihood, f, y, None) - 0.5 * (delta.square() / var).sum()
    (g,) = torch.autograd.grad(lj, delta)
    assert g.abs().max() < 1e-9


def test_gaussian_laplace_is_the_exact_ntk_gp():
    """Linear-Gaussian: the MAP is the GP posterior mean and the evidence is exact."""
    net, X, y = _problem("gaussian", n=10)
    la = _make("gaussian", net, "kernel", layer=False).fit(X, y)
    J = reference_jacobian(net, X).reshape(20, -1)  # rows n·O + o
    K = 1.3 * J @ J.T + 0.09 * torch.eye(20)
    r = (y - reference_output(net, X)).reshape(-1)
    exact = torch.distributions.MultivariateNormal(torch.zeros(20), K).log_prob(r)
    torch.testing.assert_close(la.log_marginal_likelihood(), exact)
    torch.testing.assert_close(la.delta, 1.3 * J.T @ torch.linalg.solve(K, r), rtol=1e-6, atol=1e-8)


def test_lanczos_route_matches_dense_when_rank_covers_the_fisher():
    net, X, y = _problem("categorical", n=8)
    dense = _make("categorical", net, "dense", layer=False).fit(X, y)
    lanczos = _make(
        "categorical", net, "lanczos", layer=False, rank=dense.num_params, slq_probes=0
    ).fit(X, y)
    torch.testing.assert_close(lanczos.delta, dense.delta)
    Sigma = dense.covariance()
    err = (lanczos.covariance() - Sigma).abs().max() / Sigma.abs().max()
    assert err < 1e-5
    ev_l, ev_d = lanczos.log_marginal_likelihood(), dense.log_marginal_likelihood()
    assert abs(float(ev_l - ev_d)) < 1e-4 * abs(float(ev_d))
    # truncation only ever adds variance
    small = _make("categorical", net, "lanczos", layer=False, rank=4).fit(X, y)
    Xs = torch.randn(6, 2)
    assert bool((small.predictive_f(Xs)[1] >= dense.predictive_f(Xs)[1] - 1e-10).all())


def test_slq_evidence_on_the_lanczos_route_matches_the_exact_logdet():
    net, X, y = _problem("categorical", n=8)
    dense = _make("categorical", net, "dense", layer=False).fit(X, y)
    slq = _make("categorical", net, "lanczos", layer=False, rank=5, slq_probes=400).fit(X, y)
    theta, w = slq._route.slq
    for variance in (None, torch.tensor(0.4)):  # the fitted σ² = 1.3, and a new scalar σ²
        c = 1.0 if variance is None else 0.4 / 1.3
        # per-probe estimates of log det(I + c S F S) and their standard error
        per_probe = slq.num_params * (w * torch.log1p(c * theta)).sum(-1)
        se = float(per_probe.std()) / math.sqrt(len(per_probe))
        exact = dense.log_marginal_likelihood(variance)
        # evidence = ... − ½ logdet: its error is half the logdet's
        assert abs(float(slq.log_marginal_likelihood(variance) - exact)) < 0.5 * 4 * se


def test_cg_solve_and_samples_follow_the_covariance():
    net, X, y = _problem("categorical", n=10)
    la = _make("categorical", net, "kernel").fit(X, y)
    Sigma = la.covariance()
    B = torch.randn(la.num_params, 3)
    x, diag = la.solve(B, tol=1e-10)
    assert diag.converged
    torch.testing.assert_close(x, Sigma @ B, rtol=1e-6, atol=1e-9)
    d = la.sample(20000, generator=torch.Generator().manual_seed(0))
    emp = d.T @ d / d.shape[0]
    assert (emp - Sigma).abs().max() < 0.05 * Sigma.diagonal().max()


def test_probit_and_monte_carlo_predictions_agree_with_quadrature():
    net, X, y = _problem("bernoulli", n=15)
    la = _make("bernoulli", net, "dense").fit(X, y)
    Xs = torch.randn(6, 2)
    mu, var = la.predictive_f(Xs)
    # Gauss-Hermite quadrature of E[sigmoid(f)], f ~ N(mu, var)
    t, w = (torch.from_numpy(a) for a in numpy.polynomial.hermite_e.hermegauss(60))
    exact = (torch.sigmoid(mu + var.sqrt() * t) * w).sum(-1) / w.sum()
    mc = la.predict(Xs, method="mc", num_samples=20000, generator=torch.Generator().manual_seed(1))
    probit = la.predict(Xs)
    assert mc.shape == probit.shape == (6,)
    assert (mc - exact).abs().max() < 0.01
    assert (probit - exact).abs().max() < 0.02


def test_multiclass_probabilities_are_normalised():
    net, X, y = _problem("categorical", n=15)
    la = _make("categorical", net, "kernel").fit(X, y)
    Xs = torch.randn(7, 2)
    for method in ("probit", "mc"):
        p = la.predict(Xs, method=method, num_samples=50)
        assert p.shape == (7, 3)
        torch.testing.assert_close(p.sum(-1), torch.ones(7))


def test_optimize_prior_increases_the_evidence():
    net, X, y = _problem("categorical", n=30)
    la = _make("categorical", net, "dense", layer=True).fit(X, y)
    start = float(la.log_marginal_likelihood())
    history = la.optimize_prior(X, y, rounds=2, num_steps=30, lr=0.1)
    assert history[-1] > start
    # the evidence is (locally) maximal in σ² at the optimum of the inner problem
    v = la.variance.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(la.log_marginal_likelihood(v), v)
    assert g.shape == (2,)


def test_adam_reaches_the_lbfgs_map():
    net, X, y = _problem("bernoulli", n=20)
    a = _make("bernoulli", net, "dense", layer=False).fit(X, y)
    b = _make("bernoulli", net, "dense", layer=False).fit(
        X, y, optimizer="adam", lr=0.05, num_steps=300, newton_steps=0
    )
    torch.testing.assert_close(b.delta, a.delta, rtol=0, atol=2e-2)
    c = _make("bernoulli", net, "dense", layer=False).fit(
        X, y, optimizer="adam", num_steps=5, batch_size=8
    )
    assert bool(torch.isfinite(c.delta).all())


@pytest.mark.parametrize(
    "likelihood, y, error, match",
    [
        (
            "categorical",
            torch.tensor([0, 1, 3, 2]),
            ValueError,
            r"range over \[0, 3\], outside \[0, 2\]",
        ),
        ("categorical", torch.tensor([-1, 1, 0, 2]), ValueError, r"range over \[-1, 2\]"),
        ("categorical", torch.tensor([0.0, 1.0, 2.0, 1.0]), TypeError, "dtype torch.float64"),
        (
            "bernoulli",
            torch.tensor([0.0, 1.5, 1.0, 0.0]),
            ValueError,
            r"\[0, 1\], got values in \[0, 1.5\]",
        ),
        (
            "poisson",
            torch.tensor([0.0, -2.0, 1.0, 0.0]),
            ValueError,
            "non-negative, got minimum -2",
        ),
        ("poisson", torch.tensor([0.0, 0.5, 1.0, 0.0]), ValueError, "must be integers"),
        ("categorical", torch.tensor([0, 1, 2]), ValueError, r"y has shape \(3,\)"),
    ],
    ids=[
        "label-high",
        "label-negative",
        "label-float",
        "prob-gt-1",
        "count-negative",
        "count-frac",
        "shape",
    ],
)
def test_bad_targets_are_named(likelihood, y, error, match):
    net, X, _ = _problem(likelihood, n=4)
    la = _make(likelihood, net, "dense")
    with pytest.raises(error, match=match):
        la.fit(X, y)


def test_bad_arguments_are_named():
    net, X, y = _problem("categorical", n=4)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        LinearizedLaplace(net, "softmax")
    with pytest.raises(ValueError, match="noise is required for, and only for"):
        LinearizedLaplace(net, "gaussian")
    with pytest.raises(ValueError, match="noise must be positive and finite, got -1.0"):
        LinearizedLaplace(net, "gaussian", noise=-1.0)
    with pytest.raises(ValueError, match="variance must be positive"):
        LinearizedLaplace(net, "gaussian", variance=0.0, noise=1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        LinearizedLaplace(net, method="exact")
    with pytest.raises(RuntimeError, match="call fit"):
        LinearizedLaplace(net).predict(X)
    net1, X1, y1 = _problem("bernoulli", n=4)
    with pytest.raises(ValueError, match="categorical likelihood needs O >= 2"):
        LinearizedLaplace(net1, "categorical").fit(X1, y1.long())


@pytest.mark.parametrize("method", ["dense", "kernel"])
def test_prior_mean_shifts_the_map_and_the_evidence_but_not_the_covariance(method):
    net, X, y = _problem("categorical", n=15)
    torch.manual_seed(3)
    m = 0.5 * torch.randn(sum(p.numel() for p in net.parameters()))
    la = _make("categorical", net, method, prior_mean=m).fit(X, y)
    # δ* is a stationary point of the log joint with the prior N(m, D⁻¹), by an independent check
    J = reference_jacobian(net, X)
    var = torch.tensor([0.7, 1.8])[la.lin.space.group_index()]
    delta = la.delta.clone().requires_grad_(True)
    f = reference_output(net, X) + J @ delta
    lj = _reference_log_likelihood("categorical", f, y, None)
    lj = lj - 0.5 * ((delta - m).square() / var).sum()
    (g,) = torch.autograd.grad(lj, delta)
    assert g.abs().max() < 1e-9
    # Σ = (JᵀΛ(f*)J + D)⁻¹ with Λ at the MAP outputs
    f_map = reference_output(net, X) + J @ la.delta
    Lam = dense_hessian("categorical", f_map, None)
    F = torch.einsum("nop,noq,nqr->pr", J, Lam, J)
    Sigma = torch.linalg.inv(F + torch.diag(1 / var))
    torch.testing.assert_close(la.covariance(), Sigma, rtol=1e-8, atol=1e-10)
    # evidence: log p(y|δ*) − ½ (δ*−m)ᵀD(δ*−m) − ½ log det(I + S F S)
    S = var.sqrt()
    ref = (
        _reference_log_likelihood("categorical", f_map, y, None)
        - 0.5 * ((la.delta - m).square() / var).sum()
        - 0.5 * torch.logdet(torch.eye(len(S)) + S[:, None] * F * S)
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), ref, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="prior_mean must be a finite"):
        _make("categorical", net, method, prior_mean=torch.zeros(3))


def _refit_evidence(net, X, y, variance, likelihood="categorical", m=None, temperature=1.0):
    """The Laplace evidence with δ* refitted at σ², by the independent dense route."""
    noise = 0.09 if likelihood == "gaussian" else None
    la = LinearizedLaplace(
        net, likelihood, variance=variance, layer_variances=True, noise=noise, method="dense",
        prior_mean=m, temperature=temperature,
    )  # fmt: skip
    return float(la.fit(X, y, num_steps=300, newton_steps=3).log_marginal_likelihood())


@pytest.mark.parametrize(
    "likelihood, T", [("categorical", 1.0), ("poisson", 1.0), ("categorical", 0.3)]
)
def test_kernel_evidence_gradient_is_the_derivative_of_the_refitted_evidence(likelihood, T):
    """d/dσ² of the evidence *with δ* refitted* (finite differences of dense-route fits)."""
    from pyro_ntk.laplace.function_space import FunctionSpaceMAP
    from pyro_ntk.laplace.route import LaplaceProblem
    from pyro_ntk.likelihoods import get_likelihood

    net, X, y = _problem(likelihood, n=10)
    torch.manual_seed(1)
    m = 0.3 * torch.randn(sum(p.numel() for p in net.parameters()))
    la = _make(likelihood, net, "kernel", prior_mean=m).fit(X, y)
    lik = get_likelihood("test", likelihood)
    fs = FunctionSpaceMAP(LaplaceProblem(la.lin, lik, la.noise, la.prior_mean, X, y))
    var = torch.tensor([0.7, 1.8], requires_grad=True)
    ev = fs.evidence(var / T, fs.solve(var.detach() / T), temperature=T)
    torch.testing.assert_close(
        float(ev.detach()), _refit_evidence(net, X, y, var.detach(), likelihood, m, T)
    )
    (g,) = torch.autograd.grad(ev, var)
    h = 1e-4
    for k in range(2):
        e = torch.zeros(2)
        e[k] = h
        up = _refit_evidence(net, X, y, var.detach() + e, likelihood, m, T)
        down = _refit_evidence(net, X, y, var.detach() - e, likelihood, m, T)
        assert abs(float(g[k]) - (up - down) / (2 * h)) < 1e-5 * (1 + abs(float(g[k])))


def test_kernel_optimize_prior_reaches_a_maximum_of_the_refitted_evidence():
    net, X, y = _problem("categorical", n=30)
    la = _make("categorical", net, "kernel").fit(X, y)
    start = float(la.log_marginal_likelihood())
    history = la.optimize_prior(X, y, rounds=2, num_steps=50)
    assert history[-1] > start and history[-1] >= history[0] - 1e-9
    var = la.variance.clone()
    # the reported evidence is that of the dense route refitted at the same σ²
    assert abs(history[-1] - _refit_evidence(net, X, y, var)) < 1e-6 * abs(history[-1])
    # and no nearby σ² (δ* refitted independently) does better
    for k in range(2):
        for factor in (0.8, 1.25):
            v = var.clone()
            v[k] *= factor
            assert _refit_evidence(net, X, y, v) <= history[-1] + 1e-7
    # δ* is the MAP at the optimised σ²: stationary point of the dense log joint
    J = reference_jacobian(net, X)
    delta = la.delta.clone().requires_grad_(True)
    f = reference_output(net, X) + J @ delta
    var_p = var[la.lin.space.group_index()]
    lj = _reference_log_likelihood("categorical", f, y, None) - 0.5 * (delta.square() / var_p).sum()
    (g,) = torch.autograd.grad(lj, delta)
    assert g.abs().max() < 1e-8


def test_kernel_optimize_prior_keeps_one_shared_variance():
    """layer_variances=False: one σ² is optimised (not one per layer), to a maximum."""
    net, X, y = _problem("categorical", n=30)
    la = _make("categorical", net, "kernel", layer=False).fit(X, y)
    history = la.optimize_prior(X, y, rounds=2, num_steps=50)
    assert la.variance.shape == ()
    v = float(la.variance)
    # the refitted evidence of one shared σ² (dense route) is maximal there
    assert abs(history[-1] - _refit_evidence(net, X, y, torch.tensor([v, v]))) < 1e-6 * abs(
        history[-1]
    )
    for factor in (0.8, 1.25):
        assert _refit_evidence(net, X, y, torch.tensor([v, v]) * factor) <= history[-1] + 1e-7


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "poisson"])
def test_map_prediction_is_the_likelihood_mean_at_the_linearized_map(likelihood):
    net, X, y = _problem(likelihood, n=12)
    la = _make(likelihood, net, "kernel").fit(X, y)
    Xs = torch.randn(7, 2)
    mu = reference_output(net, Xs) + reference_jacobian(net, Xs) @ la.delta
    expected = {"categorical": lambda m: torch.softmax(m, -1), "bernoulli": torch.sigmoid}.get(
        likelihood, torch.exp
    )(mu)
    expected = expected if likelihood == "categorical" else expected[:, 0]
    torch.testing.assert_close(la.predict(Xs, method="map"), expected)
    with pytest.raises(ValueError, match="'probit', 'mc' or 'map', got 'mode'"):
        la.predict(Xs, method="mode")


@pytest.mark.parametrize("method", ["dense", "kernel", "lanczos"])
def test_tempered_posterior_equals_dense_reference(method):
    """p_T(δ|y) ∝ p(y|δ)^{1/T} p(δ): its MAP, (F/T + D)⁻¹, predictive and normaliser, densely."""
    T = 0.25
    net, X, y = _problem("categorical", n=10)
    torch.manual_seed(2)
    m = 0.3 * torch.randn(sum(p.numel() for p in net.parameters()))
    kw = {"rank": 40, "slq_probes": 0} if method == "lanczos" else {}
    la = _make("categorical", net, method, prior_mean=m, temperature=T, **kw).fit(X, y)
    J = reference_jacobian(net, X)
    var = torch.tensor([0.7, 1.8])[la.lin.space.group_index()]
    # δ*_T is a stationary point of the tempered log density log p(y|δ)/T + log p(δ)
    delta = la.delta.clone().requires_grad_(True)
    f = reference_output(net, X) + J @ delta
    ll = _reference_log_likelihood("categorical", f, y, None)
    (g,) = torch.autograd.grad(ll / T - 0.5 * ((delta - m).square() / var).sum(), delta)
    assert g.abs().max() < 1e-8
    # and δ*_T differs from the T = 1 MAP (the test can fail)
    assert (
        la.delta - _make("categorical", net, method, prior_mean=m, **kw).fit(X, y).delta
    ).abs().max() > 1e-3
    f_map = reference_output(net, X) + J @ la.delta
    F = torch.einsum("nop,noq,nqr->pr", J, dense_hessian("categorical", f_map, None), J)
    Sigma = torch.linalg.inv(F / T + torch.diag(1 / var))
    rel = (la.covariance() - Sigma).abs().max() / Sigma.abs().max()
    assert rel < (1e-5 if method == "lanczos" else 1e-9)
    Xs = torch.randn(4, 2)
    Js = reference_jacobian(net, Xs)
    cov = torch.einsum("nop,pq,nrq->nor", Js, Sigma, Js)
    mean, full = la.predictive_f(Xs, full_cov=True)
    torch.testing.assert_close(mean, reference_output(net, Xs) + Js @ la.delta)
    torch.testing.assert_close(full, cov, rtol=1e-5, atol=1e-8)
    B = torch.randn(la.num_params, 2)
    x, diag = la.solve(B, tol=1e-11)
    assert diag.converged
    torch.testing.assert_close(x, Sigma @ B, rtol=1e-6, atol=1e-9)
    if method != "lanczos":  # the normaliser of the tempered posterior, by Laplace
        S = var.sqrt()
        ref = (
            _reference_log_likelihood("categorical", f_map, y, None) / T
            - 0.5 * ((la.delta - m).square() / var).sum()
            - 0.5 * torch.logdet(torch.eye(len(S)) + S[:, None] * F * S / T)
        )
        torch.testing.assert_close(la.log_marginal_likelihood(), ref, rtol=1e-8, atol=1e-8)


def test_temperature_is_read_by_fit_and_validated():
    net, X, y = _problem("categorical", n=10)
    la = _make("categorical", net, "kernel").fit(X, y)
    cold = _make("categorical", net, "kernel", temperature=0.1).fit(X, y)
    la.temperature = 0.1
    la.fit(X, y)
    torch.testing.assert_close(la.delta, cold.delta)
    torch.testing.assert_close(la.covariance(), cold.covariance())
    assert "temperature=0.1" in repr(la)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"LinearizedLaplace: temperature must be .*{bad}"):
            _make("categorical", net, "kernel", temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a positive float, got str"):
        _make("categorical", net, "kernel", temperature="cold")
    la.temperature = -2.0
    with pytest.raises(ValueError, match=r"LinearizedLaplace.fit: temperature .* got -2.0"):
        la.fit(X, y)


def test_kernel_refits_reuse_the_problem_only_while_the_data_are_unchanged():
    """Refits on equal data (a new T, σ² or a copy of X) match fresh fits; new data do not reuse."""
    net, X, y = _problem("categorical", n=10)
    la = _make("categorical", net, "kernel").fit(X, y)
    problem = la._function_space
    for T, variance in ((0.1, None), (1.0, torch.tensor([0.2, 3.0]))):
        la.temperature = T
        if variance is not None:
            la.variance = variance
        la.fit(X.clone(), y.clone())  # equal values, new tensors: reused
        assert la._function_space is problem
        fresh = _make("categorical", net, "kernel", temperature=T)
        fresh.variance = la.variance.clone()
        fresh.fit(X, y)
        torch.testing.assert_close(la.delta, fresh.delta, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(la.covariance(), fresh.covariance(), rtol=1e-10, atol=1e-12)
    # in-place changes of X, y or the prior mean, and other data, build a new problem
    X2, y2 = X.clone(), y.clone()
    la.fit(X2, y2)
    X2[0, 0] += 1.0
    la.fit(X2, y2)
    assert la._function_space is not problem
    for change in ("y", "m", "subset"):
        problem = la._function_space
        if change == "y":
            y2[0] = (y2[0] + 1) % 3
        elif change == "m":
            la.prior_mean = la.prior_mean + 0.1
        la.fit(X2[:8] if change == "subset" else X2, y2[:8] if change == "subset" else y2)
        assert la._function_space is not problem
        fresh = _make("categorical", net, "kernel", prior_mean=la.prior_mean)
        fresh.variance = la.variance.clone()
        fresh.fit(X2[:8] if change == "subset" else X2, y2[:8] if change == "subset" else y2)
        torch.testing.assert_close(la.delta, fresh.delta, rtol=1e-10, atol=1e-12)


def test_kernel_optimize_prior_maximises_the_refitted_tempered_normaliser():
    T = 0.3
    net, X, y = _problem("categorical", n=20)
    la = _make("categorical", net, "kernel", temperature=T).fit(X, y)
    history = la.optimize_prior(X, y, rounds=1, num_steps=50)
    var = la.variance.clone()
    # the reported value is the dense route's tempered normaliser, refitted at the same σ²
    assert abs(history[-1] - _refit_evidence(net, X, y, var, temperature=T)) < 1e-6 * abs(
        history[-1]
    )
    for k in range(2):
        for factor in (0.8, 1.25):
            v = var.clone()
            v[k] *= factor
            assert _refit_evidence(net, X, y, v, temperature=T) <= history[-1] + 1e-7


def test_block_diagonal_products_equal_the_dense_block_matrix():
    from pyro_ntk.laplace.function_space import block_left, block_sandwich

    torch.manual_seed(0)
    N, O, k = 4, 3, 2
    L, Z = torch.randn(N, O, O), torch.randn(N * O, k)
    K = torch.randn(2, N * O, N * O)  # a batch of two, e.g. per-group Grams
    dense = torch.block_diag(*L)
    torch.testing.assert_close(block_left(L, Z), dense @ Z)
    torch.testing.assert_close(block_left(L, Z, transpose=True), dense.T @ Z)
    torch.testing.assert_close(block_sandwich(L, K), dense.T @ K @ dense)
