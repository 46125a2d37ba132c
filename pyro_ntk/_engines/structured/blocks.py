r"""Blocks of a dense Gram: example-pair rectangles, and the symmetric (syrk-like) product.

**Pair blocks.** A dense block ``K[X1, X2]`` built from per-position quantities forms, per
pair of examples, an intermediate of ``per_pair`` elements (e.g. ``O²·S₁·S₂`` sensitivity
products). The pairs are taken in rectangles of ``b1 × b2`` examples with
``b1·b2·per_pair`` at most :data:`BLOCK_ELEMENTS` (``b1`` about its square root, at least
one example each way) by :func:`pair_blocks`.

**Symmetric Gram.** For ``K = α G Gᵀ`` (``G (m, P)``, the same rows on both sides) only the
upper triangle carries information. :func:`upper_blocks` halves the rows recursively,

.. math::

    \begin{pmatrix} K_{11} & K_{12} \\ \cdot & K_{22} \end{pmatrix}, \qquad
    K_{12} = \alpha\, G_1 G_2^\top \ \text{(one GEMM)}, \quad
    K_{11}, K_{22} \ \text{recursively},

down to diagonal blocks of at most :data:`LEAF_ROWS` rows, which are full GEMMs.
:func:`add_gram` with ``symmetric=True`` writes each block in place into ``K`` (``addmm_``
on a strided view: no temporary, no transposed copy): ``m²·P·(1 + L/m)/2`` multiply-adds
for leaves of ``L`` rows (``0.56·m²·P`` at ``m = 8L``) instead of ``m²·P``, in GEMMs as
square as the split allows. :func:`mirror_upper` then copies the upper triangle onto the
lower one (``m²`` copies), so the result is exactly symmetric.

Example:
    >>> [(r.start, r.stop, c.start, c.stop) for r, c in pair_blocks(3, 2, BLOCK_ELEMENTS // 2)]
    [(0, 1, 0, 2), (1, 2, 0, 2), (2, 3, 0, 2)]
    >>> G = torch.randn(300, 7, dtype=torch.float64)
    >>> K = G.new_zeros(300, 300)
    >>> add_gram(K, G, G, 2.0, symmetric=True)
    >>> bool(torch.allclose(mirror_upper(K), 2.0 * G @ G.T))
    True
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

BLOCK_ELEMENTS = 1 << 24
"""Most elements of one block's intermediate (e.g. a sensitivity Gram ``(b1·O·S)×(b2·O·S)``)."""

LEAF_ROWS = 160
"""Most rows of a diagonal block of the symmetric Gram (a full GEMM below this size)."""


def pair_blocks(
    n1: int, n2: int, per_pair: int, limit: int | None = None
) -> Iterator[tuple[slice, slice]]:
    """Row and column slices covering ``n1 × n2`` example pairs, ``≤ limit`` elements each.

    ``limit`` defaults to :data:`BLOCK_ELEMENTS`.
    """
    limit = BLOCK_ELEMENTS if limit is None else limit
    b1 = max(1, min(n1, int((limit / per_pair) ** 0.5)))
    b2 = max(1, min(n2, limit // (per_pair * b1)))
    for i in range(0, n1, b1):
        for j in range(0, n2, b2):
            yield slice(i, min(n1, i + b1)), slice(j, min(n2, j + b2))


def upper_blocks(m: int) -> list[tuple[slice, slice]]:
    """Blocks ``(rows, cols)`` covering each entry on or above the diagonal of ``m × m`` once.

    Off-diagonal rectangles of the recursive halving, then the diagonal leaves (``rows is
    cols``, at most :data:`LEAF_ROWS` rows; one block when ``m ≤ LEAF_ROWS``).

    >>> [(r.start, r.stop, c.start, c.stop) for r, c in upper_blocks(2 * LEAF_ROWS)]
    [(0, 160, 160, 320), (0, 160, 0, 160), (160, 320, 160, 320)]
    """
    out: list[tuple[slice, slice]] = []
    leaves: list[tuple[slice, slice]] = []
    spans = [(0, m)]
    while spans:
        lo, hi = spans.pop()
        if hi - lo <= LEAF_ROWS:
            leaves.append((slice(lo, hi), slice(lo, hi)))
            continue
        mid = (lo + hi) // 2
        out.append((slice(lo, mid), slice(mid, hi)))
        spans += [(mid, hi), (lo, mid)]
    return out + sorted(leaves, key=lambda rc: rc[0].start)


def add_gram(K: Tensor, G1: Tensor, G2: Tensor, alpha: float, symmetric: bool) -> None:
    """``K += α G1 G2ᵀ`` in place; ``G1 (m1, P)``, ``G2 (m2, P)``, ``K (m1, m2)``.

    ``symmetric`` (``G2`` is ``G1``): only the blocks of :func:`upper_blocks` are written
    (see the module docstring); finish with :func:`mirror_upper`. Cost ``m1·m2·P``
    multiply-adds, a little over half of it when symmetric.
    """
    if not symmetric:
        K.addmm_(G1, G2.T, alpha=alpha)
        return
    for r, c in upper_blocks(G1.shape[0]):
        K[r, c].addmm_(G1[r], G1[c].T, alpha=alpha)


def mirror_upper(K: Tensor) -> Tensor:
    """``K`` with its strict lower triangle replaced by the upper one's transpose (in place).

    What :func:`add_gram` leaves when ``symmetric``: every entry on or above the diagonal
    is complete. Each off-diagonal block of :func:`upper_blocks` is copied to its mirror
    place, each diagonal block symmetrized from its upper triangle.
    """
    for r, c in upper_blocks(K.shape[0]):
        if r == c:
            D = K[r, c]
            D.copy_(D.triu() + D.triu(1).T)
        else:
            K[c, r].copy_(K[r, c].T)
    return K
