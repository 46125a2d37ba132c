"""The adaptation recipes (new head, prior mean, dense layers, evidence and tempered Laplace).

Data: scikit-learn's 8×8 digits 5–9 (relabelled 0–4), four images per class, float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from networks import assert_unchanged, snapshot
from torch import nn

from pyro_ntk import Linearization, LinearizedLaplace, cross_validate_temperature
from pyro_ntk.adaptation import (
    HEAD_WEIGHT_DECAY,
    cross_validate_head_temperature,
    dense_parameters,
    evidence_laplace,
    fit_head,
    head_prior_mean,
    tempered_laplace,
)

pytest.importorskip("sklearn")

K = 4  # labelled images per class


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64) / 16.0
    y = torch.tensor(y)
    keep = torch.cat([torch.nonzero(y == c).flatten()[:K] for c in range(5, 10)])
    return X[keep], y[keep] - 5


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 5)).double()


def cnn() -> nn.Sequential:
    """The demo's digits architecture, smaller."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(48, 6), nn.ReLU(), nn.Linear(6, 5),
    ).double()  # fmt: skip


def penalised_cross_entropy(w: np.ndarray, F: np.ndarray, y: np.ndarray, lam: float):
    """Objective and gradient of the head's problem in numpy (independent of torch)."""
    C, D = 5, F.shape[1]
    W, b = w[: C * D].reshape(C, D), w[C * D :]
    logits = F @ W.T + b
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    N = len(y)
    value = -np.log(p[np.arange(N), y]).mean() + lam * (w @ w)
    r = p.copy()
    r[np.arange(N), y] -= 1
    grad = np.concatenate([(r.T @ F / N).ravel(), r.mean(0)]) + 2 * lam * w
    return value, grad


# ---------------------------------------------------------------------- dense_parameters
def test_dense_parameters_selects_the_linear_layers():
    assert dense_parameters(cnn()) == ("5.weight", "5.bias", "7.weight", "7.bias")
    nested = nn.Sequential(
        nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh()), nn.Conv1d(1, 1, 1)
    )
    assert dense_parameters(nested) == ("0.0.weight",)
    assert dense_parameters(nn.Linear(2, 1)) == ("weight", "bias")
    # the selection is what Linearization linearizes
    assert Linearization(cnn(), params=dense_parameters(cnn())).space.names == list(
        dense_parameters(cnn())
    )
    with pytest.raises(ValueError, match="dense_parameters: network .*no nn.Linear"):
        dense_parameters(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="dense_parameters: network must be a torch.nn.Module"):
        dense_parameters("net")


# ---------------------------------------------------------------------- fit_head
def test_fit_head_minimises_the_penalised_cross_entropy(digits):
    from scipy.optimize import minimize

    X, y = digits
    net = mlp()
    before = snapshot(net)
    tuned = fit_head(net, X, y, seed=0)
    assert_unchanged(net, before)
    assert tuned is not net and not tuned.training
    assert torch.equal(tuned[0].weight, net[0].weight) and torch.equal(tuned[0].bias, net[0].bias)
    with torch.no_grad():
        F = net[:-1](X).numpy()
    ref = minimize(
        penalised_cross_entropy, np.zeros(5 * 12 + 5), args=(F, y.numpy(), HEAD_WEIGHT_DECAY),
        jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000},
    )  # fmt: skip
    head = tuned[-1]
    w = torch.cat([head.weight.detach().reshape(-1), head.bias.detach()]).numpy()
    value, _ = penalised_cross_entropy(w, F, y.numpy(), HEAD_WEIGHT_DECAY)
    # L-BFGS stops when the objective changes by < 1e-9 per step: the gap to the minimum is
    # below that scale, and strong convexity (modulus μ = 2λ) bounds the distance to it
    gap = value - ref.fun
    assert -1e-12 < gap < 1e-8
    mu = 2 * HEAD_WEIGHT_DECAY
    assert np.linalg.norm(w - ref.x) <= np.sqrt(2 * max(gap, 0) / mu) + 1e-9


