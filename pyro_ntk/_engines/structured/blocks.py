r"""Blocks of example pairs for a dense Gram, each bounded in memory.

A dense block ``K[X1, X2]`` built from per-position quantities forms, per pair of examples,
an intermediate of ``per_pair`` elements (e.g. ``O²·S₁·S₂`` sensitivity products). The pairs
are taken in rectangles of ``b1 × b2`` examples with ``b1·b2·per_pair`` at most
:data:`BLOCK_ELEMENTS` (``b1`` about its square root, at least one example each way).

Example:
    >>> [(r.start, r.stop, c.start, c.stop) for r, c in pair_blocks(3, 2, BLOCK_ELEMENTS // 2)]
    [(0, 1, 0, 2), (1, 2, 0, 2), (2, 3, 0, 2)]
"""

from __future__ import annotations

from collections.abc import Iterator

BLOCK_ELEMENTS = 1 << 24
"""Most elements of one block's intermediate (e.g. a sensitivity Gram ``(b1·O·S)×(b2·O·S)``)."""


def pair_blocks(n1: int, n2: int, per_pair: int) -> Iterator[tuple[slice, slice]]:
    """Row and column slices covering ``n1 × n2`` example pairs, ``≤ BLOCK_ELEMENTS`` each."""
    b1 = max(1, min(n1, int((BLOCK_ELEMENTS / per_pair) ** 0.5)))
    b2 = max(1, min(n2, BLOCK_ELEMENTS // (per_pair * b1)))
    for i in range(0, n1, b1):
        for j in range(0, n2, b2):
            yield slice(i, min(n1, i + b1)), slice(j, min(n2, j + b2))
