r"""The dense kernel of the factored layers: the cheaper of two routes per layer.

For a layer with factors ``A (n, S, G·d_in)`` and ``B (n, O, S, d_out)`` (:mod:`.factors`;
``G`` groups, ``P_W = d_out·d_in`` weights), the weight block of the kernel is

.. math::

    K_W[(n,o),(m,p)] = \sum_g \sum_{s,s'} (A^g_{n,s} \cdot A^g_{m,s'})\,
                       (B^g_{n,o,s} \cdot B^g_{m,p,s'})
                     = \sum_g \big\langle \textstyle\sum_s B^g_{n,o,s} A^{g\top}_{n,s},\;
                       \sum_{s'} B^g_{m,p,s'} A^{g\top}_{m,s'} \big\rangle ,

and the bias block is :math:`(\sum_s B_{n,o,s}) \cdot (\sum_{s'} B_{m,p,s'})`. Two routes:

- **patch Gram** (left form): the patch and sensitivity Grams, multiplied and summed over
  position pairs, no Jacobian. Multiply-adds per example pair
  ``S²·(G·d_in + O²·d_out + G·O²)``; memory ``O²·S²`` per pair (blocked, see
  :data:`~pyro_ntk._engines.structured.blocks.BLOCK_ELEMENTS`).
- **Jacobian contraction** (right form): per-example weight gradients
  ``Σ_s B_s A_sᵀ`` (``O·S·P_W`` each, unless the factors already hold them), then their
  Gram, ``O²·P_W`` per pair.

:func:`choose_route` takes the patch Gram when

.. math::

    S^2 (G d_{in} + O^2 d_{out} + G O^2) \;<\; O^2 P_W
        + \frac{n_1 + n_2}{n_1 n_2}\, O\, S\, P_W

(the second term only when the gradients are not held already): plain Linear layers
(``S = 1``) and convolutions on small feature maps take the patch Gram, early
convolutions with many positions the contraction. ``benchmarks/bench_conv.py`` times
both routes per layer of a ResNet-style network against this rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_ntk._engines.structured import embedding as emb
from pyro_ntk._engines.structured.blocks import pair_blocks
from pyro_ntk._engines.structured.factors import Factors
from pyro_ntk._engines.structured.plan import Layer, Plan


def patch_gram_flops(S: int, width: int, d_out: int, O: int, groups: int) -> int:
    """Multiply-adds per example pair of the patch-Gram route (``width = G·d_in``)."""
    return S * S * (width + O * O * d_out + groups * O * O)


def contraction_flops(S: int, P_W: int, O: int, n1: int, n2: int, formed: bool) -> float:
    """Multiply-adds per example pair of the Jacobian-contraction route."""
    form = 0.0 if formed else (n1 + n2) / (n1 * n2) * O * S * P_W
    return O * O * P_W + form


def choose_route(layer: Layer, S: int, O: int, n1: int, n2: int) -> str:
    """``"patch"`` or ``"contraction"``: the route of fewer multiply-adds for this layer."""
    patch = patch_gram_flops(S, layer.in_width, layer.d_out, O, layer.groups)
    contraction = contraction_flops(S, layer.d_out * layer.d_in, O, n1, n2, formed=False)
    return "patch" if patch < contraction else "contraction"


def patch_gram(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor, groups: int) -> Tensor:
    r"""``Σ_g Σ_{s,s'} (A1 A2ᵀ)_g ⊙ (B1 B2ᵀ)_g``, shape ``(n1·O, n2·O)``, no Jacobian.

    ``A (n, S, G·d_in)``, ``B (n, O, S, d_out)``. Computed over example blocks so that one
    block's sensitivity Gram holds at most
    :data:`~pyro_ntk._engines.structured.blocks.BLOCK_ELEMENTS` elements.

    >>> A, B = torch.randn(3, 4, 6), torch.randn(3, 2, 4, 5)
    >>> G = torch.einsum("nosj,nsi->noji", B, A).reshape(6, -1)
    >>> bool(torch.allclose(patch_gram(A, B, A, B, 1), G @ G.T, atol=1e-4))
    True
    """
    n1, O, S, d_out = B1.shape
    n2 = B2.shape[0]
    og, d = d_out // groups, A1.shape[2] // groups
    K = A1.new_zeros(n1, O, n2, O)
    A1g, A2g = A1.reshape(n1, S, groups, d), A2.reshape(n2, S, groups, d)
    B1g, B2g = B1.reshape(n1, O, S, groups, og), B2.reshape(n2, O, S, groups, og)
    for r, c in pair_blocks(n1, n2, O * O * S * S):
        m1, m2 = r.stop - r.start, c.stop - c.start
        for g in range(groups):
            a1 = A1g[r, :, g].reshape(m1 * S, d)
            a2 = A2g[c, :, g].reshape(m2 * S, d)
            AA = (a1 @ a2.T).reshape(m1, S, m2, S)
            bb1 = B1g[r, :, :, g].reshape(m1 * O * S, og)
            bb2 = B2g[c, :, :, g].reshape(m2 * O * S, og)
            BB = (bb1 @ bb2.T).reshape(m1, O, S, m2, O, S)
            K[r, :, c] += torch.einsum("nsmt,nosmpt->nomp", AA, BB)
    return K.reshape(n1 * O, n2 * O)


def _linear_block(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor, layer: Layer, sw, sb):
    """``(σ_W² A1 A2ᵀ + σ_b²) ⊙ (B1 B2ᵀ)``: one position, one group."""
    n1, O, _, d_out = B1.shape
    n2 = B2.shape[0]
    BB = (B1.reshape(n1 * O, d_out) @ B2.reshape(n2 * O, d_out).T).reshape(n1, O, n2, O)
    coef = 0.0
    if layer.weight is not None:
        coef = sw * (A1.reshape(n1, -1) @ A2.reshape(n2, -1).T)
    if layer.bias is not None:
        coef = coef + sb
    part = BB * (coef[:, None, :, None] if isinstance(coef, Tensor) else coef)
    return part.reshape(n1 * O, n2 * O)


def layers_block(
    plan: Plan, f1: Factors, f2: Factors, scales: list[tuple], route: str | None = None
) -> Tensor | None:
    """``Σ_l J_l(X1) S_l J_l(X2)ᵀ``, ``(n1·O, n2·O)`` (``None``: no layer).

    Per layer the route of :func:`choose_route` (``route`` forces ``"patch"`` wherever the
    factors are held, or ``"contraction"`` everywhere; ``plan.patch_gram = False`` turns
    the patch Gram off); layers holding per-example gradients instead of factors contract
    them.
    """
    K = None
    allowed = plan.patch_gram and route != "contraction"
    for i, (layer, (sw, sb)) in enumerate(zip(plan.layers, scales)):
        A1, B1, A2, B2 = f1.A[i], f1.B[i], f2.A[i], f2.B[i]
        if f1.index[i] is not None:  # an Embedding: the Gram by token equality
            pad = layer.module.padding_idx
            part = sw * emb.embedding_gram(f1.index[i], B1, f2.index[i], B2, pad)
            K = part if K is None else K + part
            continue
        factored = allowed and A1 is not None and A2 is not None
        if factored and A1.shape[1] == 1 and layer.groups == 1:
            part = _linear_block(A1, B1, A2, B2, layer, sw, sb)
        else:
            chosen = "contraction"
            if factored and layer.weight is not None:
                n1, O, S, _ = B1.shape
                chosen = route or choose_route(layer, S, O, n1, B2.shape[0])
            part = 0.0
            if layer.weight is not None and chosen == "patch":
                part = sw * patch_gram(A1, B1, A2, B2, layer.groups)
            elif layer.weight is not None:
                G1 = f1.wgrad(i)
                G1 = G1.reshape(-1, G1.shape[2])
                G2 = G1 if f2 is f1 else f2.wgrad(i).reshape(-1, G1.shape[1])
                part = sw * (G1 @ G2.T)
            if layer.bias is not None:
                b1 = f1.bsum(i)
                b1 = b1.reshape(-1, b1.shape[2])
                part = part + sb * (b1 @ f2.bsum(i).reshape(-1, b1.shape[1]).T)
        K = part if K is None else K + part
    return K
