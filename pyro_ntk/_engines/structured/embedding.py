r"""``nn.Embedding`` as a sparse factored layer: token ids and output sensitivities.

An embedding looks rows up, :math:`z_{n,s} = W_{t_{n,s}}` for token ids :math:`t_{n,s}`
(``W (R, d)``), so with :math:`B_{n,o,s} = \partial f_o(x_n)/\partial z_{n,s}` its
per-example gradient is sparse, one row per position:

.. math::

    \frac{\partial f_o(x_n)}{\partial W_r} = \sum_s [t_{n,s} = r]\, B_{n,o,s}.

The products never form it:

.. math::

    (J V)_{n,o} = \sum_s B_{n,o,s} \cdot V_{t_{n,s}} \;(\text{a gather}), \qquad
    (J^\top U)_r = \sum_{n,s:\,t_{n,s} = r} \sum_o U_{n,o} B_{n,o,s} \;(\text{an index\_add}),

    K[(n,o),(m,p)] = \sum_{s,t} [t_{n,s} = t'_{m,t}]\; B_{n,o,s} \cdot B'_{m,p,t}
    \;(\text{a Gram by index equality}).

Shapes: ids ``(n, S)`` (any index shape, flattened to ``S`` positions), ``B (n, O, S, d)``,
``V`` in the weight's flat layout ``(R·d, k)``. Cost per column: ``n·S·O·d`` for each of
``J V`` and ``Jᵀ U`` (no ``R``: the vocabulary never enters); a dense block
``n₁·n₂·S₁·S₂·(O²·d + 1)``. Memory: ``n·S·(1 + O·d)``. ``padding_idx`` rows get no
gradient, as in torch's backward (whose forward mode differs there, so the preflight refuses
such networks before any engine runs); ``max_norm`` (it renormalizes ``W`` in place), ``scale_grad_by_freq`` and sparse
gradients are left to the generic route.

>>> ids, B = torch.tensor([[0, 2], [2, 2]]), torch.randn(2, 1, 2, 3)
>>> embedding_vjp(ids, B, torch.ones(2, 1, 1), rows=4, padding_idx=None).shape
torch.Size([12, 1])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_ntk._engines.structured.blocks import pair_blocks


def embedding_problem(m: nn.Embedding) -> str | None:
    """Why an ``nn.Embedding`` is left to the generic route (``None``: it is factored)."""
    if m.max_norm is not None:
        return "an Embedding with max_norm (it renormalizes its weight in place)"
    if m.scale_grad_by_freq:
        return "an Embedding with scale_grad_by_freq (its backward rescales by batch counts)"
    if m.sparse:
        return "an Embedding with sparse gradients"
    return None


def _keep(ids: Tensor, padding_idx: int | None) -> Tensor | None:
    """``1`` where a position's token has a gradient, ``0`` at ``padding_idx``."""
    return None if padding_idx is None else (ids != padding_idx)


def _masked(ids: Tensor, B: Tensor, padding_idx: int | None) -> Tensor:
    keep = _keep(ids, padding_idx)
    return B if keep is None else B * keep[:, None, :, None].to(B.dtype)


def embedding_jvp(ids: Tensor, B: Tensor, Vw: Tensor, rows: int, padding_idx) -> Tensor:
    """``(J V)_{n,o} = Σ_s B_{n,o,s} · V_{t_{n,s}}``, ``(n, O, k)``; ``Vw (R·d, k)``."""
    n, O, S, d = B.shape
    k = Vw.shape[1]
    Vg = Vw.reshape(rows, d * k)[ids.reshape(-1)].reshape(n, S * d, k)
    Bm = _masked(ids, B, padding_idx).reshape(n, O, S * d)
    return torch.bmm(Bm, Vg)


def embedding_vjp(ids: Tensor, B: Tensor, U: Tensor, rows: int, padding_idx) -> Tensor:
    """``Jᵀ U`` in the weight's flat layout ``(R·d, k)``: an ``index_add`` of ``Σ_o U B``."""
    n, O, S, d = B.shape
    k = U.shape[2]
    G = torch.bmm(_masked(ids, B, padding_idx).reshape(n, O, S * d).transpose(1, 2), U)
    out = B.new_zeros(rows, d * k)
    out.index_add_(0, ids.reshape(-1), G.reshape(n * S, d * k))
    return out.reshape(rows * d, k)


def embedding_jacobian(ids: Tensor, B: Tensor, rows: int, padding_idx) -> Tensor:
    """The per-example gradients ``(n, O, R·d)`` (dense: for the small dense path only)."""
    n, O, S, d = B.shape
    J = B.new_zeros(n, O, rows, d)
    Bm = _masked(ids, B, padding_idx)
    for s in range(S):  # positions sharing a token add up
        J[torch.arange(n), :, ids[:, s]] += Bm[:, :, s]
    return J.reshape(n, O, rows * d)


def embedding_gram(ids1: Tensor, B1: Tensor, ids2: Tensor, B2: Tensor, padding_idx) -> Tensor:
    """``Σ_{s,t} [t_{n,s} = t'_{m,t}] B_{n,o,s} · B'_{m,p,t}``, shape ``(n1·O, n2·O)``.

    Over example blocks so that one block's sensitivity Gram holds at most
    :data:`~pyro_ntk._engines.structured.blocks.BLOCK_ELEMENTS` elements.
    """
    n1, O, S1, d = B1.shape
    n2, S2 = B2.shape[0], B2.shape[2]
    B1, B2 = _masked(ids1, B1, padding_idx), _masked(ids2, B2, padding_idx)
    K = B1.new_zeros(n1, O, n2, O)
    for r, c in pair_blocks(n1, n2, O * O * S1 * S2):
        m1, m2 = r.stop - r.start, c.stop - c.start
        eq = (ids1[r].reshape(m1, S1, 1, 1) == ids2[c].reshape(1, 1, m2, S2)).to(B1.dtype)
        BB = (B1[r].reshape(-1, d) @ B2[c].reshape(-1, d).T).reshape(m1, O, S1, m2, O, S2)
        K[r, :, c] = torch.einsum("nsmt,nosmpt->nomp", eq, BB)
    return K.reshape(n1 * O, n2 * O)


def embedding_diag(ids: Tensor, B: Tensor, padding_idx) -> Tensor:
    """``Σ_{s,t} [t_{n,s} = t_{n,t}] B_{n,o,s} · B_{n,o,t}``, shape ``(n, O)``."""
    Bm = _masked(ids, B, padding_idx)
    eq = (ids[:, :, None] == ids[:, None, :]).to(B.dtype)  # (n, S, S)
    BB = torch.einsum("nosd,notd->nost", Bm, Bm)
    return (BB * eq[:, None]).sum((2, 3))
