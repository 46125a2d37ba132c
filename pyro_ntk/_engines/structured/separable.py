r"""The channel-separable dense Gram: sensitivities of rank one per (example, channel).

For a layer with input rows ``A_n (S, d_in)`` (a convolution's patches) and sensitivities
``B[n, o, s, c] = ∂f_o(x_n)/∂z[n, s, c]`` (outputs ``o``, positions ``s``, output channels
``c``), the per-example weight gradient is :math:`G_{n,o}[c,:] = \sum_s B[n,o,s,c]\,A_n[s,:]`.
When every ``(n, c)`` slice ``B[n, :, :, c]`` (``O × S``) is rank one,

.. math::

    B[n,o,s,c] = a[n,o,c]\,D[n,s,c] \;\Rightarrow\;
    G_{n,o}[c,:] = a[n,o,c]\,H_n[c,:],\quad H_n[c,:] = \sum_s D[n,s,c]\,A_n[s,:],

    K_l[(n,o),(m,p)] = \sum_c a[n,o,c]\,a[m,p,c]\,
        \big(\sigma_W^2 \langle H_n[c,:], H_m[c,:]\rangle + \sigma_b^2\, h_n[c]\, h_m[c]\big),

with :math:`h_n[c] = \sum_s D[n,s,c]` for the bias. This holds when ``z`` reaches the
outputs only through channel-wise maps (BatchNorm in eval mode, ReLU, residual adds, global
average pooling) and a final Linear layer: ``a[n, o, c]`` is ``W[o, c]`` up to a factor.
Nothing about the graph is assumed: :func:`from_factors` tests it on the batch at hand. Per
``(n, c)`` it takes the row of largest norm as ``D``, projects the other rows on it
(``a``), and accepts when the residual satisfies
``‖B[n,:,:,c] − a ⊗ D‖_F ≤ tol·‖B[n,:,:,c]‖_F`` with ``tol = 256·eps`` of the dtype
(at most 1e-4: :func:`tolerance`). A layer that holds per-example gradients ``(n, O, C·d_in)`` instead of
``A, B`` is tested on ``G[n, :, c, :]`` (``O × d_in``, the bias column appended) the same way
(:func:`from_gradients`).

Why ``256·eps``: a product of channel-wise factors has each entry of ``B`` rounded a few
times, so a truly separable ``B`` has a relative residual of a few ``eps`` (5.5 ``eps``
measured on ``bench_engine.resnet_small``, float32 and float64); layers that are not
separable measured 0.3–0.9. An accepted residual ``r`` changes ``G[n, :, c, :]`` by at most
``r·‖A_n‖₂``, i.e. ``256·eps·‖B[n,:,:,c]‖_F ‖A_n‖₂``: the rounding bound of forming ``G`` by
the contraction route's own sum over ``S = 256`` positions.

Shapes (:class:`Separated`): ``a (n, O, C)``, ``H (C, n, d_in)`` (``None``: weight not
linearized), ``h (C, n)`` (``None``: no bias). Cost: the test and ``H`` take about
``n·S·C·(3·O + d_in)`` multiply-adds per chunk, the Gram ``n1·n2·(P_l + O²·C)``
(:func:`separable_flops`) instead of ``n1·n2·O²·P_l`` for Jacobian contraction (85× fewer
for the last 3×3 convolution of ``resnet_small``, ``C = 64``, ``O = 10``); memory
``n·C·d_in`` and a workspace of :data:`WORK_ELEMENTS`.

**Shared contractions.** Layers on the same channel-wise path to the outputs (a
convolution, the BatchNorm after it, the skip branch added to it) have the same direction
``a[n, :, c]`` up to a factor ``λ[n, c]``; :func:`share_directions` tests this on both chunks
(:func:`direction`, the same ``256·eps`` bound) and :func:`channel_gram` then sums their
per-channel Grams before the one contraction with ``a`` that costs most of the time
(``n1·n2·O·C`` multiply-adds and a ``T`` of that size per layer otherwise).
Which layers take the route is decided and recorded by :mod:`.separable_layers`.

>>> a, D, A = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 6)
>>> B = a[:, :, None, :] * D[:, None]  # (n, O, S, C), rank one per (n, c)
>>> s = from_factors(A, B, groups=1, weight=True, bias=False)
>>> G = torch.einsum("nosc,nsi->noci", B, A).reshape(6, -1)
>>> K = separable_gram(s, s, 1.0, 0.0, symmetric=False)
>>> bool(s.residual < 1e-5 and torch.allclose(K, G @ G.T, atol=1e-4))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_ntk._engines.structured.blocks import pair_blocks
from pyro_ntk._engines.structured.factors import Factors
from pyro_ntk._engines.structured.plan import Layer

WORK_ELEMENTS = 1 << 21
"""Most elements of one block's intermediate ``T`` (8 MiB in float32), in a reused workspace."""

