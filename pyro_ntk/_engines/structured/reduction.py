r"""Per-example gradients reduced from each backward pass as it comes (no stored ``B``).

A layer whose per-example gradients are cheaper to hold than its factors
(:func:`.factors.prefer_gradients`: early convolutions, every BatchNorm) needs only

.. math::

    G_{n,o} = \sum_s B_{n,o,s} A_{n,s}^\top, \qquad b_{n,o} = \sum_s B_{n,o,s},

so each backward pass's sensitivity ``∂f_o/∂z`` is reduced against the layer input at
once and dropped: the ``O`` sensitivities of the layer, ``O`` times its output, are never
held together, nor copied into another layout. A convolution's ``∂f_o/∂z (n, C_out, *S)``
is already channel-major, so its reduction is one ``bmm``
``(n, d_out, S)·(n, S, d_in)`` per group (:func:`channel_major_grads`); a BatchNorm's is a
row-wise dot product with :math:`\hat x` (:func:`.norm.norm_gradients`).

Shapes: ``wgrad (n, O, d_out·d_in)`` in the weight's flat layout, ``bsum (n, O, d_out)``.
Cost per output: ``n·S·d_out·d_in`` multiply-adds (the layer's forward), ``n·S·d_out`` for the
bias. Memory: the two results and the layer input (patches) while the passes run.

>>> A, g = torch.randn(2, 5, 3), torch.randn(2, 4, 5)  # patches, ∂f_o/∂z (n, C_out, S)
>>> channel_major_grads(A, g.unsqueeze(1)).shape
torch.Size([2, 1, 12])
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_ntk._engines.structured import norm
from pyro_ntk._engines.structured.plan import Layer

FEW_GROUPS = 8
"""Up to this many groups, a grouped layer's gradients are one ``bmm`` per group."""


def channel_major_grads(A: Tensor, Bc: Tensor, groups: int = 1) -> Tensor:
    """Per-example weight gradients from channel-major sensitivities ``Bc (n, O, d_out, S)``.

    ``A (n, S, G·d_in)``; one ``bmm`` ``(n, O·d_out, S)·(n, S, d_in)`` for one group, one
    per group for a few groups (measured 3× faster than the ``einsum`` here), an ``einsum``
    over many groups (depthwise). Cost ``n·O·S·d_out·d_in``; out ``(n, O, d_out·d_in)``.
    """
    n, O, d_out, S = Bc.shape
    if groups == 1:
        return torch.bmm(Bc.reshape(n, O * d_out, S), A).reshape(n, O, -1)
    og, d = d_out // groups, A.shape[2] // groups
    if O == 1 and groups <= FEW_GROUPS:  # one bmm per group on views: no copy of A or B
        out = A.new_empty(n, d_out, d)
        for g in range(groups):
            rows, cols = slice(g * og, (g + 1) * og), slice(g * d, (g + 1) * d)
            out[:, rows] = torch.bmm(Bc[:, 0, rows], A[:, :, cols])
        return out.reshape(n, 1, -1)
    Bg = Bc.reshape(n, O, groups, og, S)
    Ag = A.reshape(n, S, groups, -1)
    return torch.einsum("nogjs,nsgi->nogji", Bg, Ag).reshape(n, O, -1)


class GradientSink:
    r"""Accumulates one layer's ``wgrad`` and ``bsum`` over the ``O`` backward passes.

    ``source`` is the layer's input as its gradients read it: a convolution's patches
    ``(n, S, G·d_in)``, a BatchNorm's :math:`\hat x` ``(n, C, *spatial)``.
    """

    def __init__(self, layer: Layer, source: Tensor, n: int, O: int):
        self.layer, self.source = layer, source
        d_out = layer.d_out
        self.wgrad = source.new_empty(n, O, d_out * layer.d_in) if layer.weight else None
        self.bsum = source.new_empty(n, O, d_out) if layer.bias else None

    def add(self, o: int, g: Tensor) -> None:
        """Reduce ``g = ∂f_o/∂z`` (the layer output's shape, examples in dim 0)."""
        layer, n = self.layer, g.shape[0]
        if layer.kind == "batchnorm":
            w, b = norm.norm_gradients(self.source, g)
        else:
            Bc = g.reshape(n, 1, layer.d_out, -1)
            w = (
                channel_major_grads(self.source, Bc, layer.groups)[:, 0]
                if self.wgrad is not None
                else None
            )
            b = Bc[:, 0].sum(-1) if self.bsum is not None else None
        if self.wgrad is not None:
            self.wgrad[:, o] = w
        if self.bsum is not None:
            self.bsum[:, o] = b
