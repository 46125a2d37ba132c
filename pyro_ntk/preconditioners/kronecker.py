r"""Kronecker-factored candidate directions for the Fisher preconditioner (the EKFAC eigenbasis).

For a linear layer :math:`z = W a + b`, the Jacobian row of output :math:`o` at input
:math:`x_n` is a Kronecker product of the output sensitivity :math:`B_{no} = \partial
f_o(x_n)/\partial z` and the (prior-scaled) layer input :math:`\tilde a_n = [\sigma_W a_n,
\sigma_b]`. The layer's Fisher is approximated, as in K-FAC (Martens & Grosse, 2015), by

.. math::

    F_l = \sum_{n,o} (B_{no} B_{no}^\top) \otimes (\tilde a_n \tilde a_n^\top)
    \;\approx\; \Big(\sum_{n,o} B_{no} B_{no}^\top\Big) \otimes
    \Big(\sum_n \tilde a_n \tilde a_n^\top\Big) / N,

whose eigenvectors are :math:`u_i \otimes w_j` (eigenvectors of the two Gram matrices).
Such a direction needs no Jacobian product to reach function space:

.. math::

    J (u_i \otimes w_j) = (B u_i) \odot (\tilde A w_j), \qquad
    s_{ij} = \lVert (B u_i) \odot (\tilde A w_j) \rVert^2
    = (u_i \otimes w_j)^\top F_l\, (u_i \otimes w_j),

an elementwise product of two length-``N·O`` vectors, and :math:`s_{ij}` is the exact
Rayleigh quotient of the Fisher in that direction (the eigenvalue estimate of EKFAC, George
et al., 2018). The ``pool`` directions with the largest :math:`s_{ij}` over all layers are
orthonormal in parameter space (distinct layers have disjoint parameters), so their columns
``C`` satisfy ``C Cᵀ ≼ K``; a Rayleigh–Ritz step on the *exact* Fisher (``top_eigenpairs``)
then keeps the best rank-``k`` part.

Cost: the linearization's per-layer factors (:meth:`pyro_ntk.Linearization.layer_factors`:
one forward pass and ``O`` backward passes, cached and reused by every later product), then per layer
``O(N·O·(d_in² + d_out² + d_in·d_out))`` for the projections and scores and ``N·O`` per
candidate column, with no Jacobian products. Only layers that the structured engine factors
at a single position (``nn.Linear`` on ``(N, d_in)`` inputs) take part; every other
linearized parameter is reported as not covered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_ntk.linearization import Linearization

__all__ = ["KroneckerColumns", "kronecker_columns", "top_eigenpairs"]


@dataclass
class KroneckerColumns:
    """Function-space columns of the selected Kronecker directions.

    Attributes:
        columns: ``(N·O, m)``, column ``c`` is ``J S^{1/2} q_c`` for orthonormal ``q_c``.
        covered: ``(P,)`` bool, the parameters of the factored layers.
        products: K·v-equivalents spent (the factor pass: ``(1 + O) / 2``).
    """

    columns: Tensor
    covered: Tensor
    products: float


def _scale_of(s: Tensor | None, sl: slice | None) -> Tensor | float:
    """The (uniform) prior standard deviation of one parameter tensor."""
    return 1.0 if s is None or sl is None else s[sl.start]


def kronecker_columns(
    linearization: Linearization, X: Tensor, sqrt_scale: Tensor | None, pool: int
) -> KroneckerColumns | None:
    r"""The ``pool`` Kronecker eigen-directions with the largest Fisher Rayleigh quotients.

    Args:
        linearization: the :class:`pyro_ntk.Linearization` (an engine without per-layer
            factors gives ``None``).
        X: inputs ``(N, ...)``.
        sqrt_scale: ``S^{1/2}`` per parameter ``(P,)`` (``None``: ones); constant within
            each parameter tensor.
        pool: the number of directions to keep (over all layers).

    Returns:
        :class:`KroneckerColumns`, or ``None`` when no layer can be used.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = Linearization(net.double(), implementation="structured")
        >>> X = torch.randn(30, 2, dtype=torch.float64)
        >>> kc = kronecker_columns(lin, X, None, pool=10)
        >>> kc.columns.shape, bool(kc.covered.all())
        (torch.Size([30, 10]), True)
    """
    if pool < 1:
        return None
    X = linearization.check_inputs("kronecker_columns", "X", X)
    # the factors of each row chunk (None: the engine keeps no per-layer structure)
    factored = linearization.layer_factors(X)
    if factored is None:
        return None
    usable = [
        layer
        for layer in factored
        if layer.kind == "linear" and all(A.shape[1] == 1 for A in layer.A)
    ]
    if not usable:
        return None
    O = usable[0].B[0].shape[1]
    P = linearization.num_params
    covered = torch.zeros(P, dtype=torch.bool, device=linearization.device)
    scored = []  # per layer: (scores (d_out, d_a), pa chunks, pb chunks)
    for layer in usable:
        sw, sb = _scale_of(sqrt_scale, layer.weight), _scale_of(sqrt_scale, layer.bias)
        for sl in (layer.weight, layer.bias):
            if sl is not None:
                covered[sl] = True
        a_parts, b_parts = [], []
        for A, B in zip(layer.A, layer.B):
            A = A.reshape(A.shape[0], -1)  # (n, d_in)
            cols = [A * sw] if layer.weight is not None else []
            if layer.bias is not None:
                cols.append(A.new_full((A.shape[0], 1), 1.0) * sb)
            a_parts.append(torch.cat(cols, 1))  # Ã = [σ_W A, σ_b], (n, d_a)
            b_parts.append(B.reshape(-1, B.shape[-1]))  # (n·O, d_out)
        gram_a = sum(a.T @ a for a in a_parts)
        gram_b = sum(b.T @ b for b in b_parts)
        Wa = torch.linalg.eigh(gram_a).eigenvectors
        Ub = torch.linalg.eigh(gram_b).eigenvectors
        pa = [a @ Wa for a in a_parts]
        pb = [b @ Ub for b in b_parts]
        scores = sum(
            q.square().reshape(p.shape[0], O, -1).sum(1).T @ p.square() for p, q in zip(pa, pb)
        )  # (d_out, d_a): Σ_{n,o} (B u_i)² (Ã w_j)² = Σ_n (Σ_o (B u_i)²) (Ã w_j)²
        scored.append((scores, pa, pb))
    flat = torch.cat([s.reshape(-1) for s, _, _ in scored])
    keep = torch.topk(flat, min(pool, flat.numel())).indices
    columns, start = [], 0
    for scores, pa, pb in scored:
        size = scores.numel()
        mine = keep[(keep >= start) & (keep < start + size)] - start
        start += size
        if mine.numel() == 0:
            continue
        i_out, j_in = mine // scores.shape[1], mine % scores.shape[1]
        parts = [
            (q[:, i_out].reshape(-1, O, i_out.numel()) * p[:, None, j_in]).reshape(
                -1, i_out.numel()
            )
            for p, q in zip(pa, pb)
        ]
        columns.append(torch.cat(parts, 0))
    return KroneckerColumns(torch.cat(columns, 1), covered, 0.5 * (1 + O))


def top_eigenpairs(C: Tensor, k: int) -> tuple[Tensor, Tensor]:
    r"""The top ``k`` eigenpairs of ``C Cᵀ`` (Rayleigh–Ritz in the span of ``C``'s columns).

    .. math::

        C^\top C = V \Lambda V^\top,\quad C V_k = \hat U R\ (\text{QR}),\quad
        R R^\top = W D W^\top,\quad U = \hat U W

    so that ``U diag(D) Uᵀ = C V_k V_kᵀ Cᵀ`` with ``U`` orthonormal to working precision (the
    QR repairs the orthogonality a Gram eigensolver loses in low precision).

    Cost: ``O(n m² + n m k)`` for ``C`` of shape ``(n, m)``; memory ``O(n m)``.

    Args:
        C: ``(n, m)``.
        k: rank, at most ``m``.

    Returns:
        ``U (n, k)`` orthonormal and ``d (k,)`` descending.

    Example:
        >>> C = torch.randn(8, 5, dtype=torch.float64)
        >>> U, d = top_eigenpairs(C, 2)
        >>> torch.allclose(d, torch.linalg.eigvalsh(C @ C.T)[-2:].flip(0))
        True
    """
    k = min(k, C.shape[1])
    V = torch.linalg.eigh(C.T @ C).eigenvectors[:, -k:]
    Uh, R = torch.linalg.qr(C @ V)
    d, W = torch.linalg.eigh(R @ R.T)
    return Uh @ W.flip(1), d.flip(0).clamp_min(0)
