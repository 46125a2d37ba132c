r"""Kronecker-factored candidate directions for the Fisher preconditioner (the EKFAC eigenbasis).

For a factored layer (``nn.Linear``, or ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups = 1``) at
positions :math:`s = 1 … S` (``S = 1`` for a Linear layer on ``(N, d_in)`` inputs, the output
positions of a convolution), the Jacobian row of output :math:`o` at input :math:`x_n` is a
sum over positions of Kronecker products of the output sensitivity
:math:`B_{nos} = \partial f_o(x_n)/\partial z_{ns}` and the (prior-scaled) layer input or
patch :math:`\tilde a_{ns} = [\sigma_W a_{ns}, \sigma_b]`. The layer's Fisher is approximated,
as in K-FAC (Martens & Grosse, 2015) and its convolutional form KFC (Grosse & Martens, 2016),
by the Kronecker product of the two Gram matrices

.. math::

    G_B = \sum_{n,o,s} B_{nos} B_{nos}^\top \;(d_{out}^2), \qquad
    G_A = \sum_{n,s} \tilde a_{ns} \tilde a_{ns}^\top \;(d_a^2,\ d_a = d_{in} + 1),

whose eigenvectors :math:`u_i \otimes w_j` are orthonormal in parameter space. Such a
direction needs no Jacobian product to reach function space:

.. math::

    J S^{1/2} (u_i \otimes w_j)[n, o] = \sum_s (B_{nos} \cdot u_i)(\tilde a_{ns} \cdot w_j)
    = \sum_s q_{nosi}\, p_{nsj},
    \qquad s_{ij} = \sum_{n,o} \Big(\sum_s q_{nosi}\, p_{nsj}\Big)^2,

and :math:`s_{ij}` is the exact Rayleigh quotient of the Fisher in that direction (EKFAC's
eigenvalue estimate, George et al., 2018).

**Choosing ``pool`` directions.** The exact score of all ``d_out·d_a`` pairs costs
``n·O·S·d_out·d_a`` (every per-example gradient, in the rotated basis), as much as the ``O``
backward passes that built the factors. Each pair is therefore first given a cheap score
with the cross-position terms :math:`s \ne s'` of the square dropped (KFC's spatially
uncorrelated derivatives),

.. math::

    r_{ij} = \sum_{n,s} \Big(\sum_o q_{nosi}^2\Big)\, p_{nsj}^2 \qquad
    (\text{one } d_{out} \times nS \times d_a \text{ product};\ r = s \text{ when } S = 1),

except in a layer with ``S = 1`` or at most ``CANDIDATES · pool`` pairs, whose exact scores
are computed for every pair (no more work than for the candidates). The ``CANDIDATES · pool``
pairs with the largest scores over all layers are candidates; the exact score of each
candidate scored by ``r`` is computed (``n·O·S`` per candidate), and the ``pool`` candidates
with the largest exact scores are kept. With ``S = 1`` everywhere this is the exact top
``pool``. The kept directions are orthonormal (distinct layers have disjoint parameters), so
their columns ``C`` satisfy ``C Cᵀ ≼ K``; a Rayleigh–Ritz step on the *exact* Fisher
(``top_eigenpairs``) then keeps the best rank-``k`` part.

Cost: the linearization's per-layer factors (:meth:`pyro_ntk.Linearization.layer_factors`:
one forward pass and ``O`` backward passes, cached and reused by every later product), then per
layer ``O(n·S·(d_a² + O·d_out²))`` for the Gram matrices and projections,
``O(n·S·d_out·d_a)`` for the scores ``r`` (or ``n·O·S·d_out·d_a`` for exact ones), and
``O(n·O·S)`` per candidate column, with no Jacobian products. Memory ``O(n·O·S·(d_a + d_out))``
for the projections. Only the layers whose factors the structured engine keeps take part;
every other linearized parameter (grouped convolutions, layers the engine keeps per-example
gradients for, normalization layers, …) is reported as not covered.

**Measured** (2026-12-05, 2-core CPU, ``python benchmarks/bench_precond_networks.py
--networks cnn --n 300 --rank 100``: digits CNNs, ``N·O = 3000`` rows, CG to 1e-4 at
s² = 1e-2 / 1e-3 × mean diag K): on a CNN whose every layer is factored (P = 24,810), the
Kronecker directions alone need 5.5 K·v-equivalents of set-up against 200–206 for the
range finder, but 82 / 260 CG iterations against 75 / 206 (exact top-100 eigenvectors:
74 / 200): a convolution's Kronecker basis aligns less well with the Fisher's top
eigenvectors than a Linear layer's. One subspace step from the Rayleigh–Ritz vectors
``U`` (``Q = orth(S^{1/2} Jᵀ U)``, columns ``J S^{1/2} Q``, ``k`` more K·v-equivalents)
brings them to 74 / 204 for 105.5 in all (:attr:`KroneckerColumns.positions` tells when
a layer sums over positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from pyro_ntk.linearization import Linearization

__all__ = ["CANDIDATES", "KroneckerColumns", "kronecker_columns", "top_eigenpairs"]

CANDIDATES = 4
"""Candidates per kept direction whose exact Rayleigh quotient is computed."""

_BLOCK = 1 << 22  # elements of one intermediate block (n·O·S·m or n·O·d_out·d_a)


@dataclass
class _Basis:
    """One layer's eigenbases and the ``(i, j)`` pairs of its kept directions."""

    weight: slice | None
    bias: slice | None
    U: Tensor  # (d_out, d_out), eigenvectors of G_B
    W: Tensor  # (d_a, d_a), eigenvectors of G_A (rows: d_in weight inputs, then the bias)
    i: Tensor
    j: Tensor


