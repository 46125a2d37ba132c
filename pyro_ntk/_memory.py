r"""Memory guard for the dense paths (internal).

The dense paths materialize matrices whose size grows quadratically in the data:

.. math::

    \text{bytes}(K) = N_1 O \cdot N_2 O \cdot \text{itemsize}, \qquad
    \text{bytes}(J) = N O \cdot P \cdot \text{itemsize}.

Before allocating, they compare the estimate with a budget and refuse (``DenseMemoryError``,
a ``MemoryError`` and a ``ValueError``) with the figures and the matrix-free alternative,
instead of letting the process swap or be killed. The budget is ``max_bytes`` when given,
else :data:`DEFAULT_MEMORY_FRACTION` of the memory available now (``MemAvailable`` from
``/proc/meminfo``, else ``os.sysconf``; on CUDA the device's free memory).
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "DenseMemoryError",
    "available_memory_bytes",
    "check_dense_memory",
    "dense_memory_budget",
]

DEFAULT_MEMORY_FRACTION = 0.5
"""Share of the currently available memory a single dense matrix may take by default."""


class DenseMemoryError(MemoryError, ValueError):
    """A dense matrix would not fit in the memory budget (caught as MemoryError or ValueError)."""


def available_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Bytes available now on ``device`` (host RAM for CPU); ``None`` if it cannot be read."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - no usable CUDA
            return None
    if device.type != "cpu":
        return None  # meta and other devices: no figure, no guard
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:  # pragma: no cover - not Linux
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def dense_memory_budget(max_bytes: float | None, device: torch.device | str | None = None):
    """The budget in bytes: ``max_bytes`` if given, else the default share of what is free."""
    if max_bytes is not None:
        return max_bytes
    free = available_memory_bytes(device)
    return None if free is None else DEFAULT_MEMORY_FRACTION * free


def _gib(nbytes: float) -> str:
    return f"{nbytes / 1024**3:.3g} GiB"


def check_dense_memory(
    where: str,
    what: str,
    nbytes: int,
    max_bytes: float | None,
    device: torch.device | str | None = None,
    *,
    alternative: str = "the matrix-free path",
) -> None:
    """Raise :class:`DenseMemoryError` when ``nbytes`` exceeds the budget.

    Args:
        where: the entry point (``"Linearization.ntk_dense"``), first in the message.
        what: the matrix and its shape, e.g. ``"K of shape (N1·O, N2·O) = (4000, 4000)"``.
        nbytes: the estimate.
        max_bytes: the caller's budget (``None``: the default share of available memory).
        device: where the matrix would live.
        alternative: what to use instead, named in the message.
    """
    budget = dense_memory_budget(max_bytes, device)
    if budget is None or nbytes <= budget:
        return
    if max_bytes is None:
        origin = (
            f"max_dense_bytes=None: {DEFAULT_MEMORY_FRACTION:.0%} of the "
            f"{_gib(budget / DEFAULT_MEMORY_FRACTION)} available"
        )
    else:
        origin = f"max_dense_bytes={max_bytes:.4g}"
    raise DenseMemoryError(
        f"{where}: {what} needs {_gib(nbytes)} ({nbytes} bytes), above the dense memory budget "
        f"of {_gib(budget)} ({origin}). Use {alternative}, fewer inputs, or raise the budget "
        "(set max_dense_bytes on the Linearization)."
    )
