r"""BatchNorm in eval mode as a factored per-channel diagonal layer.

In eval mode ``nn.BatchNorm1d/2d/3d`` applies fixed running statistics, so per channel
:math:`c` and position :math:`s` it is a diagonal affine layer of the normalized input

.. math::

    y_{s,c} = \gamma_c \hat x_{s,c} + \beta_c, \qquad
    \hat x_{s,c} = (x_{s,c} - \mu_c) / \sqrt{v_c + \epsilon},

and with the output sensitivity :math:`B_{n,o,s,c} = \partial f_o(x_n)/\partial y_{n,s,c}`
its per-example gradients are

.. math::

    \frac{\partial f_o(x_n)}{\partial \gamma_c} = \sum_s B_{n,o,s,c}\, \hat x_{n,s,c}, \qquad
    \frac{\partial f_o(x_n)}{\partial \beta_c} = \sum_s B_{n,o,s,c}.

That is a depthwise ``1×1`` layer (``groups = C``, one input per group), whose per-example
gradients are always cheaper to hold than its factors (:func:`.factors.prefer_gradients`:
``O·C`` numbers per example against ``S·C·(1 + O)``), so the engine keeps
``(n, O, C)`` for ``γ`` and for ``β``, reduced from each backward pass as it comes: no
sensitivity of the layer is stored. Every product then reads them as any held gradient
(``J V = G V``, ``Jᵀ U = Gᵀ U``, the dense block ``G₁ G₂ᵀ``, the diagonal ``Σ G²``).

Shapes: the input ``(n, C)`` or ``(n, C, *spatial)`` with examples in dim 0. Cost: one
elementwise pass for :math:`\hat x` in the forward hook, then ``2·n·C·S`` multiply-adds per
output for the two reductions. Memory: ``n·C·S`` for :math:`\hat x` while the factors are
built, ``2·n·O·C`` kept.

A BatchNorm that uses batch statistics (train mode, or ``track_running_stats=False``)
makes the examples interact and has no such factorization; it is demoted to the generic
route with that reason, as is a BatchNorm subclass with its own ``forward``. ``affine=False``
has no parameter to factor: it is an ordinary fixed function of the network.

>>> bn = nn.BatchNorm2d(3).eval()
>>> x, g = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
>>> wg, bs = norm_gradients(normalized(bn, x), g)
>>> wg.shape, bs.shape
(torch.Size([2, 3]), torch.Size([2, 3]))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

STOCK = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def norm_kind(m: nn.Module) -> tuple[str | None, str | None]:
    """``("batchnorm", None)`` for a stock BatchNorm, ``(None, reason)`` for one that is not.

    ``(None, None)`` for any other module. A BatchNorm is stock when it is a
    ``BatchNorm1d/2d/3d`` (or a subclass) that keeps ``_BatchNorm.forward``; with
    ``track_running_stats=False`` it normalizes by batch statistics and is not factored.
    """
    if not isinstance(m, _BatchNorm):
        return None, None
    if not isinstance(m, STOCK) or type(m).forward is not _BatchNorm.forward:
        return None, f"a {type(m).__name__} whose forward is not the stock BatchNorm one"
    if not m.track_running_stats:
        return None, "a BatchNorm without running statistics (track_running_stats=False)"
    return "batchnorm", None


def eval_problem(m: nn.Module) -> str | None:
    """Why a BatchNorm, as it runs now, is not the fixed affine map (``None``: it is)."""
    if m.training:
        return "a BatchNorm in train mode (batch statistics)"
    if m.running_mean is None or m.running_var is None:
        return "a BatchNorm without running statistics (batch statistics)"
    return None


def normalized(m: nn.Module, x: Tensor) -> Tensor:
    r""":math:`\hat x = (x - \mu) / \sqrt{v + \epsilon}` with the running statistics, channels in dim 1.

    ``x (n, C, *spatial)``; same shape out, detached. Cost ``2·x.numel()``.
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = m.running_mean.detach().reshape(shape)
    scale = torch.rsqrt(m.running_var.detach() + m.eps).reshape(shape)
    return (x.detach() - mean) * scale


def norm_gradients(xhat: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(Σ_s g x̂, Σ_s g)`` per example and channel, each ``(n, C)``, for one output.

    ``xhat`` and ``g = ∂f_o/∂y`` are ``(n, C, *spatial)``; the reductions stream over the
    positions (``linalg.vecdot``: no temporary of the activation's size).
    """
    n, C = g.shape[:2]
    if g.dim() == 2:
        return g * xhat, g
    g2, x2 = g.reshape(n, C, -1), xhat.reshape(n, C, -1)
    return torch.linalg.vecdot(g2, x2), g2.sum(-1)
