r"""Stabilized randomized Nyström on the NTK (sketch ``K Ω``).

.. math::

    K \approx (K\Omega)(\Omega^\top K \Omega)^{-1}(K\Omega)^\top = U \operatorname{diag}(d) U^\top
"""

from __future__ import annotations

from torch import Tensor, nn

from pyro_ntk._checks import check_nonnegative_int
from pyro_ntk.linearization import Linearization
from pyro_ntk.preconditioners.base import Preconditioner
from pyro_ntk.preconditioners.eigenform import randomized_eigh

__all__ = ["NystromPreconditioner"]


class NystromPreconditioner(Preconditioner):
    r"""Stabilized randomized Nyström on ``K`` (sketch ``K Ω``, ``Ω`` orthonormal ``(n, k + p)``).

    .. math:: K \approx (K\Omega)(\Omega^\top K \Omega)^{-1}(K\Omega)^\top = U \operatorname{diag}(d) U^\top

    Cost: ``k + p`` K·v-equivalents (one batched NTK product), memory ``O(n (k + p))``.

    Args:
        network: the trained ``nn.Module`` or a :class:`~pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        oversampling: ``p``.
        power_iterations: ``q`` (each one more NTK product of ``k + p`` columns).
        **common: ``rank`` (``k``), ``seed`` (of the sketch), ``variance``,
            ``rebuild_factor``, ``params``, ``chunk_size``, as
            :class:`~pyro_ntk.preconditioners.Preconditioner`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> X = torch.randn(20, 2, dtype=torch.float64)
        >>> pre = NystromPreconditioner(net.double(), X, rank=5)
        >>> pre.build().rank, pre.products
        (5, 5.0)
    """

    kind = "nystrom"

    def __init__(
        self,
        network: nn.Module | Linearization,
        X: Tensor,
        *,
        oversampling: int = 0,
        power_iterations: int = 0,
        **common,
    ):
        check_nonnegative_int("NystromPreconditioner", "oversampling", oversampling)
        check_nonnegative_int("NystromPreconditioner", "power_iterations", power_iterations)
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        super().__init__(network, X, **common)

    def _build(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor | None, float]:
        lin, X = self.linearization, self.X
        variance = None if bool((ref == 1).all()) else ref

        def K(V: Tensor) -> Tensor:
            return lin.ntk_mvm(X, X, V, variance=variance)

        pre = randomized_eigh(
            K,
            self.size,
            self.rank,
            dtype=lin.dtype,
            device=lin.device,
            oversampling=self.oversampling,
            power_iterations=self.power_iterations,
            seed=self.seed,
        )
        return pre.U, pre.d, None, pre.products
