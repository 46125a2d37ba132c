r"""Escalation of an unconverged CG solve: more iterations, a stronger preconditioner, Cholesky.

.. math::

    A X = B, \qquad \text{stop when } \max_j \|b_j - A x_j\| / \|b_j\| \le \mathrm{tol},

each step run only when the previous one ended above the tolerance, warm-started from the
best iterate so far, and recorded as a :class:`~pyro_ntk.solvers.SolveAttempt`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from pyro_ntk._checks import check_positive_int
from pyro_ntk.solvers.cg import MatmulLike, _as_matmul, conjugate_gradient
from pyro_ntk.solvers.diagnostics import SolveAttempt, SolverDiagnostics

__all__ = ["ESCALATION_ITERATION_FACTOR", "solve_with_escalation"]


ESCALATION_ITERATION_FACTOR = 4
""":func:`solve_with_escalation` reruns an unconverged CG with this many times ``max_iter``."""

StrongerPreconditioner = Callable[[], "tuple[MatmulLike, str | None, int | None] | None"]


def _column_residual(matmul: MatmulLike, X: Tensor, B: Tensor) -> float:
    """Largest ``‖b − A x‖ / ‖b‖`` over the columns (one product with ``A``)."""
    Bm, Xm = (B.unsqueeze(-1), X.unsqueeze(-1)) if B.dim() == 1 else (B, X)
    num = torch.linalg.vector_norm(Bm - matmul(Xm), dim=0)
    den = torch.linalg.vector_norm(Bm, dim=0)
    rel = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), num)
    return float(rel.max()) if rel.numel() else 0.0


def solve_with_escalation(
    A: Tensor | MatmulLike | object,
    B: Tensor,
    *,
    preconditioner: MatmulLike | None = None,
    preconditioner_name: str | None = None,
    preconditioner_rank: int | None = None,
    stronger: StrongerPreconditioner | None = None,
    dense: Callable[[], Tensor] | None = None,
    tol: float = 1e-4,
    max_iter: int = 1000,
    check_every: int = 10,
    iteration_factor: int = ESCALATION_ITERATION_FACTOR,
    setup_seconds: float = 0.0,
    warn: bool = True,
    where: str = "solve_with_escalation",
    **cg_options,
) -> tuple[Tensor, SolverDiagnostics]:
    r"""Solve ``A X = B`` by preconditioned CG; if it stops unconverged, escalate.

    .. math::

        \text{stop when } \max_j \|b_j - A x_j\| / \|b_j\| \le \mathrm{tol}

    Steps, each run only if the previous one ended above ``tol``, each warm-started from
    the best iterate so far:

    1. ``"initial"``: :func:`conjugate_gradient` with ``preconditioner``, ``max_iter``.
    2. ``"more_iterations"``: the same preconditioner, ``iteration_factor × max_iter``
       iterations (default 4×).
    3. ``"stronger_preconditioner"``: ``stronger()`` builds one (e.g. 4× the rank, or the
       Fisher preconditioner instead of none), ``iteration_factor × max_iter`` iterations;
       skipped when ``stronger`` is ``None`` or returns ``None``.
    4. ``"cholesky"``: ``dense()``, an exact dense solve (e.g.
       :func:`cholesky_with_jitter`); its residual is recomputed with one product with
       ``A``. A ``ValueError`` or ``MemoryError`` from it (the memory guard's refusal, a
       matrix not positive definite even with the capped jitter) is recorded and the step
       counts as failed. Skipped when ``dense`` is ``None``.

    The result is the attempt with the smallest relative residual. Warnings
    (:class:`~linear_operator.utils.warnings.NumericalWarning`, unless ``warn=False``): one
    when the first CG stops unconverged (its iterations and residual, and that it
    escalates), and one at the end of an escalation with every attempt's figures, stating
    whether the tolerance was reached and, if not, the residual of the returned iterate.
    Every attempt is recorded in :attr:`SolverDiagnostics.attempts`.

    Args:
        A: SPD ``(n, n)``: a tensor, a ``LinearOperator`` or a callable ``X -> A X``.
        B: right-hand sides ``(n,)`` or ``(n, t)``.
        preconditioner: ``R -> M⁻¹ R`` of the first two steps (``None``: plain CG).
        preconditioner_name: its name, for the record (e.g. ``"fisher"``).
        preconditioner_rank: its rank, for the record.
        stronger: ``() -> (closure, name, rank)`` or ``None`` (no stronger one exists).
        dense: ``() -> X``, an exact dense solve of ``A X = B``.
        tol: target relative residual per column.
        max_iter: the first step's iteration cap.
        check_every: iterations between host-side convergence checks.
        iteration_factor: the later CG steps' cap is ``iteration_factor × max_iter``.
        setup_seconds: the first preconditioner's set-up time, for the record.
        warn: emit the warnings above.
        where: the calling entry point, first in every message.
        **cg_options: passed on to every :func:`conjugate_gradient` call.

    Returns:
        ``(X, diagnostics)`` with ``X`` of ``B``'s shape. Cost: a converged first step is
        exactly :func:`conjugate_gradient`; an escalation adds at most
        ``2 × iteration_factor × max_iter`` products with ``A`` and ``M⁻¹``, the stronger
        preconditioner's build, and the dense solve.

    Example:
        >>> A = torch.diag(torch.logspace(0, 8, 50, dtype=torch.float64))
        >>> b = torch.ones(50, dtype=torch.float64)
        >>> dense = lambda: torch.linalg.solve(A, b)
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     warnings.simplefilter("always")
        ...     x, d = solve_with_escalation(A, b, dense=dense, tol=1e-10, max_iter=3)
        >>> [a.step for a in d.attempts], d.method, d.converged
        (['initial', 'more_iterations', 'cholesky'], 'cholesky', True)
    """
    matmul = _as_matmul(A, where)
    check_positive_int(where, "iteration_factor", iteration_factor)
    attempts: list[SolveAttempt] = []
    history: list[float] = []
    totals = {"iterations": 0, "matvecs": 0, "setup": 0.0, "seconds": 0.0}
    best: dict = {"X": None, "rel": math.inf, "method": "cg", "converged": False}

    def keep(X: Tensor, attempt: SolveAttempt) -> None:
        attempts.append(attempt)
        rel = attempt.relative_residual
        if math.isfinite(rel) and rel < best["rel"] and bool(torch.isfinite(X).all()):
            best.update(X=X, rel=rel, method=attempt.method, converged=attempt.converged)

    def run_cg(step, closure, name, rank, cap, setup) -> tuple[Tensor, SolverDiagnostics]:
        start = time.perf_counter()
        X, d = conjugate_gradient(
            matmul,
            B,
            preconditioner=closure,
            x0=best["X"],
            tol=tol,
            max_iter=cap,
            check_every=check_every,
            warn=False,
            setup_seconds=setup,
            **cg_options,
        )
        totals["iterations"] += d.iterations
        totals["matvecs"] += d.matvecs
        totals["setup"] += setup
        totals["seconds"] += time.perf_counter() - start + setup
        history.extend(d.residual_history)
        keep(
            X,
            SolveAttempt(
                step,
                d.method,
                name,
                rank,
                cap,
                d.iterations,
                d.relative_residual,
                d.converged,
                time.perf_counter() - start + setup,
            ),
        )
        return X, d

    X0, first = run_cg(
        "initial", preconditioner, preconditioner_name, preconditioner_rank, max_iter, setup_seconds
    )
    if first.converged:
        first.attempts = attempts
        return X0, first
    t = 1 if B.dim() == 1 else B.shape[-1]
    if warn:
        warnings.warn(
            f"{where}: CG stopped unconverged after {first.iterations} iterations (max_iter "
            f"{max_iter}) with relative residual {first.relative_residual:.3e} > tol {tol:.1e} "
            f"({t} column(s)); escalating: {iteration_factor}× the iterations, then a stronger "
            "preconditioner, then a dense Cholesky solve where the memory allows.",
            NumericalWarning,
            stacklevel=2,
        )
    cap = iteration_factor * max_iter
    run_cg("more_iterations", preconditioner, preconditioner_name, preconditioner_rank, cap, 0.0)
    if not best["converged"] and stronger is not None:
        start = time.perf_counter()
        built = stronger()
        build_seconds = time.perf_counter() - start
        if built is None:
            attempts.append(
                SolveAttempt(
                    "stronger_preconditioner",
                    "pcg",
                    preconditioner_name,
                    preconditioner_rank,
                    0,
                    0,
                    math.inf,
                    False,
                    note="skipped: no stronger preconditioner (the rank is already n)",
                )
            )
        else:
            closure, name, rank = built
            run_cg("stronger_preconditioner", closure, name, rank, cap, build_seconds)
    if not best["converged"] and dense is not None:
        start = time.perf_counter()
        note, X, rel = "", None, math.inf
        try:
            X = dense()
            rel = _column_residual(matmul, X, B)
        except (ValueError, MemoryError) as exc:
            note = f"failed: {exc}"
        seconds = time.perf_counter() - start
        totals["seconds"] += seconds
        attempt = SolveAttempt(
            "cholesky", "cholesky", None, None, 0, 0, rel, rel <= tol, seconds, note
        )
        if X is None:
            attempts.append(attempt)
        else:
            keep(X, attempt)
    if best["X"] is None:  # every attempt produced NaN/Inf: nothing sound to return
        raise ValueError(
            f"{where}: every solve attempt produced non-finite values; attempts: "
            + "; ".join(str(a) for a in attempts)
            + ". Check the operator, the right-hand side, the variance and the noise."
        )
    diag = SolverDiagnostics(
        method=best["method"],
        iterations=totals["iterations"],
        relative_residual=best["rel"],
        converged=best["converged"],
        tol=float(tol),
        matvecs=totals["matvecs"],
        num_rhs=t,
        setup_seconds=totals["setup"],
        solve_seconds=totals["seconds"] - totals["setup"],
        residual_history=history,
        attempts=attempts,
    )
    if warn:
        record = "; ".join(str(a) for a in attempts)
        if diag.converged:
            outcome = f"reached tol {tol:.1e} with {diag.method} (relative residual {diag.relative_residual:.3e})"
        else:
            outcome = (
                f"did NOT reach tol {tol:.1e}: returning the best iterate ({diag.method}) with "
                f"relative residual {diag.relative_residual:.3e}. Use a larger noise or jitter, "
                "float64, a higher preconditioner rank, or more iterations"
            )
        warnings.warn(
            f"{where}: escalated solve {outcome}. Attempts: {record}.",
            NumericalWarning,
            stacklevel=2,
        )
    return best["X"], diag