def test_fit_head_weight_decay_and_seed(digits):
    X, y = digits
    net = mlp()
    a, b = fit_head(net, X, y, seed=3), fit_head(net, X, y, seed=3)
    assert torch.equal(a[-1].weight, b[-1].weight)
    strong = fit_head(net, X, y, weight_decay=1.0, seed=3)
    assert strong[-1].weight.norm() < a[-1].weight.norm()
    # a frozen network (requires_grad off) still gets a fitted head
    frozen = mlp().requires_grad_(False)
    torch.testing.assert_close(fit_head(frozen, X, y, seed=3)[-1].weight, a[-1].weight)


def test_fit_head_errors_name_the_argument(digits):
    X, y = digits
    net = mlp()
    with pytest.raises(TypeError, match="fit_head: network must be an nn.Sequential.*Linear"):
        fit_head(nn.Linear(64, 5), X, y)
    with pytest.raises(TypeError, match="fit_head: network.*ending in Tanh"):
        fit_head(net[:-1], X, y)
    with pytest.raises(ValueError, match=r"fit_head: y must be \(N,\) = \(20,\) integer labels"):
        fit_head(net, X, y.double())
    with pytest.raises(ValueError, match=r"fit_head: y .* 0 \.\. 4 .*values 0 \.\. 5"):
        fit_head(net, X, torch.where(y == 4, 5, y))
    with pytest.raises(ValueError, match="fit_head: y .*got shape \\(19,\\)"):
        fit_head(net, X, y[1:])
    with pytest.raises(ValueError, match="fit_head: weight_decay must be a finite float >= 0"):
        fit_head(net, X, y, weight_decay=-1.0)
    with pytest.raises(ValueError, match="fit_head: max_iter"):
        fit_head(net, X, y, max_iter=0)


# ---------------------------------------------------------------------- head_prior_mean
def test_head_prior_mean_is_minus_theta_on_the_head_only():
    net = cnn()
    lin = Linearization(net, params=dense_parameters(net))
    m = head_prior_mean(lin)
    body = sum(p.numel() for p in net[5].parameters())
    expected = torch.cat(
        [torch.zeros(body, dtype=torch.float64)]
        + [-p.detach().reshape(-1) for p in net[7].parameters()]
    )
    assert torch.equal(m, expected) and m.dtype == torch.float64
    # a linearization of the head alone: the prior is centred at a zero head
    head_only = Linearization(net, params=["7.weight", "7.bias"])
    assert torch.equal(head_prior_mean(head_only), expected[body:])
    with pytest.raises(TypeError, match="head_prior_mean: linearization must be a pyro_ntk"):
        head_prior_mean(net)


# ---------------------------------------------------------------------- evidence_laplace
def reference(net, X, y, variance, prior_mean, method="kernel"):
    """A fresh Laplace on the dense layers at fixed σ² (kernel route: exact Newton MAP)."""
    la = LinearizedLaplace(
        net, "categorical", variance=variance, layer_variances=True,
        params=dense_parameters(net), method=method, prior_mean=prior_mean,
    )  # fmt: skip
    return la.fit(X, y, num_steps=500)


