r"""The linearization engine over row shards of the data: one all-reduce per ``Jᵀu``.

.. math::

    J^\top u = \sum_r J(X_r)^\top u_r, \qquad
    (K V)_r = J(X_r)\, \mathrm{diag}(\sigma^2) \sum_s J(X_s)^\top V_s, \qquad
    F v = \sum_r J(X_r)^\top \Lambda_r J(X_r) v.

Products that contract over the data (``vjp``, ``ntk_mvm``, the Fisher product) sum over
all ranks; products that map into function space (``__call__``, ``jvp``, ``jacobian``,
``ntk_diag``) return this rank's rows. So every operator built on a
:class:`~pyro_ntk.Linearization` (``NTKLinearOperator``, ``FisherLinearOperator``, the
Fisher preconditioner's sketches) works on sharded data without a change to its code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_ntk.distributed.comm import Communicator
from pyro_ntk.linearization import Linearization, NTKImplementation
from pyro_ntk.parameters import ParamSelector

__all__ = ["ShardedLinearization"]


class ShardedLinearization(Linearization):
    r"""A :class:`~pyro_ntk.Linearization` whose inputs are this rank's shard of the data.

    The single change is at the engine's data-loop seam: the parameter-space partial sum
    ``J(X_r)ᵀ U_r`` of every VJP is all-reduced, so ``vjp(X_r, u_r)`` returns the global
    ``Jᵀu`` on every rank and ``ntk_mvm(X1_r, X2_r, V_r)`` the local rows of the global
    product ``K(X1, X2) V``. Row-wise results stay local. ``ntk_dense(X1_r, X2_r)`` gathers
    ``X2`` from every rank and returns the local row block ``K(X1_r, X2)``.

    Every call that reduces is a collective: all ranks must make it, in the same order, with
    the same number of right-hand sides ``k``. Each rank must hold at least one row.

    Communication per product: one all-reduce of ``P·k`` numbers (``8·P·k`` bytes in
    float64) per ``vjp`` / ``ntk_mvm`` / Fisher product; ``jvp`` and ``ntk_diag`` none.
    Counted in ``comm.stats``.

    Args:
        network: the trained network, with the same θ* on every rank (checked at
            construction by one all-reduce of a checksum).
        params: which parameters to linearize (see :class:`~pyro_ntk.Linearization`).
        group: the process group (``None``: the default group, or one process when
            ``torch.distributed`` is not initialized).
        chunk_size: inputs per chunk within the shard.
        implementation: the engine (see :class:`~pyro_ntk.NTKImplementation`).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = ShardedLinearization(net)     # one process: the same as Linearization
        >>> X = torch.randn(5, 3)
        >>> lin.vjp(X, torch.ones(5, 1)).shape, lin.comm.world_size
        (torch.Size([41]), 1)
    """

    def __init__(
        self,
        network: nn.Module,
        params: ParamSelector = None,
        *,
        group: object | None = None,
        chunk_size: int | None = None,
        implementation: str | NTKImplementation = "auto",
    ):
        super().__init__(network, params, chunk_size=chunk_size, implementation=implementation)
        self.comm = Communicator(group)
        self._check_same_theta()

    def _check_same_theta(self) -> None:
        """Every rank must linearize at the same θ*: compare a checksum across ranks."""
        if not self.comm.distributed:
            return
        theta = [t.detach().reshape(-1).double() for t in self.theta.values()]
        flat = torch.cat(theta).cpu() if theta else torch.zeros(0, dtype=torch.float64)
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)
        local = torch.stack(
            [torch.tensor(float(flat.numel()), dtype=torch.float64), (weights * flat).sum()]
        ).to(self.comm._device())
        total = self.comm.all_reduce(local) / self.comm.world_size
        if not torch.allclose(total, local, rtol=1e-12, atol=1e-12):
            raise ValueError(
                f"ShardedLinearization: rank {self.comm.rank} of {self.comm.world_size} holds "
                f"different parameters from the others (P = {flat.numel()}, checksum "
                f"{float(local[1]):.17g}, mean over ranks {float(total[1]):.17g}); load the "
                f"same trained weights on every rank."
            )

    def sum_over_shards(self, partial: Tensor) -> Tensor:
        """All-reduce the parameter-space partial sum over the ranks' shards."""
        return self.comm.all_reduce(partial)

    def ntk_dense(
        self, X1: Tensor, X2: Tensor | None = None, variance: Tensor | float | None = None
    ) -> Tensor:
        """Local row block ``K(X1_r, X2)`` of shape ``(N1_r·O, N2·O)``, ``X2`` gathered.

        A collective (one all-gather of ``X2``'s rows). ``X2 = None`` means ``X1``.
        """
        X1 = self.check_inputs("ShardedLinearization.ntk_dense", "X1", X1)
        X2 = X1 if X2 is None else self.check_inputs("ShardedLinearization.ntk_dense", "X2", X2)
        gathered, _ = self.comm.all_gather_rows(X2)
        return self.local_ntk_dense(X1, gathered, variance)

    def local_ntk_dense(
        self, X1: Tensor, X2: Tensor | None = None, variance: Tensor | float | None = None
    ) -> Tensor:
        """Dense ``K(X1, X2)`` between two local tensors, no communication."""
        return super().ntk_dense(X1, X2, variance)

    def __repr__(self) -> str:
        return (
            f"ShardedLinearization({type(self.network).__name__}, P={self.num_params}, "
            f"rank={self.comm.rank}, world_size={self.comm.world_size}, "
            f"implementation={self.implementation.value!r}, chunk_size={self.chunk_size})"
        )
