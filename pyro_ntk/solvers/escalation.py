r"""One escalation ladder for an unconverged iterative method: more iterations, a stronger preconditioner, Cholesky.

.. math::

    A X = B \ \text{(solves)} \quad\text{or}\quad
    -\tfrac12\big(r^\top A^{-1} r + \log|A| + n \log 2\pi\big) \ \text{(log-densities)},
    \qquad \text{stop when } \max_j \|b_j - A x_j\| / \|b_j\| \le \mathrm{tol},

each step run only when the previous one ended above the tolerance and recorded as a
:class:`~pyro_ntk.solvers.SolveAttempt`. :func:`escalate` is the ladder, parameterised by
an *attempt* function (one run of the iterative method at a given preconditioner and
iteration cap); :func:`solve_with_escalation` is its CG-solve kind, and the mBCG
log-density of :mod:`pyro_ntk.gp.log_density` its other kind.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from pyro_ntk._checks import check_positive_int
from pyro_ntk.solvers.cg import MatmulLike, _as_matmul, conjugate_gradient
from pyro_ntk.solvers.diagnostics import SolveAttempt, SolverDiagnostics

__all__ = [
    "ESCALATION_ITERATION_FACTOR",
    "AttemptResult",
    "EscalationText",
    "Rung",
    "escalate",
    "solve_with_escalation",
]


ESCALATION_ITERATION_FACTOR = 4
""":func:`escalate` reruns an unconverged attempt with this many times ``max_iter``."""


@dataclass
class Rung:
    """One step of the ladder, as handed to the attempt function.

    Attributes:
        step: ``"initial"``, ``"more_iterations"`` or ``"stronger_preconditioner"``.
        preconditioner: whatever the attempt function applies (a closure, an object, ``None``).
        name: the preconditioner's name, for the record.
        rank: its rank, for the record.
        max_iter: the iteration cap of this step.
        setup_seconds: its build time (for the record).
    """

    step: str
    preconditioner: Any
    name: str | None
    rank: int | None
    max_iter: int
    setup_seconds: float = 0.0


@dataclass
class AttemptResult:
    """What one attempt returned: its value and figures.

    ``relative_residual`` may be NaN when the method does not report it on convergence.
    """

    value: Any
    method: str
    iterations: int
    relative_residual: float
    converged: bool
    seconds: float
    matvecs: int = 0
    residual_history: list[float] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class EscalationText:
    """The words of the two warnings of one attempt kind.

    Attributes:
        noun: what is escalated (``"solve"``, ``"log-density"``).
        method: the first attempt's method in prose (``"CG"``).
        fallback: the last step in prose (``"a dense Cholesky solve"``).
        result: what is returned when no step converged (``"iterate"``, ``"estimate"``).
        dense_outcome: added when the dense step's result is returned.
    """

    noun: str
    method: str
    fallback: str
    result: str
    dense_outcome: str = ""


CG_SOLVE = EscalationText("solve", "CG", "a dense Cholesky solve", "iterate")


def _residual_text(rel: float) -> str:
    return "not reported" if math.isnan(rel) else f"{rel:.3e}"


def escalate(
    attempt: Callable[[Rung, Any], AttemptResult],
    *,
    preconditioner: Any = None,
    preconditioner_name: str | None = None,
    preconditioner_rank: int | None = None,
    stronger: Callable[[], tuple[Any, str | None, int | None] | None] | None = None,
    dense: Callable[[], tuple[Any, float]] | None = None,
    tol: float,
    max_iter: int,
    num_rhs: int,
    iteration_factor: int = ESCALATION_ITERATION_FACTOR,
    setup_seconds: float = 0.0,
    finite: Callable[[Any], bool] = lambda value: bool(torch.isfinite(value).all()),
    text: EscalationText = CG_SOLVE,
    warn: bool = True,
    where: str = "escalate",
) -> tuple[Any, SolverDiagnostics]:
    r"""Run ``attempt`` up a ladder until one step reaches the tolerance.

    Steps, each run only if every previous one ended above ``tol``:

    1. ``"initial"``: ``attempt(Rung("initial", preconditioner, ..., max_iter), None)``.
    2. ``"more_iterations"``: the same preconditioner, ``iteration_factor × max_iter``.
    3. ``"stronger_preconditioner"``: ``stronger()`` builds one (``(preconditioner, name,
       rank)``), ``iteration_factor × max_iter``; recorded as skipped when it returns
       ``None``, left out when ``stronger`` is ``None``.
    4. ``"cholesky"``: ``dense()`` returns ``(value, relative residual)`` of an exact dense
       computation; a ``ValueError`` or ``MemoryError`` (the memory guard's refusal, a
       matrix not positive definite even with the capped jitter) is recorded as a failed
       step. Left out when ``dense`` is ``None``.

    The second argument of ``attempt`` is the best value so far (a warm start, or ``None``).
    The result is a converged step's value, else the one with the smallest finite relative
    residual among finite values. Warnings (:class:`~linear_operator.utils.warnings.
    NumericalWarning`, unless ``warn=False``): one when the first step stops unconverged
    (its iterations and residual, and that it escalates), and one at the end of an
    escalation with every attempt's figures and the outcome.

    Args:
        attempt: ``(rung, warm) -> AttemptResult``, one run of the iterative method.
        preconditioner: the first two steps' preconditioner (as ``attempt`` consumes it).
        preconditioner_name: its name, for the record.
        preconditioner_rank: its rank, for the record.
        stronger: ``() -> (preconditioner, name, rank)`` or ``None``.
        dense: ``() -> (value, relative residual)``.
        tol: the target relative residual.
        max_iter: the first step's iteration cap.
        num_rhs: right-hand sides (columns), for the record.
        iteration_factor: the later steps' cap is ``iteration_factor × max_iter``.
        setup_seconds: the first preconditioner's build time.
        finite: whether a value is usable (default: a tensor with finite entries).
        text: the warnings' words for this kind of attempt.
        warn: emit the warnings above.
        where: the calling entry point, first in every message.

    Returns:
        ``(value, diagnostics)``; ``diagnostics.attempts`` lists every step, and its other
        fields describe the whole run (the returned step's method and residual; iterations,
        products and times summed).
    """
    check_positive_int(where, "iteration_factor", iteration_factor)
    attempts: list[SolveAttempt] = []
    history: list[float] = []
    totals = {"iterations": 0, "matvecs": 0, "setup": 0.0, "seconds": 0.0}
    best: dict = {"value": None, "rel": math.inf, "method": "cg", "converged": False}

    def keep(value: Any, rec: SolveAttempt) -> None:
        attempts.append(rec)
        rel = rec.relative_residual
        if best["converged"] or not finite(value):
            return
        if rec.converged or (math.isfinite(rel) and rel < best["rel"]):
            best.update(value=value, rel=rel, method=rec.method, converged=rec.converged)

    def run(rung: Rung) -> AttemptResult:
        out = attempt(rung, best["value"])
        totals["iterations"] += out.iterations
        totals["matvecs"] += out.matvecs
        totals["setup"] += rung.setup_seconds
        totals["seconds"] += out.seconds
        history.extend(out.residual_history)
        rec = SolveAttempt(
            rung.step, out.method, rung.name, rung.rank, rung.max_iter, out.iterations,
            out.relative_residual, out.converged, out.seconds, out.note,
        )  # fmt: skip
        keep(out.value, rec)
        return out

    first = run(
        Rung("initial", preconditioner, preconditioner_name, preconditioner_rank, max_iter,
             setup_seconds)
    )  # fmt: skip
    if not best["converged"] and warn:
        warnings.warn(
            f"{where}: {text.method} stopped unconverged after {first.iterations} iterations "
            f"(max_iter {max_iter}) with relative residual "
            f"{_residual_text(first.relative_residual)} > tol {tol:.1e} ({num_rhs} column(s)); "
            f"escalating: {iteration_factor}× the iterations, then a stronger preconditioner, "
            f"then {text.fallback} where the memory allows.",
            NumericalWarning,
            stacklevel=3,
        )
    cap = iteration_factor * max_iter
    if not best["converged"]:
        run(Rung("more_iterations", preconditioner, preconditioner_name, preconditioner_rank, cap))
    if not best["converged"] and stronger is not None:
        start = time.perf_counter()
        built = stronger()
        build_seconds = time.perf_counter() - start
        if built is None:
            attempts.append(
                SolveAttempt(
                    "stronger_preconditioner", attempts[-1].method, preconditioner_name,
                    preconditioner_rank, 0, 0, math.inf, False,
                    note="skipped: no stronger preconditioner (the rank is already n)",
                )
            )  # fmt: skip
        else:
            pre, name, rank = built
            run(Rung("stronger_preconditioner", pre, name, rank, cap, build_seconds))
    if not best["converged"] and dense is not None:
        start = time.perf_counter()
        note, value, rel = "", None, math.inf
        try:
            value, rel = dense()
        except (ValueError, MemoryError) as exc:
            note = f"failed: {exc}"
        seconds = time.perf_counter() - start
        totals["seconds"] += seconds
        rec = SolveAttempt("cholesky", "cholesky", None, None, 0, 0, rel, rel <= tol, seconds, note)
        if value is None:
            attempts.append(rec)
        else:
            keep(value, rec)
    if best["value"] is None:  # every attempt produced NaN/Inf: nothing sound to return
        raise ValueError(
            f"{where}: every attempt produced non-finite values; attempts: "
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
        num_rhs=num_rhs,
        setup_seconds=totals["setup"],
        solve_seconds=totals["seconds"] - totals["setup"],
        residual_history=history,
        attempts=attempts,
    )
    if warn and len(attempts) > 1:
        rel = _residual_text(diag.relative_residual)
        if diag.converged:
            outcome = f"reached tol {tol:.1e} with {diag.method} (relative residual {rel})"
            if diag.method == "cholesky" and text.dense_outcome:
                outcome += f", {text.dense_outcome}"
        else:
            outcome = (
                f"did NOT reach tol {tol:.1e}: returning the best {text.result} ({diag.method}) "
                f"with relative residual {rel}. Use a larger noise or jitter, float64, a higher "
                "preconditioner rank, or more iterations"
            )
        warnings.warn(
            f"{where}: escalated {text.noun} {outcome}. Attempts: "
            + "; ".join(str(a) for a in attempts)
            + ".",
            NumericalWarning,
            stacklevel=3,
        )
    return best["value"], diag


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
    stronger: Callable[[], tuple[MatmulLike, str | None, int | None] | None] | None = None,
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

    .. math:: \text{stop when } \max_j \|b_j - A x_j\| / \|b_j\| \le \mathrm{tol}

    The CG-solve kind of :func:`escalate`: every step is :func:`conjugate_gradient`
    warm-started from the best iterate so far; the ``"cholesky"`` step is ``dense()``, an
    exact dense solve (e.g. :func:`cholesky_with_jitter`) whose residual is recomputed with
    one product with ``A``.

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
        warn: emit the warnings of :func:`escalate`.
        where: the calling entry point, first in every message.
        **cg_options: passed on to every :func:`conjugate_gradient` call (e.g. ``reduce``
            for row-sharded systems).

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

    def attempt(rung: Rung, warm: Tensor | None) -> AttemptResult:
        start = time.perf_counter()
        X, d = conjugate_gradient(
            matmul, B, preconditioner=rung.preconditioner, x0=warm, tol=tol,
            max_iter=rung.max_iter, check_every=check_every, warn=False,
            setup_seconds=rung.setup_seconds, **cg_options,
        )  # fmt: skip
        seconds = time.perf_counter() - start + rung.setup_seconds
        return AttemptResult(
            X, d.method, d.iterations, d.relative_residual, d.converged, seconds, d.matvecs,
            d.residual_history,
        )  # fmt: skip

    def exact() -> tuple[Tensor, float]:
        X = dense()
        return X, _column_residual(matmul, X, B)

    return escalate(
        attempt,
        preconditioner=preconditioner,
        preconditioner_name=preconditioner_name,
        preconditioner_rank=preconditioner_rank,
        stronger=stronger,
        dense=None if dense is None else exact,
        tol=tol,
        max_iter=max_iter,
        num_rhs=1 if B.dim() == 1 else B.shape[-1],
        iteration_factor=iteration_factor,
        setup_seconds=setup_seconds,
        text=CG_SOLVE,
        warn=warn,
        where=where,
    )
