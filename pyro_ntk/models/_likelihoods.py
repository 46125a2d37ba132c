r"""The GLM likelihoods of the linearized Laplace: log-density, gradient and Hessian root in f.

.. math::

    \log p(y \mid f), \qquad \nabla_f \log p(y \mid f), \qquad
    -\nabla_f^2 \log p(y \mid f) = \Lambda = L L^\top,

per example (``f`` of shape ``(n, O)``), in closed form for the ``"categorical"`` (logits),
``"bernoulli"`` (logits), ``"poisson"`` (log-rates) and ``"gaussian"`` (means, variance
``noise``) likelihoods; and the validation of targets against the likelihood.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyro_ntk._checks import check_tensor

__all__ = ["LIKELIHOODS", "check_targets"]

LIKELIHOODS = ("bernoulli", "categorical", "poisson", "gaussian")


def _log_likelihood(likelihood: str, f: Tensor, y: Tensor, noise: Tensor | None) -> Tensor:
    """Σ_n log p(y_n | f_n) for outputs ``f`` ``(n, O)``."""
    if likelihood == "categorical":
        return torch.log_softmax(f, -1).gather(-1, y.unsqueeze(-1)).sum()
    y = y.reshape(f.shape)
    if likelihood == "bernoulli":
        return -nn.functional.binary_cross_entropy_with_logits(f, y, reduction="sum")
    if likelihood == "poisson":
        return (y * f - f.exp() - torch.lgamma(y + 1)).sum()
    return (-0.5 * ((y - f).square() / noise + torch.log(2 * math.pi * noise))).sum()


def _hessian_root(likelihood: str, f: Tensor, noise: Tensor | None) -> Tensor:
    """``L_n`` with ``Λ_n = L_n L_nᵀ``, shape ``(n, O, O)``."""
    if likelihood == "categorical":
        p = torch.softmax(f, -1)
        # (diag √p − p √pᵀ)(diag √p − √p pᵀ) = diag p − p pᵀ since Σ p = 1
        return torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)
    if likelihood == "bernoulli":
        d = torch.sigmoid(f) * torch.sigmoid(-f)
    elif likelihood == "poisson":
        d = f.exp()
    else:
        d = (1 / noise).expand(f.shape)
    return torch.diag_embed(d.sqrt())


def _likelihood_grad(likelihood: str, f: Tensor, y: Tensor, noise: Tensor | None) -> Tensor:
    """∂ log p(y | f) / ∂f, shape ``(n, O)`` (closed forms, differentiable in ``f``)."""
    if likelihood == "categorical":
        onehot = nn.functional.one_hot(y, f.shape[-1]).to(f.dtype)
        return onehot - torch.softmax(f, -1)
    y = y.reshape(f.shape)
    if likelihood == "bernoulli":
        return y - torch.sigmoid(f)
    if likelihood == "poisson":
        return y - f.exp()
    return (y - f) / noise


def check_targets(where: str, likelihood: str, y: object, N: int, O: int, dtype) -> Tensor:
    """Validate targets against the likelihood; return them in the form the likelihood uses.

    Categorical: integer labels ``(N,)`` in ``[0, O)``. Bernoulli: values in ``[0, 1]``
    (labels or probabilities), ``(N,)`` for ``O = 1`` or ``(N, O)``. Poisson: non-negative
    integer counts. Gaussian: finite reals. Errors name what was given.
    """
    y = check_tensor(where, "y", y)
    shapes = [(N,)] if likelihood == "categorical" else ([(N,), (N, 1)] if O == 1 else [(N, O)])
    if tuple(y.shape) not in shapes:
        raise ValueError(
            f"{where}: y has shape {tuple(y.shape)}; expected one of {shapes} for N = {N} inputs "
            f"and O = {O} outputs with the {likelihood} likelihood."
        )
    if likelihood == "categorical":
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(
                f"{where}: categorical labels y have dtype {y.dtype}; expected integer class "
                f"labels in [0, {O}) (e.g. torch.long)."
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= O:
            raise ValueError(
                f"{where}: class labels y range over [{lo}, {hi}], outside [0, {O - 1}] for "
                f"a network with O = {O} logits."
            )
        return y.long()
    y = y.to(dtype)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{where}: y contains NaN or infinite values.")
    lo, hi = float(y.min()), float(y.max())
    if likelihood == "bernoulli" and (lo < 0 or hi > 1):
        raise ValueError(
            f"{where}: Bernoulli targets y must be labels or probabilities in [0, 1], got "
            f"values in [{lo:.4g}, {hi:.4g}]."
        )
    if likelihood == "poisson":
        if lo < 0:
            raise ValueError(
                f"{where}: Poisson counts y must be non-negative, got minimum {lo:.4g}."
            )
        if not bool((y == y.round()).all()):
            raise ValueError(f"{where}: Poisson counts y must be integers, got fractional values.")
    return y
