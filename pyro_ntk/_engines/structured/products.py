r"""Jacobian products of the factored layers from one chunk's factors (:mod:`.factors`).

.. math::

    (J V)_{n,o} = \sum_l \sum_s B_{n,o,s}^\top (V_W A_{n,s} + V_b), \qquad
    J^\top U = \sum_{n,o} U_{n,o} \sum_s B_{n,o,s} A_{n,s}^\top,

per group of a grouped convolution (:func:`grouped_push`, :func:`grouped_pull`). Cost per
column: about one forward-sized matrix product per layer. The dense kernel is in
:mod:`.gram`; the generic remainder is the engine's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_ntk._engines.structured import embedding as emb
from pyro_ntk._engines.structured.factors import Factors, fast_layout
from pyro_ntk._engines.structured.plan import Plan


def rowwise(a: Tensor, T: Tensor) -> Tensor:
    """``out[n, 0, j] = Σ_i a[n, i] T[n, i, j]``: ``a (n, d)``, ``T (n, d, k)`` → ``(n, 1, k)``.

    One column (a CG iteration) is a row-wise dot product, which ``linalg.vecdot`` streams
    about 3× faster than ``bmm``'s batch of ``n`` tiny ``1×d·d×1`` products (measured here
    at n = 2000, d = 257); several columns keep ``bmm``.
    """
    n, d, k = T.shape
    if k == 1:
        return torch.linalg.vecdot(a, T.reshape(n, d)).reshape(n, 1, 1)
    return torch.bmm(a.reshape(n, 1, d), T)


def contract_outputs(B: Tensor, dz: Tensor) -> Tensor:
    """``out[n, o, k] = Σ_j B[n, o, j] dz[n, j, k]``: ``B (n, O, m)``, ``dz (n, m, k)``.

    One column streams as a row-wise dot product (``linalg.vecdot``), measured 7× faster
    than ``bmm``'s batch of ``n`` small ``O×m·m×1`` products at n = 512, O = 10, m = 256.
    """
    n, O, m = B.shape
    if dz.shape[2] == 1:
        return torch.linalg.vecdot(B, dz.reshape(n, 1, m)).unsqueeze(-1)
    return torch.bmm(B, dz)


def spread_outputs(B: Tensor, U: Tensor) -> Tensor:
    """``G[n, j, k] = Σ_o B[n, o, j] U[n, o, k]``: ``B (n, O, m)``, ``U (n, O, k)``.

    One column is an elementwise product summed over outputs (measured 6× faster than
    ``bmm`` at n = 512, O = 10, m = 256).
    """
    if U.shape[2] == 1:
        return (B * U).sum(1).unsqueeze(-1)
    return torch.bmm(B.transpose(1, 2), U)


def grouped_push(A: Tensor, Vw: Tensor, groups: int, d_out: int, k: int) -> Tensor:
    """``dz[n, s·j, k] = Σ_i A[n, s, g(j)·d + i] W_k[j, i]``: the tangent of a (grouped) layer.

    ``A (n, S, G·d)``, ``Vw (d_out·d, k)`` in the weight's layout; one GEMM, or one ``bmm``
    over the ``G`` groups (output channel ``j`` of group ``g(j)`` sees its group's columns
    only). Returns ``(n, S·d_out, k)``. Cost ``n·S·d_out·d·k``.
    """
    n, S, width = A.shape
    d, og = width // groups, d_out // groups
    Wt = Vw.reshape(groups, og, d, k).permute(0, 2, 1, 3).reshape(groups, d, og * k)
    if groups == 1:
        return (A.reshape(n * S, d) @ Wt[0]).reshape(n, S * d_out, k)
    dz = torch.bmm(A.reshape(n * S, groups, d).transpose(0, 1), Wt)  # (G, n·S, og·k)
    return dz.reshape(groups, n * S, og, k).transpose(0, 1).reshape(n, S * d_out, k)


def grouped_pull(A: Tensor, G: Tensor, groups: int, d_out: int, k: int) -> Tensor:
    """``dW[j, i, k] = Σ_{n,s} G[n, s·j, k] A[n, s, g(j)·d + i]``, flat ``(d_out·d, k)``.

    The transpose of :func:`grouped_push`: ``A (n, S, G·d)``, ``G (n, S·d_out, k)``.
    Cost ``n·S·d_out·d·k``.
    """
    n, S, width = A.shape
    d, og = width // groups, d_out // groups
    if groups == 1:
        dW = G.reshape(n * S, d_out * k).T @ A.reshape(n * S, d)  # (d_out·k, d)
        return dW.reshape(d_out, k, d).transpose(1, 2).reshape(-1, k)
    Gg = G.reshape(n * S, groups, og * k).transpose(0, 1)  # (G, n·S, og·k)
    dW = torch.bmm(Gg.transpose(1, 2), A.reshape(n * S, groups, d).transpose(0, 1))
    return dW.reshape(groups, og, k, d).permute(0, 1, 3, 2).reshape(-1, k)


def layers_jvp(plan: Plan, fac: Factors, V: Tensor) -> Tensor | None:
    """``Σ_l J_l V_l`` over the factored layers, ``(n, O, k)`` (``None``: no layer)."""
    k = V.shape[1]
    out = None
    for i, layer in enumerate(plan.layers):
        A, B = fac.A[i], fac.B[i]
        if fac.index[i] is not None:  # an Embedding: a gather of V's rows
            pad = layer.module.padding_idx
            part = emb.embedding_jvp(fac.index[i], B, V[layer.w_slice], layer.d_in, pad)
            out = part if out is None else out + part
            continue
        if A is None:  # per-example gradients
            part = None
            if layer.weight is not None:
                Gw = fac.wgrads[i]
                part = (Gw.reshape(-1, Gw.shape[2]) @ V[layer.w_slice]).reshape(*Gw.shape[:2], k)
            if layer.bias is not None:
                Gb = fac.bsums[i]
                pb = (Gb.reshape(-1, Gb.shape[2]) @ V[layer.b_slice]).reshape(*Gb.shape[:2], k)
                part = pb if part is None else part + pb
            out = part if out is None else out + part
            continue
        n, S, d_in = A.shape
        O, d_out = B.shape[1], B.shape[3]
        if fac.aexts[i] is not None:
            # Σ_i [A | 1]_i (B [W | b])_i: weight and bias in one product
            # Vt = [W | b]ᵀ laid out ((d_in + 1)·k, d_out), written in one copy
            Vt = V.new_empty(d_in + 1, k, d_out)
            Vt[:d_in] = V[layer.w_slice].reshape(d_out, d_in, k).permute(1, 2, 0)
            Vt[d_in] = V[layer.b_slice].T
            Vt = Vt.reshape((d_in + 1) * k, d_out)
            T = B.reshape(n, d_out) @ Vt.T
            part = rowwise(fac.aexts[i], T.reshape(n, d_in + 1, k))
        elif fast_layout(layer, A, B):
            # Σ_ij A_i B_j W_ji = A · (B W): the intermediate is (n, d_in·k), no transpose
            # (the transposed copy of V's slice makes this the "NT" GEMM of nn.Linear,
            # measured faster than the "NN" one on CPU)
            Vt = V[layer.w_slice].reshape(d_out, d_in * k).T.contiguous()
            T = B.reshape(n, d_out) @ Vt.T
            part = rowwise(A.reshape(n, d_in), T.reshape(n, d_in, k))
            if layer.bias is not None:
                part = part + (B.reshape(n, d_out) @ V[layer.b_slice]).unsqueeze(1)
        elif layer.weight is not None:
            dz = grouped_push(A, V[layer.w_slice], layer.groups, d_out, k)
            if layer.bias is not None:
                dz = (dz.reshape(n, S, d_out, k) + V[layer.b_slice]).reshape(n, S * d_out, k)
            part = contract_outputs(B.reshape(n, O, S * d_out), dz)
        else:  # bias only: Σ_s B against the bias tangent
            part = (fac.bsum(i).reshape(n * O, d_out) @ V[layer.b_slice]).reshape(n, O, k)
        out = part if out is None else out + part
    return out


def layers_vjp(plan: Plan, fac: Factors, U: Tensor) -> dict[str, Tensor]:
    """``J_lᵀ U`` of every factored parameter, ``{name: (numel, k)}``."""
    n, O, k = U.shape
    pieces: dict[str, Tensor] = {}
    for i, layer in enumerate(plan.layers):
        A, B = fac.A[i], fac.B[i]
        if fac.index[i] is not None:  # an Embedding: an index_add into V's rows
            pad = layer.module.padding_idx
            pieces[layer.weight] = emb.embedding_vjp(fac.index[i], B, U, layer.d_in, pad)
            continue
        if A is None:  # per-example gradients
            if layer.weight is not None:
                pieces[layer.weight] = fac.wgrads[i].reshape(n * O, -1).T @ U.reshape(n * O, k)
            if layer.bias is not None:
                pieces[layer.bias] = fac.bsums[i].reshape(n * O, -1).T @ U.reshape(n * O, k)
            continue
        S, d_in, d_out = A.shape[1], A.shape[2], B.shape[3]
        if fac.aexts[i] is not None:
            Ae = fac.aexts[i]
            AU = (Ae.reshape(n, d_in + 1, 1) * U.reshape(n, 1, k)).reshape(n, -1)
            R = (B.reshape(n, d_out).T @ AU).reshape(d_out, d_in + 1, k)
            pieces[layer.weight] = R[:, :d_in].reshape(-1, k)
            pieces[layer.bias] = R[:, d_in]
            continue
        if fast_layout(layer, A, B):
            # Σ_n B_j (A_i U_k): the product lands in the (d_out, d_in, k) layout of V
            AU = (A.reshape(n, d_in, 1) * U.reshape(n, 1, k)).reshape(n, d_in * k)
            pieces[layer.weight] = (B.reshape(n, d_out).T @ AU).reshape(-1, k)
        elif layer.weight is not None:
            # G[n, s·j, k] = Σ_o B[n, o, s, j] U[n, o, k]
            G = spread_outputs(B.reshape(n, O, S * d_out), U)
            pieces[layer.weight] = grouped_pull(A, G, layer.groups, d_out, k)
        if layer.bias is not None:
            pieces[layer.bias] = fac.bsum(i).reshape(n * O, d_out).T @ U.reshape(n * O, k)
    return pieces


def layers_jacobian(plan: Plan, fac: Factors) -> dict[str, Tensor]:
    """Per-example Jacobian of every factored parameter, ``{name: (n, O, numel)}``."""
    pieces: dict[str, Tensor] = {}
    for i, layer in enumerate(plan.layers):
        if fac.index[i] is not None:
            pad = layer.module.padding_idx
            pieces[layer.weight] = emb.embedding_jacobian(fac.index[i], fac.B[i], layer.d_in, pad)
            continue
        if layer.weight is not None:
            pieces[layer.weight] = fac.wgrad(i)
        if layer.bias is not None:
            pieces[layer.bias] = fac.bsum(i)
    return pieces


def _uniform(scale: Tensor | None, sl: slice | None) -> Tensor | float | None:
    """The single scale value of a parameter tensor, ``None`` if it varies inside it."""
    if sl is None or scale is None:
        return 1.0
    seg = scale[sl]
    return seg[0] if bool((seg == seg[0]).all()) else None


def piece_scales(plan: Plan, scale: Tensor | None) -> list[tuple] | None:
    """Per factored layer, the uniform (weight, bias) scale; ``None`` when one varies."""
    scales = []
    for layer in plan.layers:
        sw, sb = _uniform(scale, layer.w_slice), _uniform(scale, layer.b_slice)
        if sw is None or sb is None:
            return None
        scales.append((sw, sb))
    return scales


def layers_diag(plan: Plan, fac: Factors, scales: list[tuple]) -> Tensor | None:
    """``Σ_l diag(J_l S_l J_lᵀ)`` over the factored layers, ``(n, O)`` (``None``: no layer)."""
    out = None
    for i, (layer, (sw, sb)) in enumerate(zip(plan.layers, scales)):
        A, B = fac.A[i], fac.B[i]
        part = 0.0
        if fac.index[i] is not None:
            part = sw * emb.embedding_diag(fac.index[i], B, layer.module.padding_idx)
            out = part if out is None else out + part
            continue
        if layer.weight is not None:
            if A is not None and A.shape[1] == 1 and layer.groups == 1:
                wn = B.square().sum((2, 3)) * A.square().sum((1, 2)).unsqueeze(1)
            else:
                wn = fac.wgrad(i).square().sum(-1)
            part = part + sw * wn
        if layer.bias is not None:
            part = part + sb * fac.bsum(i).square().sum(-1)
        out = part if out is None else out + part
    return out
