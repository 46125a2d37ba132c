r"""Scores of one predictive, and the paired win/tie/loss rule over draws.

**Regression** (Gaussian predictive ``N(μ, v)``, ``v`` including the noise): RMSE, mean NLL
``½ log(2πv) + (y − μ)²/(2v)``, and the coverage of the central 95 % interval
``|y − μ| ≤ 1.96 √v``.

A Gaussian **mixture** (weights ``w_g``, means ``μ_g``, variances ``v_g``): RMSE of the
mixture mean ``Σ w_g μ_g``, mean NLL ``−log Σ_g w_g N(y; μ_g, v_g)``, and the coverage of
the central 95 % interval, ``0.025 ≤ Σ_g w_g Φ((y − μ_g)/√v_g) ≤ 0.975`` (for one
component the same as the Gaussian rule).

**Classification** (probabilities ``p`` ``(n, C)``): accuracy, mean NLL ``−log p_y``
(probabilities floored at 10⁻¹²) and the expected calibration error with 15 equal-width
confidence bins, ``ECE = Σ_b (n_b / n) |acc_b − conf_b|``.

**Counts** (a mixture of Poissons: rates ``λ`` ``(S, n)``, equal weights; ``S = 1`` for a
point prediction): RMSE of the predictive mean ``mean_s λ_s``, mean NLL ``−log mean_s
Poisson(y | λ_s)``, and the coverage of the central 95 % interval ``[a, b]``, ``a`` the
smallest count with CDF ≥ 0.025 and ``b`` the smallest with CDF ≥ 0.975 (tested as
``CDF(y) ≥ 0.025`` and ``CDF(y − 1) < 0.975``).

**Paired rule.** Method ``m`` against reference ``r`` in one (task, size) cell: the
per-draw differences ``d_i = NLL_m,i − NLL_r,i`` over the ``n`` draws, their mean ``d̄`` and
paired standard error ``se = sd(d)/√n``. ``m`` **wins** if ``d̄ < −se``, **loses** if
``d̄ > se``, and **ties** otherwise (within one paired standard error).

Example:
    >>> paired_outcome([1.0, 2.0, 3.0], [2.0, 3.0, 4.5])
    'win'
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Z95 = 1.959963984540054
ECE_BINS = 15


def gaussian_scores(mean: Tensor, var: Tensor, y: Tensor) -> dict[str, float]:
    """RMSE, NLL and 95 % coverage of ``N(mean, var)`` for targets ``y`` (all ``(n,)``)."""
    mean, var, y = mean.detach().reshape(-1), var.detach().reshape(-1), y.reshape(-1)
    err = y - mean
    nll = 0.5 * torch.log(2 * math.pi * var) + 0.5 * err.square() / var
    return {
        "rmse": float(err.square().mean().sqrt()),
        "nll": float(nll.mean()),
        "coverage": float((err.abs() <= Z95 * var.sqrt()).double().mean()),
    }


def mixture_scores(weights: Tensor, means: Tensor, var: Tensor, y: Tensor) -> dict[str, float]:
    """RMSE, NLL and 95 % coverage of ``Σ_g w_g N(means_g, var_g)``: ``(g,)``, ``(g, n)``, ``(g, n)``."""
    w = weights.detach().reshape(-1, 1)
    means, var, y = means.detach(), var.detach(), y.reshape(1, -1)
    log_n = -0.5 * (torch.log(2 * math.pi * var) + (y - means).square() / var)
    cdf = (w * torch.special.ndtr((y - means) / var.sqrt())).sum(0)
    lo = (1 - 0.95) / 2
    return {
        "rmse": float((y[0] - (w * means).sum(0)).square().mean().sqrt()),
        "nll": float(-torch.logsumexp(log_n + w.log(), 0).mean()),
        "coverage": float(((cdf >= lo) & (cdf <= 1 - lo)).double().mean()),
    }


def expected_calibration_error(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width confidence bins ``(k/bins, (k+1)/bins]``."""
    conf, pred = probs.max(-1)
    correct = (pred == y).double()
    which = torch.clamp(torch.ceil(conf * bins).long() - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += float(sel.double().mean()) * abs(float(correct[sel].mean() - conf[sel].mean()))
    return ece


def classification_scores(probs: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy, NLL and ECE of class probabilities ``probs`` ``(n, C)`` for labels ``y``."""
    probs = probs.detach()
    p_y = probs.gather(1, y.reshape(-1, 1)).squeeze(1).clamp_min(1e-12)
    return {
        "accuracy": float((probs.argmax(-1) == y).double().mean()),
        "nll": float(-p_y.log().mean()),
        "ece": expected_calibration_error(probs, y),
    }


def count_scores(rates: Tensor, y: Tensor) -> dict[str, float]:
    """RMSE, NLL and 95 % coverage of the Poisson mixture with rates ``(S, n)`` (or ``(n,)``)."""
    rates = rates.detach()
    if rates.dim() == 1:
        rates = rates.unsqueeze(0)
    rates = rates.clamp_min(1e-10)
    S = rates.shape[0]
    logp = torch.distributions.Poisson(rates).log_prob(y.unsqueeze(0))  # (S, n)
    nll = -(torch.logsumexp(logp, 0) - math.log(S))
    # y ∈ [a, b]  ⇔  CDF(y) ≥ 0.025 and CDF(y − 1) < 0.975, with the Poisson CDF
    # P(Y ≤ k | λ) = Q(k + 1, λ) (regularised upper incomplete gamma): O(S·n) memory
    cdf = lambda k: torch.special.gammaincc(k + 1, rates).mean(0)  # noqa: E731
    below = torch.where(y > 0, cdf(y - 1), torch.zeros_like(y))
    cover = (cdf(y) >= 0.025) & (below < 0.975)
    return {
        "rmse": float((rates.mean(0) - y).square().mean().sqrt()),
        "nll": float(nll.mean()),
        "coverage": float(cover.double().mean()),
    }


def paired_difference(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean and paired standard error of ``values − reference`` over draws."""
    d = torch.tensor(values, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se


def paired_outcome(values: list[float], reference: list[float]) -> str:
    """``"win"``, ``"tie"`` or ``"loss"`` of ``values`` (lower is better) against ``reference``."""
    mean, se = paired_difference(values, reference)
    if mean < -se:
        return "win"
    if mean > se:
        return "loss"
    return "tie"