@dataclass
class KroneckerColumns:
    """Function-space columns of the selected Kronecker directions.

    Attributes:
        columns: ``(N·O, m)``, column ``c`` is ``J S^{1/2} q_c`` for orthonormal ``q_c``.
        covered: ``(P,)`` bool, the parameters of the factored layers.
        products: K·v-equivalents spent (the factor pass: ``(1 + O) / 2``).
        positions: the largest number of positions ``S`` of a factored layer (1: Linear
            layers only, where the directions are K-FAC's; above 1 the sum over positions
            makes them a coarser basis for the Fisher's top eigenvectors).
    """

    columns: Tensor
    covered: Tensor
    products: float
    positions: int = 1
    bases: list[_Basis] = field(default_factory=list, repr=False)

    def directions(self) -> Tensor:
        """The parameter directions ``Q (P, m)``, ``q_c = u_i ⊗ w_j`` (dense; for checks).

        ``columns = J S^{1/2} Q`` and ``QᵀQ = I``. Memory ``P·m``.
        """
        P = self.covered.numel()
        parts = []
        for b in self.bases:
            Q = self.columns.new_zeros(P, b.i.numel())
            u, w = b.U[:, b.i], b.W[:, b.j]  # (d_out, m), (d_a, m)
            if b.weight is not None:
                d_in = b.weight.stop - b.weight.start
                d_in //= u.shape[0]
                Q[b.weight] = (u[:, None, :] * w[None, :d_in, :]).reshape(-1, b.i.numel())
            if b.bias is not None:
                Q[b.bias] = u * w[-1]
            parts.append(Q)
        return torch.cat(parts, 1)


def _scale_of(s: Tensor | None, sl: slice | None) -> Tensor | float:
    """The (uniform) prior standard deviation of one parameter tensor."""
    return 1.0 if s is None or sl is None else s[sl.start]


def _scaled_inputs(A: Tensor, weight: bool, bias: bool, sw, sb) -> Tensor:
    """``Ã = [σ_W A, σ_b]`` of one chunk, ``(n, S, d_a)``."""
    cols = [A * sw] if weight else []
    if bias:
        cols.append(A.new_full((*A.shape[:2], 1), 1.0) * sb)
    return torch.cat(cols, -1)


