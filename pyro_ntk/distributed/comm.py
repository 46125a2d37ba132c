r"""Process groups, shards and counted collectives for data-parallel NTK products.

.. math::

    X = \begin{bmatrix} X_0 \\ \vdots \\ X_{R-1} \end{bmatrix},\qquad
    J^\top u = \sum_{r=0}^{R-1} J(X_r)^\top u_r \quad (\text{one all-reduce of } P \cdot k
    \text{ numbers})

Every rank holds a contiguous block of rows (:func:`shard_rows`). The only collectives the
package needs are a sum (``all_reduce``) of parameter-space vectors and of a few scalars
per CG iteration, and an ``all_gather`` of test inputs for predictive covariances.
:class:`Communicator` wraps them: it counts calls, bytes and seconds (:class:`CommStats`),
turns a failed or timed-out collective into a :class:`DistributedError` that names the rank,
and degrades to the identity on a single process, so the same script runs under
``torchrun`` and standalone.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pyro_ntk._checks import check_nonnegative_int, check_positive_int, check_tensor

if dist.is_available():
    # Imported while no process group exists: its collectives bind ``group=group.WORLD`` as
    # a default argument at import, and torch imports it lazily (torch._dynamo, reached
    # through torch.func, imports it). Imported after init_process_group, it would keep the
    # default group alive past destroy_process_group, with its gloo worker threads (see
    # init_from_env).
    import torch.distributed.nn.functional  # noqa: F401

__all__ = ["CommStats", "Communicator", "DistributedError", "init_from_env", "shard_rows"]


class DistributedError(RuntimeError):
    """A collective failed: a peer rank raised or exited, or the collective timed out."""


@dataclass
class CommStats:
    """What a :class:`Communicator` sent, readable after the fact.

    Attributes:
        calls: collectives run.
        bytes: payload bytes this rank contributed (``numel × itemsize`` per call; a ring
            all-reduce moves about ``2 (R − 1)/R`` times this over each rank's link).
        seconds: wall time inside collectives (transfer plus waiting for slower ranks).
    """

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        """Set every counter to zero."""
        self.calls, self.bytes, self.seconds = 0, 0, 0.0


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    r"""The contiguous rows ``[start, stop)`` of ``n`` that ``rank`` holds (sizes differ by ≤ 1).

    .. math:: n_r = \lfloor n / R \rfloor + [r < n \bmod R]

    Example:
        >>> [shard_rows(10, r, 4) for r in range(4)]
        [slice(0, 3, None), slice(3, 6, None), slice(6, 8, None), slice(8, 10, None)]
    """
    check_nonnegative_int("shard_rows", "n", n)
    check_positive_int("shard_rows", "world_size", world_size)
    check_nonnegative_int("shard_rows", "rank", rank)
    if rank >= world_size:
        raise ValueError(f"shard_rows: rank must be < world_size = {world_size}, got {rank}.")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class _SumOverRanks(torch.autograd.Function):
    r"""Differentiable ``Σ_r x_r``: the backward of a sum over ranks is again a sum over ranks.

    .. math:: \frac{\partial}{\partial x_r} \sum_s L_s = \sum_s
        \frac{\partial L_s}{\partial y}, \qquad y = \sum_s x_s

    ``torch.distributed.nn.functional.all_reduce`` computes the same but is deprecated; this
    function holds only the group it is given (``None``: the default group, looked up at
    each call), so it never keeps a destroyed group alive.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: object | None) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _SumOverRanks.apply(grad, ctx.group), None


