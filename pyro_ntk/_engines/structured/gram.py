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

A third route applies where the sensitivities are rank one per (example, channel), which
is proven on every pair of chunks, never assumed: the **channel-separable Gram** of
:mod:`.separable`, ``P_l + O²·d_out`` multiply-adds per pair instead of ``O²·P_W``
(layers that reach the outputs only through channel-wise maps and a final Linear layer);
layers sharing their sensitivity directions share one channel contraction.

All layers add into one ``(n1·O, n2·O)`` buffer (:class:`GramSum`). When ``X2`` is ``X1``
only its upper triangle is computed, by the recursive blocks of
:func:`~pyro_ntk._engines.structured.blocks.add_gram` (about ``0.56·(n·O)²·P`` multiply-adds
instead of ``(n·O)²·P``), then mirrored: the result is exactly symmetric. Narrow gradient
matrices (biases, BatchNorm, small convolutions) are contracted side by side in one GEMM;
a layer holding its factors forms its gradients one block of input columns at a time
(:func:`blocked_gram`, a workspace no larger than the block being built, or
:data:`WORK_ELEMENTS` floats), never the whole ``(n·O, P_W)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_ntk._engines.structured import embedding as emb
from pyro_ntk._engines.structured.blocks import add_gram, mirror_upper, pair_blocks
from pyro_ntk._engines.structured.factors import Factors
from pyro_ntk._engines.structured.plan import Layer, Plan
from pyro_ntk._engines.structured.separable_layers import SeparableLayers

NARROW = 1024
"""Gradient matrices with fewer columns are contracted together, one GEMM per scale."""

WORK_ELEMENTS = 1 << 23
"""Elements of one column block of a layer's per-example gradients (32 MiB in float32) when
the block being built is smaller; otherwise up to that block's size."""


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


