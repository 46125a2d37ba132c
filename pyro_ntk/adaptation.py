r"""Adapting a trained classifier to new classes: a new head, then a linearized Laplace.

A network ``f(x; θ) = W φ(x) + b`` (a body φ, then an ``nn.Linear`` head) trained on source
classes cannot reuse its head for new classes. The recipes here adapt it from ``N`` labelled
examples ``(X, y)`` of the new classes:

1. **A new head on the frozen body** (:func:`fit_head`): multinomial logistic regression on
   the body's features,

   .. math::

       (W^*, b^*) = \arg\min_{W, b}\; \frac1N \sum_{n}
           -\log \operatorname{softmax}\big(W \varphi(x_n) + b\big)_{y_n}
           + \lambda \big(\lVert W\rVert^2 + \lVert b\rVert^2\big),

   a strictly convex problem (``λ > 0``). θ* is the source body with this head.

2. **A linearized Laplace at θ*** on the dense layers (:func:`dense_parameters`), δ = θ − θ*,
   with the prior ``N(m, diag σ_g²)``, ``m = θ₀ − θ*``, centred at ``θ₀`` = the source body
   and a *zero* head (:func:`head_prior_mean`): a prior centred at the new head, itself
   fitted to ``(X, y)``, would count the data twice.

3. **One prior variance per layer by the evidence** (:func:`evidence_laplace`):
   ``σ_g² = argmax log p(y | σ²)``, the Laplace evidence with δ* refitted at every σ²
   (:meth:`~pyro_ntk.LinearizedLaplace.optimize_prior` on the ``kernel`` route, exact in
   ``N·C`` unknowns for ``C`` classes).

4. **A tempered posterior** ``p(y | δ)^{1/T} p(δ)`` of the same model
   (:func:`tempered_laplace`), with ``T`` chosen by cross-validation on ``(X, y)`` alone,
   steps 1–3 refitted on every fold (:func:`cross_validate_head_temperature`).

Cost (``N`` examples, ``C`` classes, ``F`` features, ``P`` linearized parameters): the head
O(N·(cost of φ) + iterations·N·F·C); the ``kernel``-route Laplace O(P·(N·C)²) for the
Jacobian Grams once, then O((N·C)³) per Newton or L-BFGS step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pyro_ntk import LinearizedLaplace, cross_validate_temperature
from pyro_ntk._checks import check_positive_int, check_tensor
from pyro_ntk.laplace import TemperatureCV
from pyro_ntk.linearization import Linearization

__all__ = [
    "HEAD_WEIGHT_DECAY",
    "EvidenceFit",
    "cross_validate_head_temperature",
    "dense_parameters",
    "evidence_laplace",
    "fit_head",
    "head_prior_mean",
    "tempered_laplace",
]

#: Default λ of :func:`fit_head`: the weight decay on the new head's weight and bias.
HEAD_WEIGHT_DECAY = 0.1


def dense_parameters(network: nn.Module) -> tuple[str, ...]:
    """Names of the parameters of ``network``'s ``nn.Linear`` layers, in module order.

    What :func:`evidence_laplace` linearizes: a CNN's convolutions (generic strokes) keep
    their source weights, its class-specific dense layers adapt. With every layer
    linearized, the evidence of a few images per class puts almost all prior variance on
    the first convolution and predicts worse (``examples/digits_transfer.py``).

    Args:
        network: the network.

    Returns:
        ``("<module>.weight", "<module>.bias", ...)``, without the biases a layer lacks;
        usable as ``params`` of :class:`~pyro_ntk.Linearization`.

    Raises:
        TypeError, ValueError: ``network`` is not an ``nn.Module``, or has no ``nn.Linear``.

    Cost: one walk over the modules.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
        ...                           torch.nn.Linear(8, 3), torch.nn.Linear(3, 2, bias=False))
        >>> dense_parameters(net)
        ('2.weight', '2.bias', '3.weight')
    """
    where = "dense_parameters"
    if not isinstance(network, nn.Module):
        raise TypeError(
            f"{where}: network must be a torch.nn.Module, got {type(network).__name__}."
        )
    names = tuple(
        f"{name}.{p}" if name else p
        for name, m in network.named_modules()
        if isinstance(m, nn.Linear)
        for p in ("weight", "bias")
        if getattr(m, p) is not None
    )
    if not names:
        raise ValueError(
            f"{where}: network ({type(network).__name__}) has no nn.Linear layer; expected at "
            f"least one."
        )
    return names


def fit_head(
    network: nn.Sequential,
    X: Tensor,
    y: Tensor,
    *,
    weight_decay: float = HEAD_WEIGHT_DECAY,
    seed: int | None = None,
    max_iter: int = 200,
) -> nn.Sequential:
    r"""A copy of ``network`` whose last layer is refitted on ``(X, y)``, the body frozen.

    The head ``network[-1]`` (an ``nn.Linear`` with ``C`` outputs) is re-initialised by its
    ``reset_parameters`` and fitted by L-BFGS (strong-Wolfe line search, ``max_iter``
    iterations) to the convex objective

    .. math::

        \frac1N \sum_n -\log \operatorname{softmax}\big(W \varphi(x_n) + b\big)_{y_n}
            + \lambda \big(\lVert W\rVert^2 + \lVert b\rVert^2\big),

    with ``φ = network[:-1]`` evaluated once, in eval mode and without gradients, and
    ``λ = weight_decay``. ``network`` itself is never modified.

    Args:
        network: an ``nn.Sequential`` whose last module is the ``nn.Linear`` head.
        X: inputs ``(N, ...)`` of the body, in the network's dtype and device.
        y: integer labels ``(N,)`` in ``0 .. C − 1``.
        weight_decay: ``λ ≥ 0`` (default :data:`HEAD_WEIGHT_DECAY`).
        seed: if given, ``torch.manual_seed(seed)`` is called before the head is
            re-initialised (torch's global generator, as ``nn.Linear`` itself uses), so the
            fit is reproducible; ``None`` leaves the global generator alone.
        max_iter: L-BFGS iterations.

    Returns:
        The new network (a deep copy, in eval mode): the source body and the fitted head.

    Raises:
        TypeError, ValueError: ``network`` is not a body and an ``nn.Linear`` head; bad ``y``.

    Cost: one forward pass of the body over ``N`` inputs, then up to ``max_iter``
    evaluations of the head's objective, O(N·F·C) each for ``F`` features.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        >>> X, y = torch.randn(12, 4), torch.arange(12) % 3
        >>> tuned = fit_head(net, X, y, seed=0)
        >>> torch.equal(tuned[0].weight, net[0].weight), torch.equal(tuned[2].weight, net[2].weight)
        (True, False)
    """
    where = "fit_head"
    seq = isinstance(network, nn.Sequential) and len(network) > 0
    last = network[-1] if seq and len(network) >= 2 else None
    if not isinstance(last, nn.Linear):
        got = type(network).__name__
        if seq:
            end = type(network[-1]).__name__
            got = f"an nn.Sequential of {len(network)} module(s) ending in {end}"
        raise TypeError(
            f"{where}: network must be an nn.Sequential of a body and an nn.Linear head, got {got}."
        )
    X, y = check_tensor(where, "X", X), check_tensor(where, "y", y)
    C = last.out_features
    labels = not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    if not (labels and y.dim() == 1 and 0 < y.shape[0] == X.shape[0]) or not (
        0 <= int(y.min()) and int(y.max()) < C
    ):
        raise ValueError(
            f"{where}: y must be (N,) = ({X.shape[0]},) integer labels in 0 .. {C - 1} (the "
            f"head has {C} outputs), got shape {tuple(y.shape)}, dtype {y.dtype}"
            + (f", values {int(y.min())} .. {int(y.max())}." if labels and y.numel() else ".")
        )
    if isinstance(weight_decay, bool) or not (
        isinstance(weight_decay, (int, float)) and 0 <= weight_decay < math.inf
    ):
        raise ValueError(
            f"{where}: weight_decay must be a finite float >= 0, got {weight_decay!r}."
        )
    check_positive_int(where, "max_iter", max_iter)

    tuned = copy.deepcopy(network).eval()
    body, head = tuned[:-1], tuned[-1]
    if seed is not None:
        torch.manual_seed(seed)
    head.reset_parameters()
    head.requires_grad_(True)
    with torch.no_grad():
        features = body(X)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        penalty = sum(p.square().sum() for p in head.parameters())
        loss = nn.functional.cross_entropy(head(features), y) + weight_decay * penalty
        loss.backward()
        return loss

    opt.step(closure)
    return tuned


def head_prior_mean(linearization: Linearization) -> Tensor:
    r"""The prior mean ``m = θ₀ − θ*`` of δ for a new head: ``−θ*`` on the head, 0 elsewhere.

    ``θ₀`` is θ* on every linearized layer but the last (the source weights) and 0 on the
    last one (the new head), so the prior ``N(m, D⁻¹)`` of
    :class:`~pyro_ntk.LinearizedLaplace` is centred at the source body and a zero head.
    The head is the last parameter group of ``linearization`` (its last layer).

    Args:
        linearization: the :class:`~pyro_ntk.Linearization` at θ*.

    Returns:
        ``m``, shape ``(P,)``, in the linearization's dtype and device.

    Cost: O(P).

    Example:
        >>> from pyro_ntk import Linearization
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> m = head_prior_mean(Linearization(net))
        >>> m.shape, bool((m[:9] == 0).all()), torch.equal(m[9:12], -net[2].weight.detach()[0])
        (torch.Size([13]), True, True)
    """
    if not isinstance(linearization, Linearization):
        raise TypeError(
            f"head_prior_mean: linearization must be a pyro_ntk.Linearization, got "
            f"{type(linearization).__name__}."
        )
    space = linearization.space
    theta = torch.cat([linearization.theta[n].reshape(-1) for n in space.names])
    head = space.group_index() == space.num_groups - 1
    return torch.where(head, -theta, torch.zeros_like(theta))


class EvidenceFit(NamedTuple):
    """The result of :func:`evidence_laplace`."""

    laplace: LinearizedLaplace
    """The fitted Laplace at the evidence's per-layer prior variances."""
    log_evidence_before: float
    """The Laplace evidence at the initial variance."""
    log_evidence_after: float
    """The Laplace evidence at the fitted variances."""


def evidence_laplace(
    network: nn.Module, X: Tensor, y: Tensor, num_steps: int = 50, *, variance: float = 0.1
) -> EvidenceFit:
    r"""The Laplace on ``network``'s dense layers, one prior variance per layer by the evidence.

    :class:`~pyro_ntk.LinearizedLaplace` with the categorical likelihood on the parameters
    :func:`dense_parameters` selects, the prior mean :func:`head_prior_mean` and one
    variance σ_g² per layer, on the exact ``kernel`` route. It is fitted at ``σ_g² =
    variance``, then

    .. math:: \sigma^2 = \arg\max_{\sigma^2} \log p(y \mid \sigma^2)

    by ``num_steps`` L-BFGS iterations on ``log σ²`` with δ* refitted at every σ²
    (:meth:`~pyro_ntk.LinearizedLaplace.optimize_prior`, one round).

    Args:
        network: the classifier at θ* (e.g. from :func:`fit_head`); never modified.
        X: inputs ``(N, ...)``.
        y: integer labels ``(N,)``.
        num_steps: L-BFGS iterations on the evidence.
        variance: the initial σ_g² of every layer.

    Returns:
        :class:`EvidenceFit`: the fitted Laplace, and the log evidence before and after.

    Cost: the ``kernel`` route's, with ``C`` classes: the per-layer Jacobian Grams
    O(P·(N·C)²) once, then O((N·C)³) per Newton step of each evidence evaluation.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X, y = torch.randn(12, 2), torch.arange(12) % 3
        >>> fit = evidence_laplace(net, X, y, num_steps=5)
        >>> fit.log_evidence_after >= fit.log_evidence_before, tuple(fit.laplace.variance.shape)
        (True, (2,))
    """
    check_positive_int("evidence_laplace", "num_steps", num_steps)
    lin = Linearization(network, params=dense_parameters(network))
    la = LinearizedLaplace(
        lin, "categorical", variance=variance, layer_variances=True, method="kernel",
        prior_mean=head_prior_mean(lin),
    )  # fmt: skip
    la.fit(X, y)
    before = float(la.log_marginal_likelihood())
    after = la.optimize_prior(X, y, rounds=1, num_steps=num_steps)[-1]
    return EvidenceFit(la, before, after)


def tempered_laplace(
    laplace: LinearizedLaplace, X: Tensor, y: Tensor, temperature: float
) -> LinearizedLaplace:
    r"""The same model as ``laplace`` with its posterior tempered, fitted on ``(X, y)``.

    A new :class:`~pyro_ntk.LinearizedLaplace` sharing ``laplace``'s linearization,
    likelihood, prior mean, prior variances and route, for the posterior
    ``p(y | δ)^{1/T} p(δ)``: its Laplace approximation has the MAP under the prior variance
    ``σ²/T`` and the covariance ``(F/T + D)⁻¹``. ``laplace`` itself is left as it is.

    Args:
        laplace: a :class:`~pyro_ntk.LinearizedLaplace` (its σ² chosen, e.g. by
            :func:`evidence_laplace`).
        X: inputs ``(N, ...)``.
        y: targets ``(N,)``.
        temperature: ``T > 0``.

    Returns:
        The fitted tempered Laplace.

    Cost: one fit of ``laplace``'s route (on ``kernel``, the Jacobian Grams again).

    Example:
        >>> from pyro_ntk import LinearizedLaplace
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X, y = torch.randn(12, 2), torch.arange(12) % 3
        >>> la = LinearizedLaplace(net, "categorical", method="kernel").fit(X, y)
        >>> cold = tempered_laplace(la, X, y, 0.01)
        >>> cold.temperature, cold.lin is la.lin, la.temperature
        (0.01, True, 1.0)
    """
    if not isinstance(laplace, LinearizedLaplace):
        raise TypeError(
            f"tempered_laplace: laplace must be a pyro_ntk.LinearizedLaplace, got "
            f"{type(laplace).__name__}."
        )
    tempered = LinearizedLaplace(
        laplace.lin, laplace.likelihood, variance=laplace.variance,
        layer_variances=laplace.layer_variances, noise=laplace.noise, method=laplace.method,
        rank=laplace.rank, slq_probes=laplace.slq_probes, slq_steps=laplace.slq_steps,
        prior_mean=laplace.prior_mean, temperature=temperature,
    )  # fmt: skip
    return tempered.fit(X, y)


def cross_validate_head_temperature(
    network: nn.Sequential,
    X: Tensor,
    y: Tensor,
    temperatures: Sequence[float] | None = None,
    *,
    folds: int = 5,
    num_steps: int = 50,
    seed: int | None = None,
) -> TemperatureCV:
    r"""``T`` of :func:`tempered_laplace` by stratified cross-validation on ``(X, y)`` alone.

    :func:`~pyro_ntk.cross_validate_temperature` with, on every fold's kept examples, the
    whole recipe refitted: a new head (:func:`fit_head` with ``seed``) and the evidence's
    per-layer σ² (:func:`evidence_laplace` with ``num_steps``). No held-out label reaches a
    fold's model. ``T`` minimises the mean held-out NLL.

    Args:
        network: the source network (an ``nn.Sequential`` ending in its head); never
            modified.
        X: inputs ``(N, ...)``.
        y: integer labels ``(N,)``.
        temperatures: candidate ``T > 0`` (``None``: those of
            :func:`~pyro_ntk.cross_validate_temperature`, 4⁻ʲ for j = 0 … 10).
        folds: number of folds, ``2 ≤ folds ≤`` the size of the smallest class.
        num_steps: L-BFGS iterations on each fold's evidence.
        seed: the seed of each fold's new head (:func:`fit_head`).

    Returns:
        :class:`~pyro_ntk.laplace.TemperatureCV`: the chosen ``T``, the candidates and the
        mean held-out NLL per candidate.

    Cost: ``folds`` times (:func:`fit_head` + :func:`evidence_laplace`) on ``(folds − 1)/folds``
    of the examples, plus ``folds · len(temperatures)`` tempered refits and predictions.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X, y = torch.randn(12, 2), torch.arange(12) % 3
        >>> cv = cross_validate_head_temperature(net, X, y, (1.0, 0.1), folds=2, num_steps=3)
        >>> cv.temperature in (1.0, 0.1), tuple(cv.nll.shape)
        (True, (2,))
    """
    check_positive_int("cross_validate_head_temperature", "num_steps", num_steps)

    def refit(Xk: Tensor, yk: Tensor) -> LinearizedLaplace:
        head = fit_head(network, Xk, yk, seed=seed)
        return evidence_laplace(head, Xk, yk, num_steps).laplace

    if temperatures is None:
        return cross_validate_temperature(refit, X, y, folds=folds)
    return cross_validate_temperature(refit, X, y, temperatures, folds=folds)