class Communicator:
    r"""Counted sum and gather collectives over a process group (identity on one process).

    Args:
        group: a ``torch.distributed`` process group; ``None``: the default group when
            ``torch.distributed`` is initialized, else a single process (rank 0 of 1).

    Cost: an all-reduce of ``b`` bytes over ``R`` ranks moves ``≈ 2 b (R − 1)/R`` bytes per
    rank (ring) in ``≈ 2 (R − 1)`` latency steps.

    Example:
        >>> comm = Communicator()          # not initialized: one process
        >>> comm.rank, comm.world_size
        (0, 1)
        >>> comm.all_reduce(torch.ones(3)).tolist(), comm.stats.calls
        ([1.0, 1.0, 1.0], 0)
    """

    def __init__(self, group: object | None = None):
        self.active = dist.is_available() and dist.is_initialized()
        if group is not None and not self.active:
            raise ValueError(
                "Communicator: a process group was given but torch.distributed is not "
                "initialized; call pyro_ntk.distributed.init_from_env() first."
            )
        self.group = group
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.stats = CommStats()

    @property
    def distributed(self) -> bool:
        """Whether collectives actually communicate (more than one rank)."""
        return self.active and self.world_size > 1

    def _run(self, what: str, nbytes: int, fn) -> None:
        start = time.perf_counter()
        try:
            fn()
        except RuntimeError as exc:  # DistBackendError and gloo/NCCL errors subclass it
            raise DistributedError(
                f"pyro_ntk.distributed: {what} of {nbytes} bytes failed on rank {self.rank} "
                f"of {self.world_size}: a peer rank raised or exited, or the collective timed "
                f"out (the process group's timeout). Original error: {exc}"
            ) from exc
        self.stats.calls += 1
        self.stats.bytes += nbytes
        self.stats.seconds += time.perf_counter() - start

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """``Σ_r tensor_r`` on every rank (a new tensor; differentiable when it requires grad).

        The backward of a differentiable sum is again an all-reduce: each rank's gradient
        is that of the sum of all ranks' losses.
        """
        tensor = check_tensor("Communicator.all_reduce", "tensor", tensor)
        if not self.distributed:
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.requires_grad and torch.is_grad_enabled():
            box: list[Tensor] = []
            self._run(
                "all_reduce", nbytes, lambda: box.append(_SumOverRanks.apply(tensor, self.group))
            )
            return box[0]
        out = tensor.detach().clone().contiguous()
        self._run("all_reduce", nbytes, lambda: dist.all_reduce(out, group=self.group))
        return out

    def broadcast(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s ``tensor`` on every rank (same shape and dtype everywhere; a copy)."""
        tensor = check_tensor("Communicator.broadcast", "tensor", tensor)
        if not self.distributed:
            return tensor
        out = tensor.detach().clone().contiguous()
        nbytes = out.numel() * out.element_size()
        self._run("broadcast", nbytes, lambda: dist.broadcast(out, src=src, group=self.group))
        return out

    def sum_int(self, value: int) -> int:
        """``Σ_r value_r`` of a Python int (e.g. the global number of rows)."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self._device())
        return int(self.all_reduce(t).item())

    def all_gather_rows(self, tensor: Tensor) -> tuple[Tensor, slice]:
        """Concatenate every rank's rows (counts may differ, even be zero).

        Returns:
            ``(gathered, mine)``: the ``(Σ_r n_r, ...)`` tensor in rank order and the rows
            of it that came from this rank. Cost: one all-gather of ``R × max_r n_r`` rows.
        """
        tensor = check_tensor("Communicator.all_gather_rows", "tensor", tensor)
        if not self.distributed:
            return tensor, slice(0, tensor.shape[0])
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=self._device())
        sizes[self.rank] = tensor.shape[0]
        sizes = self.all_reduce(sizes).tolist()
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        nbytes = padded.numel() * padded.element_size()
        self._run(
            "all_gather", nbytes, lambda: dist.all_gather(parts, padded.contiguous(), self.group)
        )
        start = sum(sizes[: self.rank])
        gathered = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
        return gathered, slice(start, start + tensor.shape[0])

    def _device(self) -> torch.device:
        if self.active and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size})"


def init_from_env(
    backend: str | None = None, *, timeout: float = 300.0, init_method: str | None = None
) -> Communicator:
    """Join the process group described by ``torchrun``'s environment, or run alone.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (and
    ``LOCAL_RANK`` for the GPU) as ``torchrun`` sets them. Without ``WORLD_SIZE`` in the
    environment (a plain ``python script.py``) nothing is initialized and a one-process
    :class:`Communicator` is returned, so the same script runs both ways. An already
    initialized default group is reused.

    Teardown: end with ``dist.barrier()`` and ``dist.destroy_process_group()`` on every
    rank. Destroying the group joins gloo's worker threads while the interpreter is alive;
    a worker thread still running at interpreter finalization may free a Python-owned
    tensor there, and CPython < 3.14 ends such a thread with ``pthread_exit``, which aborts
    the process ("terminate called without an active exception").

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); ``None``: NCCL when CUDA is
            available, else gloo.
        timeout: seconds a collective may wait for the other ranks before every waiting
            rank raises :class:`DistributedError` (a failed peer usually closes its
            connection first, which raises at once).
        init_method: a rendezvous URL (``"file:///tmp/x"``, ``"tcp://host:port"``);
            ``None``: ``"env://"``.

    Returns:
        The :class:`Communicator` of the default group.

    Example:
        >>> comm = init_from_env()   # outside torchrun: one process
        >>> comm.world_size
        1
    """
    where = "init_from_env"
    if dist.is_available() and dist.is_initialized():
        return Communicator()
    if "WORLD_SIZE" not in os.environ and init_method in (None, "env://"):
        return Communicator()
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"{where}: timeout must be a positive number of seconds, got {timeout!r}.")
    if not dist.is_available():
        raise RuntimeError(f"{where}: this torch build has no torch.distributed.")
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    needed = list(env) if init_method in (None, "env://") else ["RANK", "WORLD_SIZE"]
    missing = [k for k in needed if env[k] is None]
    if missing:
        raise ValueError(
            f"{where}: {missing} are not set; launch with torchrun, or set RANK and "
            f"WORLD_SIZE (and MASTER_ADDR, MASTER_PORT for env://); got {env}."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"{where}: backend must be 'gloo' or 'nccl', got {backend!r}.")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {}
    if init_method not in (None, "env://"):
        kwargs = {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"])}
    dist.init_process_group(
        backend,
        init_method=init_method or "env://",
        timeout=datetime.timedelta(seconds=float(timeout)),
        **kwargs,
    )
    return Communicator()