def patch_gram(
    A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor, groups: int, symmetric: bool = False
) -> Tensor:
    r"""``Σ_g Σ_{s,s'} (A1 A2ᵀ)_g ⊙ (B1 B2ᵀ)_g``, shape ``(n1·O, n2·O)``, no Jacobian.

    ``A (n, S, G·d_in)``, ``B (n, O, S, d_out)``. Computed over example blocks so that one
    block's sensitivity Gram holds at most
    :data:`~pyro_ntk._engines.structured.blocks.BLOCK_ELEMENTS` elements. ``symmetric``
    (the same factors on both sides): the blocks wholly below the diagonal are skipped
    and left zero; every entry on or above the diagonal is complete (see
    :func:`~pyro_ntk._engines.structured.blocks.mirror_upper`).

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
        if symmetric and c.stop <= r.start:
            continue
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


def _blocked(layer: Layer, A1: Tensor | None, A2: Tensor | None, alpha) -> bool:
    """Whether :func:`blocked_gram` takes this layer: factors held, one group, wide, a fixed scale."""
    return (
        A1 is not None
        and A2 is not None
        and layer.groups == 1
        and layer.d_out * layer.d_in >= NARROW
        and not (isinstance(alpha, Tensor) and alpha.requires_grad)
    )


class GramSum:
    r"""``K = Σ_l α_l G1_l G2_lᵀ + Σ parts``, accumulated in one ``(m1, m2)`` buffer.

    Wide gradient matrices (at least :data:`NARROW` columns) go straight into ``K`` by
    :func:`~.blocks.add_gram` (half the work when ``symmetric``); narrow ones (biases,
    BatchNorm, small convolutions) are put side by side per scale ``α`` and contracted in
    one GEMM at :meth:`result`, which also mirrors the upper triangle when ``symmetric``.

    >>> G, H = torch.randn(6, 3), torch.randn(6, 2000)
    >>> acc = GramSum(symmetric=True)
    >>> acc.gram(G, G, 2.0); acc.gram(H, H, 2.0); acc.add(torch.eye(6))
    >>> K = 2.0 * (G @ G.T + H @ H.T) + torch.eye(6)
    >>> bool(torch.allclose(acc.result(), K, rtol=1e-5, atol=1e-3))
    True
    """

    def __init__(self, symmetric: bool):
        self.symmetric = symmetric
        self.K: Tensor | None = None
        self.narrow: dict[float, tuple[list[Tensor], list[Tensor]]] = {}

    def buffer(self, m1: int, m2: int, like: Tensor) -> Tensor:
        """The ``(m1, m2)`` buffer that everything is added into (zeros when first asked)."""
        if self.K is None:
            self.K = like.new_zeros(m1, m2)
        return self.K

    def add(self, part: Tensor) -> None:
        """``K += part`` (a complete ``(m1, m2)`` block, or its upper triangle when symmetric)."""
        self.buffer(*part.shape, part).add_(part)

    def gram(self, G1: Tensor, G2: Tensor, alpha) -> None:
        """``K += α G1 G2ᵀ``; ``G1 (m1, P)``, ``G2 (m2, P)`` (``G2`` is ``G1`` when symmetric).

        An ``α`` that requires grad (a learned variance) multiplies the product out of
        place, so that ``K`` stays differentiable in it.
        """
        if isinstance(alpha, Tensor) and alpha.requires_grad:
            part = G1.new_zeros(G1.shape[0], G2.shape[0])
            add_gram(part, G1, G2, 1.0, self.symmetric)
            self.add(alpha * part)
            return
        alpha = float(alpha)
        if G1.shape[1] < NARROW:
            one, two = self.narrow.setdefault(alpha, ([], []))
            one.append(G1)
            two.append(G2)
            return
        K = self.buffer(G1.shape[0], G2.shape[0], G1)
        add_gram(K, G1, G2, alpha, self.symmetric)

    def gram_now(self, G1: Tensor, G2: Tensor, alpha: float) -> None:
        """``K += α G1 G2ᵀ`` at once (``G1``, ``G2`` may be overwritten after the call)."""
        add_gram(self.buffer(G1.shape[0], G2.shape[0], G1), G1, G2, alpha, self.symmetric)

    def result(self) -> Tensor | None:
        """The accumulated ``K`` (``None``: nothing was added)."""
        for alpha, (one, two) in self.narrow.items():
            G1 = torch.cat(one, dim=1) if len(one) > 1 else one[0]
            G2 = G1 if self.symmetric else (torch.cat(two, dim=1) if len(two) > 1 else two[0])
            K = self.buffer(G1.shape[0], G2.shape[0], G1)
            add_gram(K, G1, G2, alpha, self.symmetric)
        self.narrow = {}
        if self.symmetric and self.K is not None:
            mirror_upper(self.K)
        return self.K


def blocked_gram(
    acc: GramSum, A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor, alpha: float
) -> None:
    r"""``acc += α G1 G2ᵀ``, ``G = Σ_s B_s A_sᵀ`` formed one block of input columns at a time.

    ``A (n, S, d_in)``, ``B (n, O, S, d_out)``, one group. The columns ``(j, i)`` of ``G``
    with ``i`` in a block ``C`` of ``A``'s columns are one ``bmm``
    ``(n, O·d_out, S)·(n, S, |C|)`` into a workspace reused from block to block; the Grams of
    the blocks sum to the whole (they partition ``G``'s columns). Same multiply-adds as
    forming ``G`` whole (``n·O·S·d_out·d_in``, then the Gram's), in
    ``n·O·d_out·|C| ≤ max(``:data:`WORK_ELEMENTS`\ ``, n1·n2·O²)`` floats (at most the size
    of the block being built, or 32 MiB) instead of ``n·O·d_out·d_in``, and no freshly
    allocated ``G`` to page in at every call. Wide blocks keep the ``bmm`` efficient: at
    ``n = 512``, ``O = 10``, ``d_out = 64`` the 32 MiB bound alone gives 25 columns a block,
    whose ``bmm`` ran at 65·10⁹ flop/s against 141·10⁹ for 96 (this 2-core CPU).
    """
    n1, O, S, d_out = B1.shape
    n2, d_in = B2.shape[0], A1.shape[2]
    same = acc.symmetric
    rows = max(n1, n2) * O * d_out
    budget = max(WORK_ELEMENTS, n1 * n2 * O * O)  # never more than the block being built
    width = min(d_in, max(budget // rows, -(-NARROW // d_out), 1))
    Bc1 = B1.permute(0, 1, 3, 2).reshape(n1, O * d_out, S)
    Bc2 = Bc1 if same else B2.permute(0, 1, 3, 2).reshape(n2, O * d_out, S)
    work1 = A1.new_empty(n1 * O * d_out * width)
    work2 = work1 if same else A2.new_empty(n2 * O * d_out * width)
    for i in range(0, d_in, width):
        w = min(width, d_in - i)
        G1 = torch.bmm(Bc1, A1[:, :, i : i + w], out=work1[: n1 * O * d_out * w].view(n1, -1, w))
        G2 = G1
        if not same:
            G2 = torch.bmm(
                Bc2, A2[:, :, i : i + w], out=work2[: n2 * O * d_out * w].view(n2, -1, w)
            )
        acc.gram_now(G1.view(n1 * O, d_out * w), G2.view(n2 * O, d_out * w), alpha)


def general_flops(layer: Layer, f1: Factors, i: int, n1: int, n2: int, patch: bool) -> float:
    """Multiply-adds per example pair of layer ``i``'s general route (bias included)."""
    B, G = f1.B[i], f1.wgrads[i] if f1.wgrads[i] is not None else f1.bsums[i]
    O = (B if B is not None else G).shape[1]
    P_W = layer.d_out * layer.d_in
    bias = O * O * layer.d_out if layer.bias is not None else 0
    if layer.weight is None:
        return bias
    if B is None:
        return contraction_flops(1, P_W, O, n1, n2, formed=True) + bias
    S = B.shape[2]
    best = contraction_flops(S, P_W, O, n1, n2, formed=False)
    if patch:
        best = min(best, patch_gram_flops(S, layer.in_width, layer.d_out, O, layer.groups))
    return best + bias


def _rows(f: Factors, i: int) -> int:
    held = [t for t in (f.B[i], f.wgrads[i], f.bsums[i]) if t is not None]
    return held[0].shape[0] if held else 0


def layers_block(
    plan: Plan,
    f1: Factors,
    f2: Factors,
    scales: list[tuple],
    route: str | None = None,
    separable: SeparableLayers | None = None,
) -> Tensor | None:
    """``Σ_l J_l(X1) S_l J_l(X2)ᵀ``, ``(n1·O, n2·O)`` (``None``: no layer).

    Per layer the route of :func:`choose_route` (``route`` forces ``"patch"`` wherever the
    factors are held, or ``"contraction"`` everywhere; ``plan.patch_gram = False`` turns
    the patch Gram off); layers holding per-example gradients instead of factors contract
    them. With ``separable`` (and no forced ``route``), its candidate layers whose chunks
    pass the rank-one test take the channel-separable Gram when it is cheaper
    (:mod:`.separable`). When ``f2 is f1`` (``X2`` is ``X1``) only the upper triangle is
    computed and then mirrored (:class:`GramSum`): the result is exactly symmetric.
    """
    same = f2 is f1
    acc = GramSum(symmetric=same)
    allowed = plan.patch_gram and route != "contraction"
    members = []  # layers taking the channel-separable Gram in this block
    for i, (layer, (sw, sb)) in enumerate(zip(plan.layers, scales)):
        A1, B1, A2, B2 = f1.A[i], f1.B[i], f2.A[i], f2.B[i]
        if f1.index[i] is not None:  # an Embedding: the Gram by token equality
            pad = layer.module.padding_idx
            acc.add(sw * emb.embedding_gram(f1.index[i], B1, f2.index[i], B2, pad))
            continue
        if separable is not None and route is None and layer.module_name in separable.candidates:
            n1, n2 = _rows(f1, i), _rows(f2, i)
            other = general_flops(layer, f1, i, n1, n2, allowed)
            member = separable.member(layer, i, f1, f2, (sw, sb), other)
            if member is not None:
                members.append(member)
                continue
        factored = allowed and A1 is not None and A2 is not None
        if factored and A1.shape[1] == 1 and layer.groups == 1:
            acc.add(_linear_block(A1, B1, A2, B2, layer, sw, sb))
            continue
        chosen = "contraction"
        if factored and layer.weight is not None:
            n1, O, S, _ = B1.shape
            chosen = route or choose_route(layer, S, O, n1, B2.shape[0])
        if layer.weight is not None and chosen == "patch":
            acc.add(sw * patch_gram(A1, B1, A2, B2, layer.groups, same))
        elif layer.weight is not None and _blocked(layer, A1, A2, sw):
            blocked_gram(acc, A1, B1, A2, B2, float(sw))
        elif layer.weight is not None:
            G1 = f1.wgrad(i)
            G1 = G1.reshape(-1, G1.shape[2])
            G2 = G1 if same else f2.wgrad(i).reshape(-1, G1.shape[1])
            acc.gram(G1, G2, sw)
        if layer.bias is not None:
            b1 = f1.bsum(i)
            b1 = b1.reshape(-1, b1.shape[2])
            b2 = b1 if same else f2.bsum(i).reshape(-1, b1.shape[1])
            acc.gram(b1, b2, sb)
    if members:
        (n1, O, _), n2 = members[0].s1.a.shape, members[0].s2.a.shape[0]
        separable.gram(members, acc.buffer(n1 * O, n2 * O, members[0].s1.a), same)
    return acc.result()