def _exact_scores(pa: list[Tensor], pb: list[Tensor]) -> Tensor:
    """``s_ij = Σ_{n,o} (Σ_s q_{nosi} p_{nsj})²`` for every pair, ``(d_out, d_a)``.

    Per example one ``(O·d_out × S) @ (S × d_a)`` product, in row blocks of bounded memory.
    """
    total = 0.0
    for p, q in zip(pa, pb):
        n, O, S, d_out = q.shape
        step = max(1, _BLOCK // max(1, O * d_out * p.shape[-1]))
        for r in range(0, n, step):
            qq = q[r : r + step].permute(0, 1, 3, 2).reshape(-1, O * d_out, S)
            T = torch.bmm(qq, p[r : r + step])  # (n_b, O·d_out, d_a)
            total = total + T.square().reshape(-1, O, d_out, p.shape[-1]).sum((0, 1))
    return total


def _columns(pa: list[Tensor], pb: list[Tensor], i: Tensor, j: Tensor) -> Tensor:
    """``c[n·O + o, m] = Σ_s q_{nos i_m} p_{ns j_m}``, ``(N·O, len(i))``, in blocks."""
    out = []
    for p, q in zip(pa, pb):
        n, O, S, _ = q.shape
        step = max(1, _BLOCK // max(1, n * O * S))
        parts = [
            torch.einsum("nosm,nsm->nom", q[..., i[k : k + step]], p[..., j[k : k + step]])
            for k in range(0, i.numel(), step)
        ]
        out.append(torch.cat(parts, -1).reshape(n * O, -1))
    return torch.cat(out, 0)


def kronecker_columns(
    linearization: Linearization, X: Tensor, sqrt_scale: Tensor | None, pool: int
) -> KroneckerColumns | None:
    r"""The ``pool`` Kronecker eigen-directions with the largest Fisher Rayleigh quotients.

    Linear and (``groups = 1``) convolution layers alike: column ``(i, j)`` is
    ``Σ_s (B u_i)_s (Ã w_j)_s``, see the module docstring for the selection and its cost.

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
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv1d(8, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
        ...     torch.nn.Linear(8 * 5, 1),
        ... ).double()
        >>> lin = Linearization(net, implementation="structured")
        >>> X = torch.randn(30, 8, 5, dtype=torch.float64)
        >>> kc = kronecker_columns(lin, X, None, pool=10)
        >>> kc.columns.shape, bool(kc.covered.all())
        (torch.Size([30, 10]), True)
    """
    if pool < 1:
        return None
    X = linearization.check_inputs("kronecker_columns", "X", X)
    # the factors of each row chunk (None: the engine keeps no per-layer structure)
    factored = linearization.layer_factors(X)
    if not factored:
        return None
    O = factored[0].B[0].shape[1]
    P = linearization.num_params
    covered = torch.zeros(P, dtype=torch.bool, device=linearization.device)
    budget = CANDIDATES * pool
    layers = []  # per layer: (scores (d_out, d_a), exact?, pa, pb, U, W)
    for layer in factored:
        sw, sb = _scale_of(sqrt_scale, layer.weight), _scale_of(sqrt_scale, layer.bias)
        for sl in (layer.weight, layer.bias):
            if sl is not None:
                covered[sl] = True
        a_parts = [
            _scaled_inputs(A, layer.weight is not None, layer.bias is not None, sw, sb)
            for A in layer.A
        ]  # (n, S, d_a)
        gram_a = sum(a.reshape(-1, a.shape[-1]).T @ a.reshape(-1, a.shape[-1]) for a in a_parts)
        gram_b = sum(b.reshape(-1, b.shape[-1]).T @ b.reshape(-1, b.shape[-1]) for b in layer.B)
        W = torch.linalg.eigh(gram_a).eigenvectors
        U = torch.linalg.eigh(gram_b).eigenvectors
        pa = [a @ W for a in a_parts]  # (n, S, d_a)
        pb = [b @ U for b in layer.B]  # (n, O, S, d_out)
        S, d_out, d_a = pa[0].shape[1], U.shape[0], W.shape[0]
        exact = S == 1 or d_out * d_a <= budget
        if exact and S > 1:
            scores = _exact_scores(pa, pb)
        else:  # r_ij = Σ_{n,s} (Σ_o q²) p² (exact when S = 1)
            scores = sum(
                q.square().sum(1).reshape(-1, d_out).T @ p.square().reshape(-1, d_a)
                for p, q in zip(pa, pb)
            )
        layers.append((scores, exact, pa, pb, U, W))
    flat = torch.cat([entry[0].reshape(-1) for entry in layers])
    exact_flat = torch.cat([torch.full((e[0].numel(),), e[1], device=flat.device) for e in layers])
    if bool(exact_flat.all()):
        keep = torch.topk(flat, min(pool, flat.numel())).indices
    else:
        cand = torch.topk(flat, min(budget, flat.numel())).indices
        rescored = flat[cand].clone()
        start = 0
        for scores, exact, pa, pb, _, _ in layers:
            size = scores.numel()
            at = ((cand >= start) & (cand < start + size)).nonzero().squeeze(-1)
            if not exact and at.numel():
                mine = cand[at] - start
                i, j = mine // scores.shape[1], mine % scores.shape[1]
                rescored[at] = _columns(pa, pb, i, j).square().sum(0)
            start += size
        keep = cand[torch.topk(rescored, min(pool, cand.numel())).indices]
    columns, bases, start = [], [], 0
    for layer, (scores, _, pa, pb, U, W) in zip(factored, layers):
        size = scores.numel()
        mine = keep[(keep >= start) & (keep < start + size)] - start
        start += size
        if mine.numel() == 0:
            continue
        i, j = mine // scores.shape[1], mine % scores.shape[1]
        columns.append(_columns(pa, pb, i, j))
        bases.append(_Basis(layer.weight, layer.bias, U, W, i, j))
    positions = max(entry[2][0].shape[1] for entry in layers)
    return KroneckerColumns(torch.cat(columns, 1), covered, 0.5 * (1 + O), positions, bases)


def top_eigenpairs(C: Tensor, k: int) -> tuple[Tensor, Tensor]:
    r"""The top ``k`` eigenpairs of ``C Cᵀ`` (Rayleigh–Ritz in the span of ``C``'s columns).

    .. math::

        C^\top C = V \Lambda V^\top,\quad C V_k = \hat U R\ (\text{QR}),\quad
        R R^\top = W D W^\top,\quad U = \hat U W

    so that ``U diag(D) Uᵀ = C V_k V_kᵀ Cᵀ`` with ``U`` orthonormal to working precision (the
    QR repairs the orthogonality a Gram eigensolver loses in low precision). With more
    columns than rows (``m > n``) the top ``k`` of ``C Cᵀ = U D Uᵀ`` are taken directly.

    Cost: ``O(n m · min(n, m) + min(n, m)³)`` for ``C`` of shape ``(n, m)``; memory ``O(n m)``.

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
    if C.shape[1] > C.shape[0]:
        d, U = torch.linalg.eigh(C @ C.T)
        return U[:, -k:].flip(1), d[-k:].flip(0).clamp_min(0)
    V = torch.linalg.eigh(C.T @ C).eigenvectors[:, -k:]
    Uh, R = torch.linalg.qr(C @ V)
    d, W = torch.linalg.eigh(R @ R.T)
    return Uh @ W.flip(1), d.flip(0).clamp_min(0)