RESIDUAL_EPS = 256
"""The rank-one test accepts a relative residual of this many machine epsilons."""


def tolerance(dtype: torch.dtype) -> float:
    """Relative residual accepted by the rank-one test in ``dtype``: ``256·eps``, at most 1e-4.

    The cap keeps the test meaningful in half precision (``256·eps`` is 0.25 in float16,
    2 in bfloat16, where any slice would pass): there it accepts only a few ``eps`` of
    residual, and most layers take the general route.
    """
    return min(RESIDUAL_EPS * torch.finfo(dtype).eps, 1e-4)


@dataclass
class Separated:
    """One chunk's separable form of a layer: ``G_{n,o}[c, :] = a[n,o,c]·[H_n[c,:] | h_n[c]]``."""

    a: Tensor  # (n, O, C)
    H: Tensor | None  # (C, n, d_in), channel-major for the per-channel Grams
    h: Tensor | None  # (C, n)
    residual: float  # max over (n, c) of ‖M − a ⊗ D‖_F / ‖M‖_F


def rank_one(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-one split of each ``O × L`` slice of ``M (k, O, L)``, contiguous.

    ``D (k, L)`` is the row of largest norm of each slice, ``a (k, O)`` the projections of
    the rows on it, and the relative residual ``‖M − a ⊗ D‖_F / ‖M‖_F`` per slice (``k``;
    0 for a zero slice). Cost: two batched matrix-vector products and three passes over
    ``M``; one temporary of its size.
    """
    k, O, L = M.shape
    norms = torch.linalg.vector_norm(M, dim=2)
    pivot = norms.argmax(1)
    D = M.gather(1, pivot[:, None, None].expand(k, 1, L))  # (k, 1, L)
    dd = D.square().sum(2, keepdim=True)
    a = torch.bmm(M, D.transpose(1, 2)) / torch.where(dd > 0, dd, torch.ones_like(dd))
    resid = torch.linalg.vector_norm(torch.baddbmm(M, a, D, alpha=-1).view(k, -1), dim=1)
    total = torch.linalg.vector_norm(norms, dim=1)
    rel = resid / torch.where(total > 0, total, torch.ones_like(total))
    return a.view(k, O), D.view(k, L), rel


def from_factors(A: Tensor, B: Tensor, groups: int, weight: bool, bias: bool) -> Separated:
    """The separable form from ``A (n, S, G·d_in)`` and ``B (n, O, S, C)``; the test reads ``B``."""
    n, O, S, C = B.shape
    M = B.permute(0, 3, 1, 2).reshape(n * C, O, S)  # slices (O, S) per (n, c)
    a, D, rel = rank_one(M)
    D = D.view(n, C, S)
    H = None
    if weight:
        if groups == 1:
            H = torch.bmm(D, A)  # (n, C, d_in)
        else:
            d = A.shape[2] // groups
            Dg, Ag = D.view(n, groups, C // groups, S), A.reshape(n, S, groups, d)
            H = torch.einsum("ngjs,nsgi->ngji", Dg, Ag).reshape(n, C, d)
    h = D.sum(2) if bias else None
    return _separated(a.view(n, C, O).transpose(1, 2), H, h, rel)


def from_gradients(wgrad: Tensor | None, bsum: Tensor | None, C: int) -> Separated:
    """The separable form from held gradients ``wgrad (n, O, C·d_in)``, ``bsum (n, O, C)``.

    The test reads ``[G[n, :, c, :] | b[n, :, c]]`` (``O × (d_in + 1)``) per ``(n, c)``.
    """
    held = wgrad if wgrad is not None else bsum
    n, O = held.shape[:2]
    d = 0 if wgrad is None else wgrad.shape[2] // C
    w = d + (bsum is not None)
    M = held.new_empty(n, C, O, w)  # slices (O, w) per (n, c)
    if wgrad is not None:
        M[..., :d] = wgrad.view(n, O, C, d).transpose(1, 2)
    if bsum is not None:
        M[..., d] = bsum.transpose(1, 2)
    a, D, rel = rank_one(M.view(n * C, O, w))
    D = D.view(n, C, w)
    H = None if wgrad is None else D[..., :d]
    h = None if bsum is None else D[..., d]
    return _separated(a.view(n, C, O).transpose(1, 2), H, h, rel)


def _separated(a: Tensor, H: Tensor | None, h: Tensor | None, rel: Tensor) -> Separated:
    return Separated(
        a=a.contiguous(),
        H=None if H is None else H.transpose(0, 1).contiguous(),
        h=None if h is None else h.T.contiguous(),
        residual=float(rel.max()) if rel.numel() else 0.0,
    )


def separable_flops(C: int, width: int, O: int) -> int:
    """Multiply-adds per example pair of the separable Gram (``width`` = weight columns + bias)."""
    return C * width + O * O * C


def separable_gram(s1: Separated, s2: Separated, sw, sb, symmetric: bool) -> Tensor:
    r"""``K_l (n1·O, n2·O)`` of the separable forms ``s1``, ``s2`` (module docstring).

    Per block of example pairs (:func:`~.blocks.pair_blocks`, at most :data:`WORK_ELEMENTS`
    of ``T``) the per-channel Grams ``M[c] = σ_W² H1[c] H2[c]ᵀ + σ_b² h1[c] h2[c]ᵀ`` (one
    ``bmm``), then ``T[n,c,m,p] = M[c,n,m] a2[m,p,c]`` into a reused workspace and
    ``K[n,o,(m,p)] = Σ_c a1[n,o,c] T[n,c,(m,p)]`` (one ``bmm`` over ``n``). ``symmetric``
    (``s2`` is ``s1``): blocks wholly below the diagonal are skipped and left zero, as in
    :func:`~.gram.patch_gram`.
    """
    n1, O, _ = s1.a.shape
    K = s1.a.new_zeros(n1, O, s2.a.shape[0], O)
    channel_gram([Member(s1, s2, sw, sb)], K, symmetric)
    return K.reshape(n1 * O, -1)


@dataclass
class Member:
    """One layer's separable forms on the two chunks, its scales, and its factor ``λ``.

    ``lam1 (n1, C)``, ``lam2 (n2, C)``: ``a ≈ λ·a_ref`` per (example, channel) against the
    group's first member (``None``: it is the first member).
    """

    s1: Separated
    s2: Separated
    sw: object
    sb: object
    name: str = ""
    lam1: Tensor | None = None
    lam2: Tensor | None = None

    def channel_grams(self, r: slice, q: slice) -> Tensor | float:
        """``λ1 λ2ᵀ ⊙ (σ_W² H1[c] H2[c]ᵀ + σ_b² h1[c] h2[c]ᵀ)`` on pairs ``(r, q)``: ``(C, b1, b2)``."""
        s1, s2 = self.s1, self.s2
        M = 0.0
        if s1.H is not None:
            M = self.sw * torch.bmm(s1.H[:, r], s2.H[:, q].transpose(1, 2))
        if s1.h is not None:
            M = M + self.sb * (s1.h[:, r, None] * s2.h[:, None, q])
        if self.lam1 is not None:
            M = M * (self.lam1[r].T[:, :, None] * self.lam2[q].T[:, None, :])
        return M


def direction(a: Tensor, ref: Tensor) -> tuple[Tensor, float]:
    """``λ (n, C)`` with ``a[n,:,c] ≈ λ[n,c]·ref[n,:,c]``, and the largest relative residual.

    ``λ`` is the projection ``⟨a, ref⟩ / ‖ref‖²`` per (example, channel); the residual
    ``‖a − λ·ref‖ / ‖a‖`` (0 for a zero ``a``; 1 where ``ref`` is zero and ``a`` is not).
    ``a``, ``ref``: ``(n, O, C)``.
    """
    rr = ref.square().sum(1)
    lam = (a * ref).sum(1) / torch.where(rr > 0, rr, torch.ones_like(rr))
    resid = torch.linalg.vector_norm(a - lam[:, None] * ref, dim=1)
    norm = torch.linalg.vector_norm(a, dim=1)
    rel = resid / torch.where(norm > 0, norm, torch.ones_like(norm))
    return lam, float(rel.max()) if rel.numel() else 0.0


def share_directions(members: list[Member], symmetric: bool) -> list[list[Member]]:
    r"""Members in groups whose ``a`` agree up to a factor per (example, channel).

    Layers that reach the outputs through the same channel-wise path (a convolution, the
    BatchNorm after it, the skip branch added to it) have the same sensitivity direction
    ``a[n,:,c]`` up to a scalar ``λ[n,c]``. Then their dense blocks share one contraction:

    .. math::

        \sum_l K_l[(n,o),(m,p)] = \sum_c \bar a_1[n,o,c]\,\bar a_2[m,p,c]
            \sum_l \lambda^l_1[n,c]\,\lambda^l_2[m,c]\,M^l_c[n,m],

    with ``ā`` the group's first member's ``a`` — one ``T`` pass for the group instead of
    one per layer. A member joins the first group whose ``ā`` it matches on **both**
    chunks within :func:`tolerance` (:func:`direction`; the same bound as the rank-one
    test, by the same argument); otherwise it starts a group.
    """
    groups: list[list[Member]] = []
    for m in members:
        tol = tolerance(m.s1.a.dtype)
        for g in groups:
            ref = g[0]
            if ref.s1.a.shape != m.s1.a.shape or ref.s2.a.shape != m.s2.a.shape:
                continue
            lam1, r1 = direction(m.s1.a, ref.s1.a)
            lam2, r2 = (lam1, r1) if symmetric else direction(m.s2.a, ref.s2.a)
            if max(r1, r2) <= tol:
                m.lam1, m.lam2 = lam1, lam2
                g.append(m)
                break
        else:
            groups.append([m])
    return groups


def channel_gram(group: list[Member], out: Tensor, symmetric: bool) -> None:
    r"""``out += Σ_{l ∈ group} K_l`` (``out (n1, O, n2, O)``) by one channel contraction.

    Per block of example pairs (:func:`~.blocks.pair_blocks`, at most :data:`WORK_ELEMENTS`
    of ``T``) the members' per-channel Grams summed, ``M[c]`` (:meth:`Member.channel_grams`,
    one ``bmm`` each), then ``T[n,c,m,p] = M[c,n,m] ā2[m,p,c]`` into a reused workspace and
    ``out[n,o,(m,p)] += Σ_c ā1[n,o,c] T[n,c,(m,p)]`` (one ``bmm`` over ``n``). ``symmetric``
    (the same chunk on both sides): blocks wholly below the diagonal are skipped, as in
    :func:`~.gram.patch_gram`.
    """
    a1, a2 = group[0].s1.a, group[0].s2.a
    n1, O, C = a1.shape
    n2 = a2.shape[0]
    a2t = a2.permute(2, 0, 1).contiguous()  # (C, n2, O)
    grad = any(isinstance(x, Tensor) and x.requires_grad for m in group for x in (m.sw, m.sb))
    blocks = [
        (r, q)
        for r, q in pair_blocks(n1, n2, O * C, WORK_ELEMENTS)
        if not (symmetric and q.stop <= r.start)
    ]
    largest = max(((r.stop - r.start) * (q.stop - q.start) for r, q in blocks), default=0)
    work = None if grad else a1.new_empty(largest * C * O)  # out= records no autograd
    for r, q in blocks:
        M = group[0].channel_grams(r, q)
        for m in group[1:]:
            M = M + m.channel_grams(r, q)
        b1, b2 = r.stop - r.start, q.stop - q.start
        Mt = M.transpose(0, 1).contiguous().unsqueeze(3)  # (b1, C, b2, 1)
        if work is None:
            T = Mt * a2t[:, q].unsqueeze(0)
        else:
            T = torch.mul(Mt, a2t[:, q], out=work[: b1 * C * b2 * O].view(b1, C, b2, O))
        part = torch.bmm(a1[r], T.view(b1, C, b2 * O))  # (b1, O, b2·O)
        out[r, :, q] += part.view(b1, O, b2, O)


def separate(layer: Layer, fac: Factors, i: int) -> Separated | None:
    """The separable form of layer ``i`` of ``fac`` (``None``: not a layer it applies to).

    Layers holding ``A`` and ``B`` at more than one position (or grouped), and layers
    holding per-example gradients; not an Embedding, nor a plain single-position Linear
    layer (its dense block ``(A1 A2ᵀ) ⊙ (B1 B2ᵀ)`` is already this).
    """
    A, B = fac.A[i], fac.B[i]
    weight, bias = layer.weight is not None, layer.bias is not None
    if fac.index[i] is not None:
        return None
    if A is not None and B is not None:
        if A.shape[1] == 1 and layer.groups == 1:
            return None
        return from_factors(A, B, layer.groups, weight, bias)
    wgrad = fac.wgrads[i] if weight else None
    bsum = fac.bsums[i] if bias else None
    if wgrad is None and bsum is None:
        return None
    return from_gradients(wgrad, bsum, layer.d_out)
