r"""Jacobian products of the factored layers from one chunk's factors (:mod:`.factors`).

.. math::

    (J V)_{n,o} = \sum_l \sum_s B_{n,o,s}^\top (V_W A_{n,s} + V_b), \qquad
    J^\top U = \sum_{n,o} U_{n,o} \sum_s B_{n,o,s} A_{n,s}^\top, \qquad
    K_l = \big(\sigma_W^2 A_1 A_2^\top + \sigma_b^2\big) \odot \big(B_1 B_2^\top\big).

Cost per column: about one forward-sized matrix product per layer. A dense block of plain
Linear layers is ``n1·n2·(d_in + O²·d_out)`` per layer with no Jacobian; convolutions go
through their per-example gradients and one GEMM. The generic remainder is the engine's.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def layers_jvp(plan: Plan, fac: Factors, V: Tensor) -> Tensor | None:
    """``Σ_l J_l V_l`` over the factored layers, ``(n, O, k)`` (``None``: no layer)."""
    k = V.shape[1]
    out = None
    for i, layer in enumerate(plan.layers):
        A, B = fac.A[i], fac.B[i]
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
            Wt = V[layer.w_slice].reshape(d_out, d_in, k).permute(1, 0, 2).reshape(d_in, -1)
            dz = (A.reshape(n * S, d_in) @ Wt).reshape(n, S * d_out, k)
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
            dW = G.reshape(n * S, d_out * k).T @ A.reshape(n * S, d_in)  # (d_out·k, d_in)
            pieces[layer.weight] = dW.reshape(d_out, k, d_in).transpose(1, 2).reshape(-1, k)
        if layer.bias is not None:
            pieces[layer.bias] = fac.bsum(i).reshape(n * O, d_out).T @ U.reshape(n * O, k)
    return pieces


def layers_jacobian(plan: Plan, fac: Factors) -> dict[str, Tensor]:
    """Per-example Jacobian of every factored parameter, ``{name: (n, O, numel)}``."""
    pieces: dict[str, Tensor] = {}
    for i, layer in enumerate(plan.layers):
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
        if layer.weight is not None:
            if A is not None and A.shape[1] == 1:
                wn = B.square().sum((2, 3)) * A.square().sum((1, 2)).unsqueeze(1)
            else:
                wn = fac.wgrad(i).square().sum(-1)
            part = part + sw * wn
        if layer.bias is not None:
            part = part + sb * fac.bsum(i).square().sum(-1)
        out = part if out is None else out + part
    return out


def layers_block(plan: Plan, f1: Factors, f2: Factors, scales: list[tuple]) -> Tensor | None:
    """``Σ_l J_l(X1) S_l J_l(X2)ᵀ``, ``(n1·O, n2·O)`` (``None``: no layer)."""
    K = None
    for i, (layer, (sw, sb)) in enumerate(zip(plan.layers, scales)):
        A1, B1, A2, B2 = f1.A[i], f1.B[i], f2.A[i], f2.B[i]
        if A1 is not None and A1.shape[1] == 1:
            n1, O, _, d_out = B1.shape
            n2 = B2.shape[0]
            # K_l = (σ_W² A1 A2ᵀ + σ_b²) ⊙ (B1 B2ᵀ)
            BB = (B1.reshape(n1 * O, d_out) @ B2.reshape(n2 * O, d_out).T).reshape(n1, O, n2, O)
            coef = 0.0
            if layer.weight is not None:
                coef = sw * (A1.reshape(n1, -1) @ A2.reshape(n2, -1).T)
            if layer.bias is not None:
                coef = coef + sb
            part = BB * (coef[:, None, :, None] if isinstance(coef, Tensor) else coef)
            part = part.reshape(n1 * O, n2 * O)
        else:
            part = 0.0
            if layer.weight is not None:
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
