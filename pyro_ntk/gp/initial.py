r"""Data-aware starting values of the noise ``s²`` and the kernel variance ``σ²``.

.. math::
    v = \overline{r^2},\qquad k = \overline{\operatorname{diag} K(X, X)},\qquad
    s^2_0 = v / 10,\qquad \sigma^2_0 = v / k

with ``r = y - m(X)`` the targets' residuals about the network and ``K`` the kernel at
``σ² = 1``. The prior variance ``σ² k`` of ``f`` then matches the residuals' mean square and
the noise starts at a tenth of it: a start on the data's scale, from which the marginal
likelihood's optimum is a few steps away. Cost ``O(N·O)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["initial_hyperparameters"]


def initial_hyperparameters(residual: Tensor, kernel_diag: Tensor) -> tuple[float, float]:
    r"""``(s², σ²) = (v / 10, v / k)`` with ``v = mean(r²)`` and ``k = mean(diag K)``.

    Args:
        residual: ``r = y - m(X)``, any shape (its ``N·O`` entries are averaged).
        kernel_diag: ``diag K(X, X)`` at ``σ² = 1``, any shape (``N·O`` entries).

    Returns:
        ``(noise, variance)`` as python floats; ``(1.0, 1.0)`` when ``v`` or ``k`` is ``0`` or
        not finite (no scale to read from the data). Cost ``O(N·O)``.

    Example:
        >>> r = torch.tensor([1.0, -1.0, 2.0, -2.0])   # mean r² = 2.5
        >>> initial_hyperparameters(r, torch.full((4,), 0.5))
        (0.25, 5.0)
        >>> initial_hyperparameters(torch.zeros(4), torch.ones(4))
        (1.0, 1.0)
    """
    with torch.no_grad():
        v = float(residual.detach().to(torch.float64).square().mean()) if residual.numel() else 0.0
        k = float(kernel_diag.detach().to(torch.float64).mean()) if kernel_diag.numel() else 0.0
    if not (math.isfinite(v) and math.isfinite(k)) or v <= 0.0 or k <= 0.0:
        return 1.0, 1.0
    return v / 10.0, v / k
