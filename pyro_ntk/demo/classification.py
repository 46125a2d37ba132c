r"""The classification adaptations of ``--task digits``, and their scores.

The source network's head cannot be reused for new classes, so every network method starts
from the same θ*: the source body and a **new last layer** fitted on the k-shot images with
the body frozen (multinomial logistic regression, L-BFGS, weight decay 0.1 fixed in advance).

* **NTK / linearized Laplace (pyro_ntk)** — :class:`~pyro_ntk.LinearizedLaplace` on the
  network's dense layers linearized at θ*
  (:func:`~pyro_ntk.adaptation.evidence_laplace`; the convolutions keep their source weights): categorical likelihood, one prior variance σ_g² per layer chosen
  by maximising the Laplace evidence of the k-shot data, exact posterior on the ``kernel``
  route (cost O((N·C)³) with N·C = 5k·5), extended-probit predictive. The prior is centred at
  the source weights in the body and at *zero* in the new head (a prior centred at the k-shot
  head, itself fitted to the same points, would count the data twice);
* **NTK / tempered Laplace (pyro_ntk)** — the same model's *tempered* posterior
  ``p(y | δ)^{1/T} p(δ)`` (``LinearizedLaplace(..., temperature=T)``, same layers, prior mean
  and σ_g²), T ∈ {1, 4⁻¹, …, 4⁻¹⁰} chosen by
  :func:`~pyro_ntk.adaptation.cross_validate_head_temperature` on the k-shot images alone (5 stratified folds; the new head and σ_g² refitted in each; T = 1
  at k = 1). The Bayes (T = 1) predictive of this model is underconfident on a few images
  per class; a cold posterior removes the prior's spread along the directions the images
  inform (``examples/digits_transfer.py`` measures both over 10 draws);
* **fine-tuning** — θ* trained further, all weights, by Adam (lr 1e-3, weight decay 1e-4,
  full batch);
* **last layer retrained** — θ* itself (MAP predictions);
* **RBF GP (pyro.contrib.gp)** — ``VariationalGP`` with an isotropic ``RBF`` kernel on the
  64 pixels and the ``MultiClass`` likelihood (one latent GP per class, zero mean), its
  hyperparameters and variational parameters fitted by :func:`~pyro_ntk.infer.fit` (Adam on
  the ELBO); probit predictive. It ignores the network.

The seconds of the network methods include fitting the new last layer (and, for the tempered
Laplace, the T = 1 Laplace whose σ_g² it reuses, and the cross-validation).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pyro_ntk.adaptation import (
    cross_validate_head_temperature,
    evidence_laplace,
    fit_head,
    tempered_laplace,
)
from pyro_ntk.demo.config import ClassificationResult, Data, DemoConfig
from pyro_ntk.demo.training import train_cross_entropy
from pyro_ntk.infer import fit

ECE_BINS = 15


def classification_scores(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> tuple[float, ...]:
    r"""Accuracy, mean negative log-likelihood and expected calibration error.

    .. math::

        \mathrm{NLL} = -\frac1n \sum_i \log p_i(y_i),\qquad
        \mathrm{ECE} = \sum_b \frac{|B_b|}{n}\,\big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|,

    where the confidence of a prediction is its largest class probability and
    :math:`B_1, \dots, B_{\text{bins}}` are equal-width confidence bins on :math:`[0, 1]`.
    Probabilities are floored at 1e-12 inside the logarithm. Cost: O(n·C).

    Args:
        probs: predictive class probabilities ``(n, C)``.
        y: integer labels ``(n,)``.
        bins: number of confidence bins.

    Returns:
        ``(accuracy, nll, ece)`` as floats.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        >>> acc, nll, ece = classification_scores(probs, torch.tensor([0, 1, 1]))
        >>> round(acc, 3), round(nll, 3), round(ece, 3)
        (0.667, 0.415, 0.3)
    """
    probs, y = probs.detach(), y.detach()
    conf, pred = probs.max(-1)
    correct = (pred == y).to(probs.dtype)
    nll = -probs.gather(-1, y[:, None]).clamp_min(1e-12).log().mean()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype, device=probs.device)
    which = torch.bucketize(conf, edges[1:-1], right=True)
    ece = torch.zeros((), dtype=probs.dtype, device=probs.device)
    for b in range(bins):
        members = which == b
        if members.any():
            ece = ece + (correct[members].mean() - conf[members].mean()).abs() * members.sum()
    return float(correct.mean()), float(nll), float(ece / len(y))


@dataclass
class KShotStart:
    """θ*: the source body with a new last layer fitted on the k-shot data, and its cost."""

    network: nn.Module
    seconds: float


def new_head(net: nn.Module, data: Data, cfg: DemoConfig) -> KShotStart:
    """θ*: a copy of ``net`` whose last layer is refitted on the target points, and its cost.

    :func:`~pyro_ntk.adaptation.fit_head` (body frozen, weight decay
    :data:`~pyro_ntk.adaptation.HEAD_WEIGHT_DECAY`), the head initialised under ``cfg.seed``.
    """
    t0 = time.perf_counter()
    tuned = fit_head(net, data.X_target, data.y_target, seed=cfg.seed)
    return KShotStart(tuned, time.perf_counter() - t0)


def _probabilities(net: nn.Module, X: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(net(X), -1)


def _result(name: str, probs: Tensor, data: Data, seconds: float, info: str = ""):
    scores = classification_scores(probs, data.y_test)
    return ClassificationResult(name, *scores, seconds, probs, info)


def last_layer_classifier(
    net: nn.Module, data: Data, cfg: DemoConfig
) -> tuple[ClassificationResult, KShotStart]:
    """**last layer retrained**: θ* itself (:func:`new_head`), MAP predictions; and θ*."""
    start = new_head(net, data, cfg)
    t0 = time.perf_counter()
    probs = _probabilities(start.network, data.X_test)
    seconds = start.seconds + time.perf_counter() - t0
    return _result("last layer retrained", probs, data, seconds), start


def laplace_classifier(start: KShotStart, data: Data, cfg: DemoConfig) -> tuple:
    """**NTK / lin. Laplace**: :func:`~pyro_ntk.adaptation.evidence_laplace` at θ*.

    Returns:
        The result and the fitted :class:`~pyro_ntk.LinearizedLaplace`.
    """
    t0 = time.perf_counter()
    fit = evidence_laplace(start.network, data.X_target, data.y_target)
    la = fit.laplace
    probs = la.predict(data.X_test)
    seconds = start.seconds + time.perf_counter() - t0
    shown = ", ".join(f"{v:.3g}" for v in la.variance.reshape(-1).tolist())
    info = (
        f"NTK (linearized Laplace, dense layers) prior variances per layer = {shown}; "
        f"log evidence {fit.log_evidence_before:.2f} -> {fit.log_evidence_after:.2f}"
    )
    return _result("NTK / lin. Laplace (pyro_ntk)", probs, data, seconds, info), la


def tempered_laplace_classifier(
    net: nn.Module, la, laplace_seconds: float, data: Data, cfg: DemoConfig
) -> ClassificationResult:
    """**NTK / tempered Laplace**: ``la``'s model tempered, T by CV on the k-shot images.

    :func:`~pyro_ntk.adaptation.cross_validate_head_temperature` from the source network
    ``net`` (at most 5 folds; T = 1 with one image per class), then
    :func:`~pyro_ntk.adaptation.tempered_laplace`. Its seconds add ``laplace_seconds``.
    """
    t0 = time.perf_counter()
    X, y = data.X_target, data.y_target
    k = int(torch.bincount(y).min())
    T, info = 1.0, "tempered Laplace: T = 1 (one image per class: nothing to cross-validate)"
    if k >= 2:
        folds = min(5, k)
        T = cross_validate_head_temperature(net, X, y, folds=folds, seed=cfg.seed).temperature
        info = f"tempered Laplace: T = {T:.3g} by {folds}-fold cross-validation"
    probs = tempered_laplace(la, X, y, T).predict(data.X_test)
    seconds = laplace_seconds + time.perf_counter() - t0
    return _result("NTK / tempered Laplace (pyro_ntk)", probs, data, seconds, info)


def fine_tune_classifier(start: KShotStart, data: Data, cfg: DemoConfig) -> tuple:
    """**fine-tuning**: a copy of θ* trained further, all weights (Adam); and the copy."""
    t0 = time.perf_counter()
    tuned = copy.deepcopy(start.network)
    train_cross_entropy(
        tuned, tuned.parameters(), data.X_target, data.y_target, cfg.finetune_steps, 1e-3,
        "fine-tuning a copy", cfg.progress, weight_decay=1e-4,
    )  # fmt: skip
    probs = _probabilities(tuned, data.X_test)
    seconds = start.seconds + time.perf_counter() - t0
    return _result("fine-tuning", probs, data, seconds), tuned


def rbf_gp_classifier(data: Data, cfg: DemoConfig) -> tuple:
    """**RBF GP**: a ``VariationalGP`` classifier on the pixels, fitted by ``fit``; and the model."""
    import pyro.contrib.gp as gp

    from pyro_ntk import gp_class_probabilities

    t0 = time.perf_counter()
    X, Xtest = data.X_target.flatten(1), data.X_test.flatten(1)
    device = X.device
    kernel = gp.kernels.RBF(
        input_dim=X.shape[1],
        variance=torch.tensor(1.0, device=device),
        lengthscale=torch.tensor(3.0, device=device),
    )
    model = gp.models.VariationalGP(
        X, data.y_target, kernel, gp.likelihoods.MultiClass(num_classes=data.num_classes),
        latent_shape=torch.Size([data.num_classes]), whiten=True, jitter=1e-5,
    )  # fmt: skip
    fit(model, max_steps=cfg.fit_steps, progress=cfg.progress, desc="RBF GP classifier: fitting")
    probs = gp_class_probabilities(model, Xtest)
    seconds = time.perf_counter() - t0
    return _result("RBF GP (pyro.contrib.gp)", probs, data, seconds), model


def classification_methods(
    net: nn.Module, data: Data, cfg: DemoConfig
) -> list[ClassificationResult]:
    """Adapt the source classifier five ways and score each on the test images.

    Args:
        net: the trained source network (never modified).
        data: the classification transfer problem.
        cfg: the configuration (``finetune_steps``, ``fit_steps``, ``seed``, ``progress``).

    Returns:
        The results in the table's order: NTK (Laplace, tempered Laplace), fine-tuning,
        last layer, RBF GP.
    """
    last, start = last_layer_classifier(net, data, cfg)
    ntk, la = laplace_classifier(start, data, cfg)
    tempered = tempered_laplace_classifier(net, la, ntk.seconds, data, cfg)
    ft, _ = fine_tune_classifier(start, data, cfg)
    rbf, _ = rbf_gp_classifier(data, cfg)
    return [ntk, tempered, ft, last, rbf]
