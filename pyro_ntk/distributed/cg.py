r"""Conjugate gradients on a row-sharded SPD system: inner products all-reduced over ranks.

.. math:: \langle u, v \rangle = \textstyle\sum_r u_r^\top v_r
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from pyro_ntk.distributed.linearization import ShardedLinearization
from pyro_ntk.solvers import SolverDiagnostics, conjugate_gradient

__all__ = ["sharded_conjugate_gradient"]


def sharded_conjugate_gradient(
    A: Callable[[Tensor], Tensor],
    B: Tensor,
    *,
    linearization: ShardedLinearization,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    **options,
) -> tuple[Tensor, SolverDiagnostics]:
    r""":func:`pyro_ntk.solvers.conjugate_gradient` on a row-sharded SPD system.

    .. math:: \langle u, v \rangle = \textstyle\sum_r u_r^\top v_r \quad (\text{all-reduced})

    Every rank passes its rows of ``B`` and a product ``A`` that returns its rows of the
    global product; inner products and norms are all-reduced, so all ranks run the same
    iterations and stop together.

    Args:
        A: ``V_r ↦ (A V)_r`` for this rank's rows ``(n_r, t)`` (a collective).
        B: this rank's rows ``(n_r,)`` or ``(n_r, t)``.
        linearization: the :class:`ShardedLinearization` whose communicator reduces.
        preconditioner: ``R_r ↦ (M⁻¹ R)_r`` or ``None``.
        **options: ``tol``, ``max_iter``, ``check_every``, ``x0``, ``warn``,
            ``setup_seconds`` of :func:`~pyro_ntk.solvers.conjugate_gradient`.

    Returns:
        ``(X_r, diagnostics)``. Communication per iteration: the products' own, plus three
        all-reduces of ``t`` numbers.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = ShardedLinearization(net.double())
        >>> X = torch.randn(10, 2, dtype=torch.float64)
        >>> b = torch.randn(10, dtype=torch.float64)
        >>> x, d = sharded_conjugate_gradient(lambda V: lin.ntk_mvm(X, X, V) + V, b,
        ...                                   linearization=lin, tol=1e-10)
        >>> d.converged
        True
    """
    if not isinstance(linearization, ShardedLinearization):
        raise TypeError(
            "sharded_conjugate_gradient: linearization must be a ShardedLinearization, got "
            f"{type(linearization).__name__}."
        )
    return conjugate_gradient(
        A, B, preconditioner=preconditioner, reduce=linearization.comm.all_reduce, **options
    )
