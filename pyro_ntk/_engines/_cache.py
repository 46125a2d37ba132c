"""Per-chunk caches tied to the lifetime of an input tensor and of θ* (internal).

An entry is keyed by the *storage* a chunk lives in (the base tensor, held by a weak
reference), its offset, shape and strides, and validated against the base's version counter
(bumped by every in-place write) and the version counters of θ* and the fixed tensors.
Slicing ``X[a:b]`` makes a new view object on every call, but all views of the same rows
map to the same key, so a CG solve that calls ``ntk_mvm(X, X, V)`` a hundred times builds
each chunk's entry once. When ``X`` (its base) is garbage collected its entries are
dropped; an in-place change to ``X`` or to θ* makes them stale, and they are rebuilt.

Memory: an entry holds one chunk's activations (or per-layer factors). The cache admits
entries while their total estimated size stays within ``max_bytes``; beyond that a chunk's
entry is built, used for the current call and released (no eviction, so a cyclic sweep over
chunks keeps the first ones cached instead of thrashing). ``max_bytes=None`` caches all
chunks; ``max_bytes=0`` disables caching. :meth:`ChunkCache.fits` lets an engine skip
building an entry whose estimated size is over what is left of the budget.

Besides entries, the cache counts how often each chunk was asked for
(:meth:`ChunkCache.count`), under the same key and validity rules, holding no data: a lazy
engine builds a chunk's entry only once the chunk comes back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

DEFAULT_CACHE_BYTES = 2 * 1024**3
"""Default budget of a chunk cache: 2 GiB of activations or factors."""


@dataclass
class _Slot:
    base: weakref.ref
    version: int
    theta_version: tuple[int, ...]
    value: Any
    nbytes: int = field(default=0)


class ChunkCache:
    """Entries keyed by an input chunk, alive while the chunk's storage is.

    Args:
        versions: returns the version counters of θ* and the fixed tensors (a change
            invalidates every entry).
        max_bytes: budget for retained entries (``None``: unbounded, ``0``: no caching).

    Attributes:
        builds: number of entries built so far (one primal pass each; tests count these).
        hits: number of lookups served from the cache.

    Example:
        >>> import torch
        >>> cache = ChunkCache(lambda: (), max_bytes=None)
        >>> X = torch.randn(4, 3)
        >>> cache.count(X), cache.count(X[:4]), cache.peek(X)
        (1, 2, None)
    """

    def __init__(self, versions: Callable[[], tuple[int, ...]], max_bytes: int | None):
        self._versions = versions
        self.max_bytes = max_bytes
        self._slots: dict[tuple, _Slot] = {}
        self._seen: dict[tuple, _Slot] = {}
        self._watched: set[int] = set()
        self.builds = 0
        self.hits = 0

    @property
    def nbytes(self) -> int:
        """Estimated bytes held by the retained entries."""
        return sum(s.nbytes for s in self._slots.values())

    def __len__(self) -> int:
        return len(self._slots)

    def clear(self) -> None:
        """Drop every entry and every request count."""
        self._slots.clear()
        self._seen.clear()

    def reset_counts(self) -> None:
        """Zero :attr:`builds` and :attr:`hits` (after the preflight's probe products)."""
        self.builds = self.hits = 0

    def __getstate__(self) -> dict:
        # Pickling (torch.save of a kernel or model) keeps the settings, not the entries:
        # they hold weak references and closures, and are rebuilt on first use.
        state = self.__dict__.copy()
        state["_slots"], state["_seen"], state["_watched"] = {}, {}, set()
        return state

    def _key(self, X: Tensor) -> tuple[tuple, Tensor, int, tuple[int, ...]]:
        base = X if X._base is None else X._base
        key = (id(base), X.storage_offset(), tuple(X.shape), X.stride(), X.dtype, X.device)
        return key, base, base._version, self._versions()

    def _valid(self, slot: _Slot | None, base: Tensor, version: int, theta_version) -> bool:
        return (
            slot is not None
            and slot.base() is base
            and slot.version == version
            and slot.theta_version == theta_version
        )

    def _watch(self, base: Tensor) -> None:
        if id(base) not in self._watched:
            self._watched.add(id(base))
            weakref.finalize(base, _forget, weakref.ref(self), id(base))

    def peek(self, X: Tensor) -> Any:
        """The valid entry of chunk ``X`` (a hit), or ``None``; never builds."""
        if X.is_inference() or self.max_bytes == 0:
            return None
        key, base, version, theta_version = self._key(X)
        slot = self._slots.get(key)
        if not self._valid(slot, base, version, theta_version):
            return None
        self.hits += 1
        return slot.value

    def count(self, X: Tensor) -> int:
        """Count a request for chunk ``X``; how many valid requests it has had, this one included.

        An in-place change to the rows or to θ* restarts the count. Inference tensors (no
        version counter) always count 1.
        """
        if X.is_inference():
            return 1
        key, base, version, theta_version = self._key(X)
        slot = self._seen.get(key)
        if self._valid(slot, base, version, theta_version):
            slot.value += 1
            return slot.value
        self._seen[key] = _Slot(weakref.ref(base), version, theta_version, 1)
        self._watch(base)
        return 1

    def fits(self, X: Tensor, nbytes: float) -> bool:
        """Whether an entry of ``nbytes`` for chunk ``X`` would be kept (within the budget)."""
        if X.is_inference() or self.max_bytes == 0:
            return False
        return self.max_bytes is None or self.nbytes + nbytes <= self.max_bytes

    def get(self, X: Tensor, build: Callable[[Tensor], tuple[Any, int]]) -> Any:
        """The entry of chunk ``X``, built by ``build(X) -> (value, nbytes)`` when missing."""
        if X.is_inference() or self.max_bytes == 0:
            self.builds += 1
            return build(X)[0]
        key, base, version, theta_version = self._key(X)
        slot = self._slots.get(key)
        if self._valid(slot, base, version, theta_version):
            self.hits += 1
            return slot.value
        if slot is not None:
            del self._slots[key]
        self.builds += 1
        # Build from a private copy of the rows: the entry (saved activations, closures) must
        # not keep the caller's tensor alive, or it could never be released.
        value, nbytes = build(X.detach().clone())
        if self.max_bytes is None or self.nbytes + nbytes <= self.max_bytes:
            self._slots[key] = _Slot(weakref.ref(base), version, theta_version, value, nbytes)
            self._watch(base)
        return value

    def _forget(self, base_id: int) -> None:
        self._watched.discard(base_id)
        for store in (self._slots, self._seen):
            for key in [k for k in store if k[0] == base_id]:
                del store[key]


def _forget(cache_ref: weakref.ref, base_id: int) -> None:
    cache = cache_ref()
    if cache is not None:
        cache._forget(base_id)
