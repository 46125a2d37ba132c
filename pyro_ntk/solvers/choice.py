r"""The ``solver="auto"`` rule: dense Cholesky or matrix-free CG for an ``n × n`` kernel system.

.. math:: n \le n_{\max} \quad\text{and}\quad
    2\, n^2 \cdot \mathrm{itemsize} \le \text{fraction} \times \text{available memory}
    \;\Rightarrow\; \text{Cholesky, else CG.}
"""

from __future__ import annotations

import torch

from pyro_ntk._checks import check_positive_int
from pyro_ntk._memory import available_memory_bytes
from pyro_ntk.options import DEFAULT_MAX_CHOLESKY_SIZE

__all__ = [
    "CHOLESKY_MEMORY_FRACTION",
    "available_memory",
    "choose_solver",
]

CHOLESKY_MEMORY_FRACTION = 0.5
"""Share of the available memory the dense path may take for its kernel and factor."""


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes of memory available now on ``device``, or ``None`` when unknown.

    CUDA: the free memory reported by ``torch.cuda.mem_get_info``. CPU: ``MemAvailable``
    from ``/proc/meminfo`` (Linux), else the available pages from ``os.sysconf``; ``None``
    for other devices or when neither can be read. The same figure as the dense paths'
    memory guard (``pyro_ntk._memory``).

    Args:
        device: a torch device (``None``: CPU).

    Returns:
        Available bytes, or ``None``.

    Example:
        >>> m = available_memory("cpu")
        >>> m is None or m > 0
        True
    """
    return available_memory_bytes(device)


def choose_solver(
    size: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    *,
    max_cholesky_size: int = DEFAULT_MAX_CHOLESKY_SIZE,
    memory_budget: int | None = None,
    memory_fraction: float = CHOLESKY_MEMORY_FRACTION,
) -> str:
    r"""The ``solver="auto"`` rule: ``"cholesky"`` or ``"cg"`` for an ``n × n`` system.

    Dense Cholesky when ``n = N·O`` is at most the measured crossover and the dense kernel
    and its factor fit in a share of the memory,

    .. math:: n \le n_{\max} \quad\text{and}\quad
        2\, n^2 \cdot \mathrm{itemsize} \le \text{fraction} \times \text{budget},

    matrix-free preconditioned CG otherwise. Cost: ``O(1)`` (one read of ``/proc/meminfo``
    or one ``mem_get_info`` when ``memory_budget`` is ``None``).

    Args:
        size: ``n = N·O``.
        dtype: floating dtype of the kernel.
        device: where the kernel would live (``None``: CPU).
        max_cholesky_size: the crossover ``n_max`` (see
            :data:`~pyro_ntk.options.DEFAULT_MAX_CHOLESKY_SIZE`).
        memory_budget: bytes available; ``None`` reads :func:`available_memory` (when that
            is unknown too, only the size rule applies).
        memory_fraction: share of the budget the dense path may take, in ``(0, 1]``.

    Returns:
        ``"cholesky"`` or ``"cg"``.

    Example:
        >>> choose_solver(1000, torch.float64, memory_budget=2**30)
        'cholesky'
        >>> choose_solver(1000, torch.float64, memory_budget=2**20)  # 16 MB do not fit in 0.5 MB
        'cg'
        >>> choose_solver(10**6, torch.float64, memory_budget=2**50)
        'cg'
    """
    where = "choose_solver"
    check_positive_int(where, "size", size)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}.")
    if isinstance(max_cholesky_size, bool) or not isinstance(max_cholesky_size, int):
        raise ValueError(f"{where}: max_cholesky_size must be an int, got {max_cholesky_size!r}.")
    if not (isinstance(memory_fraction, (int, float)) and 0 < memory_fraction <= 1):
        raise ValueError(f"{where}: memory_fraction must be in (0, 1], got {memory_fraction!r}.")
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0
    ):
        raise ValueError(
            f"{where}: memory_budget must be None or an int >= 0 (bytes), got {memory_budget!r}."
        )
    if size > max_cholesky_size:
        return "cg"
    if memory_budget is None:
        memory_budget = available_memory(device)
        if memory_budget is None:
            return "cholesky"
    need = 2 * size * size * torch.finfo(dtype).bits // 8
    return "cholesky" if need <= memory_fraction * memory_budget else "cg"
