r"""The classic adaptations the NTK methods are compared with, each at its usual best practice.

Every method takes a :class:`Context` (the task, the draw, the source network θ*) and
returns a prediction on the test rows: ``{"mean", "var"}`` (regression, ``var`` includes
the noise), ``{"probs"}`` (classification) or ``{"rates"}`` ``(S, n)`` (counts, a Poisson
mixture). None of them modifies θ*; none sees a test label.

* ``source``: θ* unchanged; regression noise = mean squared residual on the shots.
* ``fine_tune``: all weights, Adam, full batch, loss + (λ/2)‖θ − θ*‖² with λ = 10⁻²
  (the L2 pull toward θ*); **lr ∈ {10⁻³, 10⁻²} and steps ∈ {0, 10, 30, 100, 300} chosen by
  K-fold cross-validation on the shots** (K = min(5, n); stratified for classes), by the
  held-out training loss. Regression noise s² = the held-out MSE at the chosen setting
  (the plug-in training MSE of an interpolating net would be ~0).
* ``last_layer``: the head refitted on the frozen source features with a pull
  (λ/2)‖W − W*‖² toward the source head, λ by the same CV (grid 10⁻³ … 10²): closed-form
  ridge for regression (s² = CV MSE), L-BFGS otherwise.
* ``ablr``: Bayesian linear regression on the source features (+1), prior
  ``w ~ N(w*, α⁻¹ I)`` centred at the source head, noise β⁻¹; α, β by the exact marginal
  likelihood (L-BFGS on their logs); exact Gaussian predictive. Regression only.
* ``rbf_gp``: ``pyro.contrib.gp`` GP on the raw (standardised) inputs, isotropic RBF,
  constant mean = mean of the shots, variance/lengthscale/noise by the marginal likelihood
  (:func:`pyro_ntk.fit`, L-BFGS). Regression only.
* ``ensemble``: the M = 5 source networks of the recipe (seeds 0–4), each fine-tuned with
  ``fine_tune``'s CV-chosen lr and steps (chosen once, on member 0); regression: the
  moment-matched Gaussian of the members with noise s²; classification: mean
  probabilities; counts: the mixture of the members' Poissons.

Example:
    >>> folds_of(6, 3, classes=0)
    tensor([0, 1, 2, 0, 1, 2])
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from transfer_suite.source import loss_fn, source_network
from transfer_suite.tasks import Draw, Task

ENSEMBLE_SIZE = 5
FT_LRS = (1e-3, 1e-2)
FT_STEPS = (0, 10, 30, 100, 300)
FT_PULL = 1e-2
HEAD_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass
class Context:
    """What a method sees: the task, one draw, θ* and a cache shared by the draw's methods."""

    task: Task
    draw: Draw
    net: nn.Module
    cache: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"regression"``, ``"classification"`` or ``"count"``."""
        return self.task.spec.kind


def folds_of(n: int, num_folds: int, classes: int) -> Tensor:
    """Fold of each shot: ``i mod K``, or the within-class rank mod K for classes.

    Classification shots are interleaved by class, so the rank is ``i // classes``.
    """
    i = torch.arange(n)
    return (i // classes) % num_folds if classes else i % num_folds


def cv_folds(ctx: Context) -> tuple[Tensor, int]:
    n = len(ctx.draw.ya)
    C = ctx.task.num_classes
    k = n // C if C else n
    K = min(5, k)
    return folds_of(n, K, C), K


def _outputs(net: nn.Module, X: Tensor) -> Tensor:
    with torch.no_grad():
        return net(X)


def network_prediction(kind: str, out: Tensor, noise: float | None = None) -> dict:
    """The predictive of a point network: N(f, s²), softmax, or Poisson(exp f)."""
    if kind == "classification":
        return {"probs": torch.softmax(out, -1)}
    if kind == "count":
        return {"rates": out.squeeze(-1).exp().unsqueeze(0)}
    mean = out.squeeze(-1)
    return {"mean": mean, "var": torch.full_like(mean, max(noise, 1e-6))}


# ----------------------------------------------------------------------------- source
def source(ctx: Context) -> dict:
    out_a = _outputs(ctx.net, ctx.draw.Xa)
    noise = (
        float((out_a.squeeze(-1) - ctx.draw.ya).square().mean())
        if ctx.kind == "regression"
        else None
    )
    return network_prediction(ctx.kind, _outputs(ctx.net, ctx.draw.Xt), noise)


# ----------------------------------------------------------------------------- fine-tuning
def _train(net, kind, X, y, lr, checkpoints, evaluate):
    """Adam with the pull toward θ*; ``evaluate(net)`` at each checkpoint step."""
    net = copy.deepcopy(net).train()
    theta0 = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    results, step = [], 0
    for target in checkpoints:
        while step < target:
            opt.zero_grad()
            pull = sum((p - p0).square().sum() for p, p0 in zip(net.parameters(), theta0))
            (loss_fn(kind, net(X), y) + 0.5 * FT_PULL * pull).backward()
            opt.step()
            step += 1
        net.eval()
        results.append(evaluate(net))
        net.train()
    return net.eval(), results


def _heldout_loss(kind: str, out: Tensor, y: Tensor) -> float:
    """Summed held-out loss (the mean is taken over all held-out shots afterwards)."""
    return float(loss_fn(kind, out.detach(), y)) * len(y)


def fine_tune_choice(ctx: Context) -> dict:
    """CV over (lr, steps) on the shots, cached per draw: chosen lr, steps, held-out loss."""
    if "ft_choice" in ctx.cache:
        return ctx.cache["ft_choice"]
    t0 = time.perf_counter()
    X, y, kind = ctx.draw.Xa, ctx.draw.ya, ctx.kind
    fold, K = cv_folds(ctx)
    total = torch.zeros(len(FT_LRS), len(FT_STEPS), dtype=torch.float64)
    for j in range(K):
        held, kept = fold == j, fold != j
        for a, lr in enumerate(FT_LRS):
            _, losses = _train(
                ctx.net, kind, X[kept], y[kept], lr, FT_STEPS,
                lambda net, held=held: _heldout_loss(kind, net(X[held]), y[held]),
            )  # fmt: skip
            total[a] += torch.tensor(losses)
    total /= len(y)
    a, s = divmod(int(total.argmin()), len(FT_STEPS))
    choice = {"lr": FT_LRS[a], "steps": FT_STEPS[s], "cv_loss": float(total[a, s])}
    choice["seconds"] = time.perf_counter() - t0
    ctx.cache["ft_choice"] = choice
    return choice


def fine_tuned(ctx: Context, net: nn.Module | None = None) -> nn.Module:
    """θ* (or ``net``) fine-tuned on all shots with the CV-chosen lr and steps."""
    c = fine_tune_choice(ctx)
    base = ctx.net if net is None else net
    tuned, _ = _train(
        base, ctx.kind, ctx.draw.Xa, ctx.draw.ya, c["lr"], [c["steps"]], lambda n: None
    )
    return tuned


def fine_tune(ctx: Context) -> dict:
    c = fine_tune_choice(ctx)
    t0 = time.perf_counter()
    tuned = fine_tuned(ctx)
    ctx.cache["ft_net"] = tuned
    ctx.cache["ft_seconds"] = c["seconds"] + time.perf_counter() - t0
    noise = c["cv_loss"] if ctx.kind == "regression" else None
    pred = network_prediction(ctx.kind, _outputs(tuned, ctx.draw.Xt), noise)
    pred["info"] = f"lr {c['lr']:g}, steps {c['steps']}"
    return pred


# ----------------------------------------------------------------------------- last layer
def _features(net: nn.Sequential, X: Tensor) -> Tensor:
    with torch.no_grad():
        phi = net[:-1](X)
    return torch.cat([phi, torch.ones(len(X), 1, dtype=phi.dtype)], 1)


def _head(net: nn.Sequential) -> Tensor:
    head = net[-1]
    return torch.cat([head.weight.detach(), head.bias.detach()[:, None]], 1)  # (O, F+1)


def _fit_head(kind, Phi, y, W0, lam):
    if kind == "regression":
        A = Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=Phi.dtype)
        return W0 + torch.linalg.solve(A, Phi.T @ (y - Phi @ W0[0]))[None]
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(kind, Phi @ W.T, y) + 0.5 * lam * (W - W0).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach()


def last_layer(ctx: Context) -> dict:
    kind, Phi, y = ctx.kind, _features(ctx.net, ctx.draw.Xa), ctx.draw.ya
    W0 = _head(ctx.net)
    fold, K = cv_folds(ctx)
    cv = []
    for lam in HEAD_LAMBDAS:
        tot = 0.0
        for j in range(K):
            held, kept = fold == j, fold != j
            W = _fit_head(kind, Phi[kept], y[kept], W0, lam)
            tot += _heldout_loss(kind, Phi[held] @ W.T, y[held])
        cv.append(tot / len(y))
    best = min(range(len(cv)), key=cv.__getitem__)
    W = _fit_head(kind, Phi, y, W0, HEAD_LAMBDAS[best])
    out = _features(ctx.net, ctx.draw.Xt) @ W.T
    pred = network_prediction(kind, out, cv[best] if kind == "regression" else None)
    pred["info"] = f"lambda {HEAD_LAMBDAS[best]:g}"
    return pred


def ablr(ctx: Context) -> dict:
    """Bayesian last-layer regression, α and β by the marginal likelihood (function space)."""
    Phi, y = _features(ctx.net, ctx.draw.Xa), ctx.draw.ya
    w0 = _head(ctx.net)[0]
    r = y - Phi @ w0
    G = Phi @ Phi.T
    logs = torch.tensor([0.0, math.log(max(float(r.var()), 1e-3) * 0.5)], dtype=torch.float64,
                        requires_grad=True)  # fmt: skip  # log α⁻¹, log β⁻¹
    opt = torch.optim.LBFGS([logs], max_iter=200, line_search_fn="strong_wolfe")
    eye = torch.eye(len(y), dtype=torch.float64)

    def nlml():
        Kmat = logs[0].exp() * G + logs[1].exp() * eye
        L = torch.linalg.cholesky(Kmat)
        a = torch.cholesky_solve(r[:, None], L)
        return 0.5 * (r[:, None] * a).sum() + L.diagonal().log().sum()

    def closure():
        opt.zero_grad()
        loss = nlml()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s2w, noise = logs.exp()
        L = torch.linalg.cholesky(s2w * G + noise * eye)
        Pt = _features(ctx.net, ctx.draw.Xt)
        Kst = s2w * Pt @ Phi.T
        mean = Pt @ w0 + Kst @ torch.cholesky_solve(r[:, None], L).squeeze(1)
        v = torch.linalg.solve_triangular(L, Kst.T, upper=False)
        var = s2w * Pt.square().sum(1) - v.square().sum(0) + noise
    return {
        "mean": mean,
        "var": var,
        "info": f"prior var {float(s2w):.3g}, noise {float(noise):.3g}",
    }


# ----------------------------------------------------------------------------- RBF GP
def rbf_gp(ctx: Context) -> dict:
    import pyro.contrib.gp as gp

    from pyro_ntk import fit

    X, y = ctx.draw.Xa, ctx.draw.ya
    D = X.shape[1]
    ybar = float(y.mean())
    kernel = gp.kernels.RBF(
        input_dim=D, variance=torch.tensor(max(float(y.var()), 1e-2)),
        lengthscale=torch.tensor(math.sqrt(D)),
    )  # fmt: skip
    gpr = gp.models.GPRegression(
        X, y, kernel, noise=torch.tensor(0.1 * max(float(y.var()), 1e-2)),
        mean_function=lambda x: torch.full((x.shape[0],), ybar, dtype=x.dtype),
    )  # fmt: skip
    fit(gpr, progress=False)
    with torch.no_grad():
        mean, var = gpr(ctx.draw.Xt, full_cov=False, noiseless=False)
    return {
        "mean": mean,
        "var": var,
        "info": f"lengthscale {float(kernel.lengthscale.detach()):.3g}",
    }


# ----------------------------------------------------------------------------- ensemble
def ensemble(ctx: Context) -> dict:
    c = fine_tune_choice(ctx)
    outs = []
    for m in range(ENSEMBLE_SIZE):
        member = ctx.net if m == 0 else source_network(ctx.task, m)[0]
        tuned = fine_tuned(ctx, member)
        outs.append(_outputs(tuned, ctx.draw.Xt))
    out = torch.stack(outs)  # (M, n, O)
    if ctx.kind == "classification":
        return {"probs": torch.softmax(out, -1).mean(0)}
    if ctx.kind == "count":
        return {"rates": out.squeeze(-1).exp()}
    means = out.squeeze(-1)
    return {"mean": means.mean(0), "var": means.var(0, unbiased=False) + max(c["cv_loss"], 1e-6)}


METHODS = {
    "source": source,
    "fine_tune": fine_tune,
    "last_layer": last_layer,
    "ablr": ablr,
    "rbf_gp": rbf_gp,
    "ensemble": ensemble,
}