def test_evidence_laplace_maximises_the_evidence(digits):
    X, y = digits
    net = fit_head(mlp(), X, y, seed=0)
    before = snapshot(net)
    fit = evidence_laplace(net, X, y, num_steps=30)
    assert_unchanged(net, before)
    la = fit.laplace
    assert la.lin.space.names == list(dense_parameters(net)) and la.method_used == "kernel"
    assert torch.equal(la.prior_mean, head_prior_mean(la.lin))
    assert la.variance.shape == (2,) and la.likelihood == "categorical"
    assert fit.log_evidence_after > fit.log_evidence_before + 1.0
    # the evidence at the initial σ² = 0.1, against the dense route (P × P Fisher)
    m = la.prior_mean
    start = reference(net, X, y, torch.full((2,), 0.1), m, method="dense")
    evidence = float(start.log_marginal_likelihood())
    assert fit.log_evidence_before == pytest.approx(evidence, rel=1e-6)
    # the reported evidence is that of the returned model, refitted afresh at its σ²
    end = reference(net, X, y, la.variance, m)
    assert fit.log_evidence_after == pytest.approx(float(end.log_marginal_likelihood()), rel=1e-9)
    torch.testing.assert_close(la.delta, end.delta, rtol=1e-6, atol=1e-9)
    # a maximum: moving either layer's σ² by a factor 1.5 either way does not raise the
    # evidence by more than L-BFGS's stopping rule allows. It stops once |∂ log p / ∂ log σ_g²|
    # ≤ 1e-7 (optimize_prior's tolerance_grad); where the evidence flattens towards a bound
    # (here the head's σ² → 0, worth < 1e-7 in all: the body's linearization carries the
    # fit), a step of log 1.5 can still gain up to 1e-7 · log 1.5. Off the maximum the
    # change is orders larger (0.06 for the first layer's σ² × 1.5).
    slack = 1e-7 * math.log(1.5)
    for g in range(2):
        for factor in (1.5, 1 / 1.5):
            moved = la.variance.clone()
            moved[g] *= factor
            other = reference(net, X, y, moved, m)
            assert float(other.log_marginal_likelihood()) < fit.log_evidence_after + slack


# ---------------------------------------------------------------------- tempered_laplace
def test_tempered_laplace_is_the_ordinary_one_at_prior_variance_over_t(digits):
    X, y = digits
    net = fit_head(mlp(), X, y, seed=0)
    la = evidence_laplace(net, X, y, num_steps=10).laplace
    T = 0.05
    cold = tempered_laplace(la, X, y, T)
    assert cold.lin is la.lin and cold.temperature == T and la.temperature == 1.0
    assert torch.equal(cold.variance, la.variance) and torch.equal(cold.prior_mean, la.prior_mean)
    # p(y | δ)^{1/T} p(δ): the MAP at prior variance σ²/T, the covariance T (F + T D)⁻¹
    ref = reference(net, X, y, la.variance / T, la.prior_mean)
    torch.testing.assert_close(cold.delta, ref.delta, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(cold.covariance(), T * ref.covariance(), rtol=1e-6, atol=1e-12)
    assert not torch.allclose(cold.covariance(), la.covariance())
    with pytest.raises(TypeError, match="tempered_laplace: laplace must be a pyro_ntk"):
        tempered_laplace(net, X, y, T)
    with pytest.raises(ValueError, match="temperature"):
        tempered_laplace(la, X, y, -1.0)


# ---------------------------------------------------------------------- the temperature by CV
def test_cross_validate_head_temperature_refits_the_recipe_on_every_fold(digits):
    X, y = digits
    source = mlp(seed=1)
    before = snapshot(source)
    temperatures = (1.0, 0.1, 0.01)
    cv = cross_validate_head_temperature(source, X, y, temperatures, folds=2, num_steps=5, seed=0)
    assert_unchanged(source, before)

    def refit(Xk, yk):
        return evidence_laplace(fit_head(source, Xk, yk, seed=0), Xk, yk, 5).laplace

    ref = cross_validate_temperature(refit, X, y, temperatures, folds=2)
    assert cv.temperatures == temperatures and cv.temperature == ref.temperature
    torch.testing.assert_close(cv.nll, ref.nll, rtol=1e-10, atol=1e-12)
    assert cv.temperature == temperatures[int(cv.nll.argmin())]
    with pytest.raises(ValueError, match="folds must be between 2"):
        cross_validate_head_temperature(source, X, y, folds=K + 1, num_steps=2)
