"""Choosing a preconditioner by name, and the "no preconditioner" choice.

``make_preconditioner(kind, ...)`` maps a :class:`~pyro_ntk.options.PreconditionerKind` (or its
string) ``"auto"`` / ``"fisher"`` / ``"nystrom"`` / ``"pivoted_cholesky"`` to their classes
and ``"none"`` (or ``None``) to :class:`IdentityPreconditioner`.
"""

from __future__ import annotations

from torch import Tensor, nn

from pyro_ntk.linearization import Linearization
from pyro_ntk.options import PreconditionerKind as Kind
from pyro_ntk.options import as_preconditioner
from pyro_ntk.preconditioners.base import Preconditioner
from pyro_ntk.preconditioners.fisher import FisherPreconditioner
from pyro_ntk.preconditioners.nystrom import NystromPreconditioner
from pyro_ntk.preconditioners.pivoted_cholesky import PivotedCholeskyPreconditioner

__all__ = ["KINDS", "IdentityPreconditioner", "make_preconditioner"]

KINDS = tuple(Kind)
"""Every preconditioner choice, :class:`pyro_ntk.options.PreconditionerKind` (``None`` = ``"none"``)."""


class IdentityPreconditioner:
    """No preconditioning: ``override`` makes linear_operator run plain CG.

    (``AddedDiagLinearOperator(..., preconditioner_override=None)`` would instead fall back to
    gpytorch's default pivoted Cholesky.)

    Example:
        >>> IdentityPreconditioner().override()(None)
        (None, None, None)
    """

    kind = None
    rebuilds = 0
    setup_seconds = 0.0
    products = 0.0

    def override(self, variance: object = None, noise: object = None):
        """``f(op) -> (None, None, None)``."""
        return lambda op: (None, None, None)

    def solve_closure(self, variance: object = None, noise: object = 1.0):
        """``None``: no preconditioner."""
        return None


def make_preconditioner(
    kind: Kind | str | None,
    network: nn.Module | Linearization,
    X: Tensor,
    **options,
) -> Preconditioner | IdentityPreconditioner:
    r"""Build a preconditioner for ``σ² K(X, X) + s² I`` by name.

    Lazily: the sketch is taken on first use and then reused for every σ² and s².

    ``"auto"`` is ``"fisher"`` with its defaults (Kronecker eigen-directions for the linear
    layers the structured engine factors, a range finder for the other parameters: the
    fewest iterations for the least set-up in ``benchmarks/RESULTS.md``); ``None`` is no
    preconditioner.

    Args:
        kind: a :class:`~pyro_ntk.options.PreconditionerKind` or its string: ``"auto"``,
            ``"fisher"``, ``"nystrom"``, ``"pivoted_cholesky"``, ``"none"`` (or ``None``).
        network: the trained ``nn.Module`` or a :class:`~pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        **options: passed to the class: ``rank`` (``k``), ``seed``, ``variance``,
            ``params``, ``chunk_size`` (:class:`Preconditioner`) and the kind's own (e.g.
            ``power_iterations``).

    Returns:
        A :class:`Preconditioner` (or :class:`IdentityPreconditioner` for ``None``); use
        ``.override(variance, noise)`` as ``preconditioner_override``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = Linearization(net.double())
        >>> make_preconditioner("nystrom", lin, torch.randn(10, 2, dtype=torch.float64), rank=4).kind
        'nystrom'
    """
    kind = as_preconditioner("make_preconditioner", kind, "kind")
    if kind == Kind.NONE:
        return IdentityPreconditioner()
    classes = {
        Kind.AUTO: FisherPreconditioner,
        Kind.FISHER: FisherPreconditioner,
        Kind.NYSTROM: NystromPreconditioner,
        Kind.PIVOTED_CHOLESKY: PivotedCholeskyPreconditioner,
    }
    return classes[kind](network, X, **options)
