r"""linear_operator's partial pivoted Cholesky of the NTK, put in eigen-form.

.. math::

    K \approx L L^\top = U \Sigma^2 U^\top \quad (L = U \Sigma V^\top)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_ntk.linearization import Linearization
from pyro_ntk.operators.ntk import NTKLinearOperator
from pyro_ntk.preconditioners.base import Preconditioner

__all__ = ["PivotedCholeskyPreconditioner"]


class PivotedCholeskyPreconditioner(Preconditioner):
    r"""linear_operator's partial pivoted Cholesky of ``K`` (gpytorch's default), in eigen-form.

    .. math:: K \approx L L^\top = U \Sigma^2 U^\top \quad (L = U \Sigma V^\top)

    ``L`` is ``linear_operator.operators.LinearOperator.pivoted_cholesky(rank)`` of the
    package's ``NTKLinearOperator``: the exact ``diag K`` plus ``k`` rows of ``K`` (each a
    one-point VJP and an ``N``-point JVP). With a constant noise, ``M = L Lᵀ + s² I`` is
    the matrix gpytorch's default preconditioner inverts; here it is factored once and reused
    across σ² and s².

    Cost: ``diag K`` (``O`` per-example gradients) + ``k`` sequential rows, each ≈ ½ K·v
    (counted as ``k/2`` in ``products``; ``diag K`` is not counted).

    Args:
        network: the trained ``nn.Module`` or a :class:`~pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        error_tol: stop early once the trace of the residual is below it (``None``:
            ``linear_operator.settings.preconditioner_tolerance``, 1e-3, as gpytorch).
        **common: ``rank`` (``k``), ``seed`` (unused: deterministic), ``variance``,
            ``rebuild_factor``, ``params``, ``chunk_size``, as
            :class:`~pyro_ntk.preconditioners.Preconditioner`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> X = torch.randn(20, 2, dtype=torch.float64)
        >>> PivotedCholeskyPreconditioner(net.double(), X, rank=5).build().eigenform()[0].d.shape
        torch.Size([5])
    """

    kind = "pivoted_cholesky"

    def __init__(
        self,
        network: nn.Module | Linearization,
        X: Tensor,
        *,
        error_tol: float | None = None,
        **common,
    ):
        self.error_tol = error_tol
        super().__init__(network, X, **common)

    def _build(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor | None, float]:
        variance = None if bool((ref == 1).all()) else ref
        K = NTKLinearOperator(self.X, None, variance, network=self.linearization)
        L = K.pivoted_cholesky(rank=self.rank, error_tol=self.error_tol)
        U, S, _ = torch.linalg.svd(L.detach(), full_matrices=False)
        return U, S.square(), None, 0.5 * float(L.shape[-1])  # a row ≈ ½ K·v
