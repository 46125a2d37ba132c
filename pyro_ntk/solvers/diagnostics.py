r"""What a linear solve did: :class:`SolverDiagnostics` and, per escalation step, :class:`SolveAttempt`.

Every solver of :mod:`pyro_ntk.solvers` returns a :class:`SolverDiagnostics`; an escalated
solve (:func:`~pyro_ntk.solvers.solve_with_escalation`) lists one :class:`SolveAttempt` per
step in :attr:`SolverDiagnostics.attempts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SolveAttempt", "SolverDiagnostics"]


@dataclass
class SolverDiagnostics:
    """What a linear solve did, readable after the fact.

    Attributes:
        method: ``"cg"``, ``"pcg"`` (preconditioned CG) or ``"cholesky"``.
        iterations: CG iterations the slowest right-hand side needed (iterations run past
            convergence between host checks are masked and not counted here).
        relative_residual: the largest final ``‖b − A x‖ / ‖b‖`` over right-hand sides
            (the recursively updated residual CG maintains).
        converged: whether every right-hand side reached ``tol``.
        tol: the requested relative residual.
        matvecs: products with ``A`` actually run (a batched ``t``-column product counts
            once; includes up to ``check_every − 1`` masked iterations after convergence).
        num_rhs: ``t``, the number of right-hand sides.
        setup_seconds: time spent building the preconditioner (``0.0`` when none or
            when it was built earlier and reused).
        solve_seconds: wall time of the iteration.
        residual_history: relative residual (max over columns) at each host check.
        attempts: one :class:`SolveAttempt` per step of an escalated solve
            (:func:`solve_with_escalation`), in the order run; empty for a single solve.
            After an escalation the fields above describe the whole solve: ``method`` and
            ``relative_residual`` of the returned result, ``iterations``, ``matvecs``,
            ``setup_seconds`` and ``solve_seconds`` summed over the attempts.
    """

    method: str
    iterations: int
    relative_residual: float
    converged: bool
    tol: float
    matvecs: int
    num_rhs: int = 1
    setup_seconds: float = 0.0
    solve_seconds: float = 0.0
    residual_history: list[float] = field(default_factory=list)
    attempts: list[SolveAttempt] = field(default_factory=list)

    @property
    def escalated(self) -> bool:
        """Whether the first CG attempt stopped unconverged and further steps ran."""
        return len(self.attempts) > 1

    def __str__(self) -> str:
        state = "converged" if self.converged else "NOT converged"
        text = (
            f"{self.method}: {state} after {self.iterations} iterations, relative residual "
            f"{self.relative_residual:.2e} (tol {self.tol:.0e}), {self.matvecs} products of "
            f"{self.num_rhs} column(s), setup {self.setup_seconds:.3g}s, solve {self.solve_seconds:.3g}s"
        )
        if self.escalated:
            text += "; attempts: " + "; ".join(str(a) for a in self.attempts)
        return text


@dataclass
class SolveAttempt:
    """One step of an escalated solve (see :func:`solve_with_escalation`).

    Attributes:
        step: ``"initial"``, ``"more_iterations"``, ``"stronger_preconditioner"`` or
            ``"cholesky"``.
        method: ``"cg"``, ``"pcg"`` or ``"cholesky"``.
        preconditioner: the preconditioner's name (``None``: none; ``"cholesky"``: n/a).
        rank: the preconditioner's rank (``None`` when it has none).
        max_iter: the iteration cap of this step (``0`` for Cholesky).
        iterations: CG iterations run (slowest column; ``0`` for Cholesky).
        relative_residual: largest ``‖b − A x‖ / ‖b‖`` over the columns at the end of the
            step (CG: the recursively updated residual; Cholesky: recomputed with one product
            with ``A``; ``inf`` when the step could not run).
        converged: whether every column reached the tolerance.
        seconds: wall time of the step (a preconditioner build included).
        note: why a step was skipped or failed (e.g. the memory guard's refusal).
    """

    step: str
    method: str
    preconditioner: str | None
    rank: int | None
    max_iter: int
    iterations: int
    relative_residual: float
    converged: bool
    seconds: float = 0.0
    note: str = ""

    def __str__(self) -> str:
        pre = "" if self.method == "cholesky" else f", preconditioner {self.preconditioner}"
        pre += f" rank {self.rank}" if self.rank is not None else ""
        its = "" if self.method == "cholesky" else f", {self.iterations}/{self.max_iter} iterations"
        state = "converged" if self.converged else "unconverged"
        note = f" ({self.note})" if self.note else ""
        return (
            f"{self.step} [{self.method}{pre}{its}]: {state}, relative residual "
            f"{self.relative_residual:.2e}{note}"
        )
