r"""Choosing the temperature of a tempered linearized Laplace by cross-validation.

The tempered posterior :math:`p_T(\delta \mid y) \propto p(y \mid \delta)^{1/T}\,p(\delta)`
(:class:`~pyro_ntk.LinearizedLaplace` with ``temperature=T``) is not a probabilistic model
of the data, so its evidence cannot choose :math:`T`; held-out likelihood can. With
:math:`F` stratified folds :math:`I_1, \dots, I_F` of the training set,

.. math::

    \hat T = \arg\min_{T \in \mathcal{T}}\; -\frac{1}{N} \sum_{j=1}^{F} \sum_{n \in I_j}
        \log p_T\big(y_n \mid x_n, \{(x_m, y_m)\}_{m \notin I_j}\big),

where :math:`p_T(\cdot \mid x, \mathcal{D})` is the predictive of the Laplace refitted on
:math:`\mathcal{D}` at temperature :math:`T`. Whatever the user fits on the training data
(a new head, prior variances by the evidence) is refitted on every fold by the user's
``fit`` callable, so no held-out label reaches the fold's model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from pyro_ntk._checks import check_positive_int, check_tensor
from pyro_ntk.laplace.linearized import LinearizedLaplace

__all__ = ["TEMPERATURES", "TemperatureCV", "cross_validate_temperature"]

#: Default candidates: T = 4⁻ʲ, j = 0, …, 10 (from the Bayes posterior down to ≈ 10⁻⁶).
TEMPERATURES = tuple(4.0**-j for j in range(11))


class TemperatureCV(NamedTuple):
    """The result of :func:`cross_validate_temperature`."""

    temperature: float
    """The candidate with the lowest held-out NLL (the first one on ties)."""
    temperatures: tuple[float, ...]
    """The candidates, in the order given."""
    nll: Tensor
    """Mean held-out negative log-likelihood per candidate, ``(len(temperatures),)``."""


def cross_validate_temperature(
    fit: Callable[[Tensor, Tensor], LinearizedLaplace],
    X: Tensor,
    y: Tensor,
    temperatures: Sequence[float] = TEMPERATURES,
    *,
    folds: int = 5,
) -> TemperatureCV:
    r"""The temperature of a classifier's tempered Laplace, by stratified ``folds``-fold CV.

    Fold ``j`` holds out the ``j``-th, ``(j + folds)``-th, … example of every class (in the
    order they appear in ``y``), so every fold holds out the same share of each class. On the
    other examples ``fit(X_kept, y_kept)`` returns a fitted :class:`~pyro_ntk.LinearizedLaplace`
    (categorical or Bernoulli likelihood); it is refitted at each candidate ``T`` on the same
    data (the ``kernel`` route reuses its Jacobians and the held-out examples' cross kernels
    across them) and scored by the held-out NLL of its default (probit) predictive, with
    probabilities floored at ``1e-12`` (one confidently wrong example costs at most 27.6 nats
    instead of an infinite score).

    When to use it: for a *new* output layer (a head trained on other classes), where the Bayes
    posterior is underconfident. Where the source head already fits the target's classes,
    ``T = 1`` was at least as good on 5 of the transfer benchmark's 6 classification cells
    (``docs/transfer_benchmark.rst``): a few-fold CV on a handful of shots picks too cold a ``T``.

    Args:
        fit: ``(X, y) -> LinearizedLaplace``, fitted on ``(X, y)``: everything that depends
            on the training labels (a new head, ``optimize_prior``) belongs inside.
        X: training inputs ``(N, ...)``.
        y: class labels ``(N,)``: integers for ``categorical``, 0/1 for ``bernoulli``.
        temperatures: candidate ``T > 0``.
        folds: number of folds, ``2 ≤ folds ≤`` the size of the smallest class.

    Returns:
        :class:`TemperatureCV`: the chosen ``T``, the candidates and their mean held-out NLL.

    Cost: ``folds`` calls of ``fit`` plus ``folds · len(temperatures)`` refits and
    predictions on the held-out examples.

    Example:
        >>> from pyro_ntk import LinearizedLaplace
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X, y = torch.randn(30, 2), torch.arange(30) % 3
        >>> def fit(X, y):
        ...     return LinearizedLaplace(net, "categorical", variance=1.0).fit(X, y)
        >>> cv = cross_validate_temperature(fit, X, y, temperatures=(1.0, 0.1), folds=3)
        >>> cv.temperature in (1.0, 0.1), tuple(cv.nll.shape)
        (True, (2,))
    """
    where = "cross_validate_temperature"
    if not callable(fit):
        raise TypeError(f"{where}: fit must be a callable (X, y) -> LinearizedLaplace, got "
                        f"{type(fit).__name__}.")  # fmt: skip
    X, y = check_tensor(where, "X", X), check_tensor(where, "y", y)
    if (
        y.dim() != 1
        or y.shape[0] != X.shape[0]
        or y.is_floating_point()
        and not bool(((y == 0) | (y == 1)).all())
    ):
        raise ValueError(
            f"{where}: y must be (N,) = ({X.shape[0]},) class labels (integers, or 0/1), got "
            f"shape {tuple(y.shape)} and dtype {y.dtype}."
        )
    temperatures = tuple(temperatures)
    if not temperatures or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < math.inf
        for t in temperatures
    ):
        raise ValueError(
            f"{where}: temperatures must be a non-empty sequence of finite floats > 0, got "
            f"{temperatures!r}."
        )
    check_positive_int(where, "folds", folds)
    labels = y.long()
    members = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    smallest = min(len(m) for m in members)
    if not 2 <= folds <= smallest:
        raise ValueError(
            f"{where}: folds must be between 2 and the size of the smallest class ({smallest}), "
            f"got {folds}."
        )
    fold_of = torch.empty_like(labels)
    for m in members:
        fold_of[m] = torch.arange(len(m), device=m.device) % folds

    nll = torch.zeros(len(temperatures), dtype=torch.float64)
    for j in range(folds):
        held, kept = fold_of == j, fold_of != j
        la = fit(X[kept], y[kept])
        if not isinstance(la, LinearizedLaplace) or la.likelihood not in (
            "categorical",
            "bernoulli",
        ):
            raise TypeError(
                f"{where}: fit must return a LinearizedLaplace with a 'categorical' or "
                f"'bernoulli' likelihood, got {la!r}."
            )  # fmt: skip
        yh = labels[held]
        for i, T in enumerate(temperatures):
            la.temperature = float(T)
            p = la.fit(X[kept], y[kept]).predict(X[held])
            p = p.gather(-1, yh[:, None])[:, 0] if p.dim() == 2 else torch.where(yh == 1, p, 1 - p)
            nll[i] -= p.clamp_min(1e-12).log().sum().double().cpu()
    nll /= len(y)
    return TemperatureCV(float(temperatures[int(nll.argmin())]), temperatures, nll)
