r"""The solver choices of the function-space Gaussian, as one frozen options object.

.. math:: A = \sigma^2 K(X, X) + d\, I \quad\text{solved by}\quad
    \begin{cases} L L^\top = A & \text{(Cholesky, } n = N \cdot O \le n_{\max}) \\
    \text{preconditioned CG / mBCG + SLQ} & \text{(matrix-free)} \end{cases}

:class:`Solver` and :class:`PreconditionerKind` are string enums (each choice defined once;
plain strings are accepted wherever they are); :class:`SolverOptions` gathers the seven
knobs of :class:`~pyro_ntk.NTKGPRegression`, :class:`~pyro_ntk.LinearizedNetwork` and
:class:`~pyro_ntk.gp.NTKSystem`, validated once on construction.

Example:
    >>> SolverOptions(solver="cg", preconditioner=None).preconditioner
    <PreconditionerKind.NONE: 'none'>
    >>> SolverOptions(solver="cg").solver == "cg"
    True
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyro_ntk._checks import check_positive_int

__all__ = [
    "DEFAULT_MAX_CHOLESKY_SIZE",
    "PreconditionerKind",
    "Solver",
    "SolverOptions",
    "as_preconditioner",
]

DEFAULT_MAX_CHOLESKY_SIZE = 4000
"""``solver="auto"`` uses the dense Cholesky path while ``N·O`` is at most this (and fits).

Measured with ``benchmarks/bench_solver.py`` (trained 26-128-128-1 MLP, P = 20,097, float64,
2-core CPU): a full :class:`~pyro_ntk.NTKGPRegression` evaluation (log marginal likelihood,
its gradient, posterior mean) costs the same on both paths at ``N·O = 4000`` when repeated
(19.8 s each, loaded machine) and dense is 1.5× faster for the first one; dense is 5–9×
faster at 1000–2000 (first evaluation) and 4–5× slower at 8000. On an H100 the dense solve
wins up to ``10⁴`` (``benchmarks/RESULTS.md``): raise ``max_cholesky_size`` there.
"""


class Solver(str, enum.Enum):
    """How ``A = σ²K + d I`` is solved and its log-determinant taken."""

    AUTO = "auto"
    """:func:`~pyro_ntk.solvers.choose_solver`: Cholesky while ``N·O <= max_cholesky_size``
    and the dense kernel fits in memory, else CG."""

    CHOLESKY = "cholesky"
    """The dense kernel, built once (per layer for per-layer variances), and its factor."""

    CG = "cg"
    """Matrix-free: preconditioned CG, and mBCG with stochastic Lanczos quadrature."""


class PreconditionerKind(str, enum.Enum):
    """The preconditioner of the matrix-free route (:func:`~pyro_ntk.make_preconditioner`)."""

    AUTO = "auto"
    """``"fisher"`` with its defaults."""

    FISHER = "fisher"
    """:class:`~pyro_ntk.FisherPreconditioner`: Kronecker / range-finder Fisher directions."""

    NYSTROM = "nystrom"
    """:class:`~pyro_ntk.NystromPreconditioner`: randomized Nyström on K."""

    PIVOTED_CHOLESKY = "pivoted_cholesky"
    """:class:`~pyro_ntk.preconditioners.PivotedCholeskyPreconditioner`."""

    NONE = "none"
    """No preconditioner: plain CG (``None`` means the same)."""


def as_preconditioner(where: str, kind: object, name: str = "preconditioner") -> PreconditionerKind:
    """``kind`` as a :class:`PreconditionerKind` (``None`` is :attr:`PreconditionerKind.NONE`).

    A ``ValueError`` names ``where``, the argument ``name``, the value and the choices.
    """
    if kind is None:
        return PreconditionerKind.NONE
    try:
        return PreconditionerKind(kind)
    except ValueError:
        choices = [p.value for p in PreconditionerKind] + [None]
        raise ValueError(f"{where}: {name} must be one of {choices}, got {kind!r}.") from None


@dataclass(frozen=True)
class SolverOptions:
    """The numerical knobs of the function-space Gaussian, validated once.

    Attributes:
        solver: a :class:`Solver` (``"auto"``, ``"cholesky"``, ``"cg"``).
        preconditioner: a :class:`PreconditionerKind` (``"auto"``, ``"fisher"``, ``"nystrom"``,
            ``"pivoted_cholesky"``, ``"none"``; ``None`` is stored as ``"none"``). CG only.
        max_cholesky_size: the ``"auto"`` threshold on ``N·O`` (an int).
        cg_tolerance: CG stopping rule, mean relative residual (solves and SLQ), ``> 0``.
        max_cg_iterations: CG iteration cap.
        num_trace_samples: probe vectors of stochastic Lanczos quadrature (``log|A|``).
        preconditioner_rank: the preconditioner's rank.
    """

    solver: Solver = Solver.AUTO
    preconditioner: PreconditionerKind | None = PreconditionerKind.AUTO
    max_cholesky_size: int = DEFAULT_MAX_CHOLESKY_SIZE
    cg_tolerance: float = 1e-4
    max_cg_iterations: int = 1000
    num_trace_samples: int = 10
    preconditioner_rank: int = 100

    def __post_init__(self) -> None:
        where = "SolverOptions"
        try:
            solver = Solver(self.solver)
        except ValueError:
            raise ValueError(
                f"{where}: solver must be one of {[s.value for s in Solver]}, got {self.solver!r}."
            ) from None
        object.__setattr__(self, "solver", solver)
        object.__setattr__(self, "preconditioner", as_preconditioner(where, self.preconditioner))
        size = self.max_cholesky_size
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"{where}: max_cholesky_size must be an int, got {size!r}.")
        tol = self.cg_tolerance
        if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"{where}: cg_tolerance must be a positive float, got {tol!r}.")
        object.__setattr__(self, "cg_tolerance", float(tol))
        check_positive_int(where, "max_cg_iterations", self.max_cg_iterations)
        check_positive_int(where, "num_trace_samples", self.num_trace_samples)
        check_positive_int(where, "preconditioner_rank", self.preconditioner_rank)
