r"""Preconditioned conjugate gradients with diagnostics, for symmetric positive definite systems.

.. math::

    A X = B, \qquad A \in \mathbb{R}^{n \times n} \text{ SPD}, \quad B \in \mathbb{R}^{n \times t},

solved for all ``t`` right-hand sides at once (one ``A``-product of ``t`` columns per
iteration). Everything stays on the operator's device: the convergence test is a tensor
operation and the host reads it only every ``check_every`` iterations, so a GPU runs the
iteration without host round trips. Each solve returns a :class:`SolverDiagnostics`; an
unconverged solve also emits a :class:`~linear_operator.utils.warnings.NumericalWarning`
with its figures.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from pyro_ntk._checks import check_positive_int, check_tensor

__all__ = [
    "ESCALATION_ITERATION_FACTOR",
    "SolveAttempt",
    "SolverDiagnostics",
    "cholesky_with_jitter",
    "conjugate_gradient",
    "solve_damped",
    "solve_with_escalation",
]

MatmulLike = Callable[[Tensor], Tensor]


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


def _as_matmul(A: object, where: str) -> MatmulLike:
    if isinstance(A, Tensor):
        return A.matmul
    if hasattr(A, "matmul"):
        return A.matmul
    if callable(A):
        return A
    raise TypeError(
        f"{where}: A must be a tensor, a LinearOperator or a callable X -> A X, "
        f"got {type(A).__name__}."
    )


def conjugate_gradient(
    A: Tensor | MatmulLike | object,
    B: Tensor,
    *,
    preconditioner: MatmulLike | None = None,
    x0: Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 1000,
    check_every: int = 10,
    warn: bool = True,
    setup_seconds: float = 0.0,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, SolverDiagnostics]:
    r"""Solve ``A X = B`` by (preconditioned) conjugate gradients, all columns at once.

    .. math::

        r_0 = B - A x_0,\; z_0 = M^{-1} r_0,\; p_0 = z_0;\quad
        \alpha_j = \frac{r_j^\top z_j}{p_j^\top A p_j},\;
        x_{j+1} = x_j + \alpha_j p_j,\; r_{j+1} = r_j - \alpha_j A p_j,\;
        \beta_j = \frac{r_{j+1}^\top z_{j+1}}{r_j^\top z_j},\; p_{j+1} = z_{j+1} + \beta_j p_j

    with column-wise scalars. Columns that reached ``‖r‖ ≤ tol·‖b‖`` are frozen (their
    step is masked to zero) while the others continue.

    Args:
        A: SPD ``(n, n)``: a tensor, a ``LinearOperator`` or a callable ``X -> A X``
            accepting ``(n, t)``.
        B: right-hand sides ``(n,)`` or ``(n, t)``.
        preconditioner: a callable ``R -> M⁻¹ R`` for an SPD ``M ≈ A`` (``None``: plain CG).
        x0: initial guess, shape of ``B`` (``None``: zeros).
        tol: target relative residual ``‖b − A x‖ / ‖b‖`` per column.
        max_iter: iteration cap.
        check_every: iterations between host-side convergence checks (the only syncs).
        warn: emit a ``NumericalWarning`` if a column is unconverged at the end.
        setup_seconds: preconditioner set-up time, copied into the diagnostics.
        reduce: for row-sharded systems (``pyro_ntk.distributed``): sums per-column partial
            inner products ``(t,)`` over the shards (e.g. an all-reduce); ``None``: one
            process. Every inner product and norm goes through it.

    Returns:
        ``(X, diagnostics)`` with ``X`` of ``B``'s shape. Cost: ``iterations`` products with
        ``A`` and ``M⁻¹`` of ``t`` columns, ``O(n t)`` extra memory.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, d = conjugate_gradient(A, b, tol=1e-10)
        >>> torch.allclose(A @ x, b), d.converged, d.iterations
        (True, True, 2)
    """
    where = "conjugate_gradient"
    matmul = _as_matmul(A, where)
    B = check_tensor(where, "B", B)
    if B.dim() not in (1, 2):
        raise ValueError(f"{where}: B must have shape (n,) or (n, t), got {tuple(B.shape)}.")
    if not (isinstance(tol, float | int) and 0 < tol < 1):
        raise ValueError(f"{where}: tol must be a float in (0, 1), got {tol!r}.")
    check_positive_int(where, "max_iter", max_iter)
    check_positive_int(where, "check_every", check_every)
    vector = B.dim() == 1
    Bm = B.unsqueeze(-1) if vector else B
    if x0 is not None:
        x0 = check_tensor(where, "x0", x0)
        if x0.shape != B.shape:
            raise ValueError(f"{where}: x0 has shape {tuple(x0.shape)}, expected {tuple(B.shape)}.")
    method = "cg" if preconditioner is None else "pcg"
    precond = preconditioner if preconditioner is not None else (lambda r: r)

    def dot(S: Tensor, T: Tensor) -> Tensor:  # column-wise inner products, (t,)
        return (S * T).sum(0) if reduce is None else reduce((S * T).sum(0))

    def norm(S: Tensor) -> Tensor:
        return torch.linalg.vector_norm(S, dim=0) if reduce is None else dot(S, S).sqrt()

    start = time.perf_counter()
    b_norm = norm(Bm)
    safe_b = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    if x0 is None:
        X = torch.zeros_like(Bm)
        R = Bm.clone()
        matvecs = 0
    else:
        X = (x0.unsqueeze(-1) if vector else x0).clone()
        R = Bm - matmul(X)
        matvecs = 1
    Z = precond(R)
    Pd = Z.clone()
    rz = dot(R, Z)
    rel = norm(R) / safe_b
    active = rel > tol
    col_iters = torch.zeros_like(rel, dtype=torch.long)
    history: list[float] = []
    iterations = 0
    done = not bool(active.any())
    if not done:
        history.append(float(rel.max()))
    while not done and iterations < max_iter:
        AP = matmul(Pd)
        matvecs += 1
        pAp = dot(Pd, AP)
        alpha = torch.where(active & (pAp > 0), rz / torch.where(pAp > 0, pAp, 1.0), 0.0)
        X = X + alpha * Pd
        R = R - alpha * AP
        Z = precond(R)
        rz_new = dot(R, Z)
        beta = torch.where(active & (rz != 0), rz_new / torch.where(rz != 0, rz, 1.0), 0.0)
        Pd = Z + beta * Pd
        rz = rz_new
        col_iters = col_iters + active.long()
        rel = norm(R) / safe_b
        active = active & (rel > tol)
        iterations += 1
        if iterations % check_every == 0 or iterations == max_iter:
            worst = float(rel.max())  # the only host sync
            history.append(worst)
            done = not bool(active.any()) or not math.isfinite(worst)
    relative_residual = float(rel.max())
    converged = bool((rel <= tol).all())
    diag = SolverDiagnostics(
        method=method,
        iterations=int(col_iters.max()) if col_iters.numel() else 0,
        relative_residual=relative_residual,
        converged=converged,
        tol=float(tol),
        matvecs=matvecs,
        num_rhs=Bm.shape[-1],
        setup_seconds=float(setup_seconds),
        solve_seconds=time.perf_counter() - start,
        residual_history=history,
    )
    if not converged and warn:
        warnings.warn(
            f"{where}: CG stopped unconverged after {iterations} iterations (max_iter "
            f"{max_iter}) with relative residual {relative_residual:.3e} > tol {tol:.1e} "
            f"({int((rel > tol).sum())} of {Bm.shape[-1]} column(s)). Use a stronger "
            f"preconditioner, more iterations, or a dense Cholesky solve.",
            NumericalWarning,
            stacklevel=2,
        )
    return (X.squeeze(-1) if vector else X), diag


def solve_damped(
    A: Tensor | MatmulLike | object,
    B: Tensor,
    damping: float,
    *,
    preconditioner: object | None = None,
    tol: float = 1e-4,
    max_iter: int = 1000,
    warn: bool = True,
) -> tuple[Tensor, SolverDiagnostics]:
    r"""Solve the damped system ``(A + δ I) X = B`` by preconditioned CG.

    Used for parameter-space solves with a Fisher / GGN operator, ``A = F``
    (:class:`pyro_ntk.FisherLinearOperator`), e.g. in linearized Laplace.

    .. math:: (F + \delta I)\, x = b, \qquad
        M^{-1} = V (\Lambda + \delta I)^{-1} V^\top + \delta^{-1} (I - V V^\top)

    where ``V Λ Vᵀ ≈ F`` is a rank-``k`` eigen-approximation
    (:class:`pyro_ntk.preconditioners.EigenPreconditioner`, e.g. from
    :func:`pyro_ntk.preconditioners.randomized_eigh`).

    Args:
        A: the SPSD operator ``(P, P)`` (tensor, ``LinearOperator`` or callable).
        B: ``(P,)`` or ``(P, t)``.
        damping: ``δ > 0``.
        preconditioner: an ``EigenPreconditioner`` of ``A`` (its ``solve_closure(0, δ)``
            form is used) or ``None`` (plain CG).
        tol: target relative residual.
        max_iter: iteration cap.
        warn: warn when unconverged.

    Returns:
        ``(X, diagnostics)``. Cost: one ``A``-product of ``t`` columns per iteration.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
        >>> x, d = solve_damped(A, torch.ones(3, dtype=torch.float64), 0.5, tol=1e-10)
        >>> torch.allclose(x, 1 / torch.tensor([3.5, 1.5, 1.0], dtype=torch.float64))
        True
    """
    where = "solve_damped"
    if not (isinstance(damping, float | int) and damping > 0):
        raise ValueError(f"{where}: damping must be a positive float, got {damping!r}.")
    matmul = _as_matmul(A, where)
    delta = float(damping)

    def damped(X: Tensor) -> Tensor:
        return matmul(X) + delta * X

    closure = None
    setup = 0.0
    if preconditioner is not None:
        if not hasattr(preconditioner, "solve_closure"):
            raise TypeError(
                f"{where}: preconditioner must be an EigenPreconditioner (with solve_closure), "
                f"got {type(preconditioner).__name__}."
            )
        closure = preconditioner.solve_closure(1.0, delta)
        setup = getattr(preconditioner, "setup_seconds", 0.0)
    X, diag = conjugate_gradient(
        damped,
        B,
        preconditioner=closure,
        tol=tol,
        max_iter=max_iter,
        warn=False,
        setup_seconds=setup,
    )
    if not diag.converged and warn:
        warnings.warn(
            f"{where}: CG stopped unconverged after {diag.iterations} iterations with relative "
            f"residual {diag.relative_residual:.3e} > tol {tol:.1e} (damping {delta:.3g}).",
            NumericalWarning,
            stacklevel=2,
        )
    return X, diag


DEFAULT_RELATIVE_JITTER = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 1e-3}
"""First jitter of :func:`cholesky_with_jitter`, relative to the mean |diagonal|, per dtype
(other dtypes: ``10 · finfo(dtype).eps``)."""

DEFAULT_MAX_RELATIVE_JITTER = 1e-2
"""Default cap of :func:`cholesky_with_jitter`'s jitter, relative to the mean |diagonal|: beyond
1 % the factor no longer describes the matrix it was asked for."""


def cholesky_with_jitter(
    A: Tensor,
    *,
    jitter: float | None = None,
    max_tries: int = 9,
    max_jitter: float | None = None,
    where: str = "cholesky_with_jitter",
) -> Tensor:
    r"""Lower Cholesky factor of an SPD matrix, retrying with a growing diagonal jitter.

    .. math::

        A + \epsilon_k I = L L^\top, \qquad
        \epsilon_k = \epsilon_0\, 10^{k}, \quad k = 0, 1, \ldots

    First the plain factorization of ``A``; if it fails, ``ε₀`` (default
    ``DEFAULT_RELATIVE_JITTER[dtype] × mean |diag A|``: 1e-10 in float64, 1e-6 in float32)
    is added and multiplied by 10 on each further failure, at most ``max_tries`` times and
    never above ``max_jitter`` (default ``1e-2 × mean |diag A|``). A success after jitter
    warns :class:`~linear_operator.utils.warnings.NumericalWarning` with the jitter used, its
    size relative to the diagonal, the smallest diagonal entry and the number of tries;
    failure raises ``ValueError`` with the same figures. A matrix with NaN or Inf entries
    raises at once (no jitter can fix it).

    Args:
        A: symmetric ``(..., n, n)`` (batched: one jitter for the whole batch).
        jitter: first jitter ``ε₀`` (absolute); ``None``: relative default above.
        max_tries: factorizations with jitter after the plain one.
        max_jitter: largest jitter tried (absolute); ``None``: ``1e-2 × mean |diag A|``.
        where: the calling entry point, for messages.

    Returns:
        ``L`` with ``L Lᵀ = A + ε I`` (``ε = 0`` when ``A`` factorizes as is). Cost: one
        ``O(n³/3)`` factorization per try.

    Example:
        >>> A = torch.ones(3, 3, dtype=torch.float64)          # rank 1: singular
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     L = cholesky_with_jitter(A)
        >>> bool(torch.allclose(L @ L.T, A, atol=1e-6)), "jitter" in str(w[0].message)
        (True, True)
    """
    A = check_tensor(where, "A", A)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{where}: A must be a square (..., n, n) matrix, got {tuple(A.shape)}.")
    check_positive_int(where, "max_tries", max_tries)
    n = A.shape[-1]
    bad = int((~torch.isfinite(A.detach())).sum())
    if bad:
        raise ValueError(
            f"{where}: the {n}×{n} matrix A has {bad} NaN or Inf entries; no jitter can make "
            "it positive definite (check the inputs, variance and noise)."
        )
    L, info = torch.linalg.cholesky_ex(A)
    if not bool((info > 0).any()):
        return L
    diag = A.detach().diagonal(dim1=-2, dim2=-1)
    scale = float(diag.abs().mean().clamp_min(torch.finfo(A.dtype).tiny))
    rel0 = DEFAULT_RELATIVE_JITTER.get(A.dtype, 10 * torch.finfo(A.dtype).eps)
    eps = rel0 * scale if jitter is None else float(jitter)
    cap = DEFAULT_MAX_RELATIVE_JITTER * scale if max_jitter is None else float(max_jitter)
    if not (eps > 0 and math.isfinite(eps)) or not (cap > 0 and math.isfinite(cap)):
        raise ValueError(
            f"{where}: jitter and max_jitter must be positive and finite, got jitter={jitter!r}, "
            f"max_jitter={max_jitter!r} (mean |diag A| = {scale:.3g})."
        )
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    tried = []
    for _ in range(max_tries):
        if eps > cap * (1 + 1e-12):
            break
        tried.append(eps)
        L, info = torch.linalg.cholesky_ex(A + eps * eye)
        if not bool((info > 0).any()):
            warnings.warn(
                f"{where}: the {n}×{n} matrix ({A.dtype}) is not positive definite; "
                f"factorized with jitter {eps:.3g} added to the diagonal ({eps / scale:.1e} × "
                f"mean |diagonal| {scale:.3g}; smallest diagonal entry {float(diag.min()):.3g}) "
                f"after {len(tried)} tries. Use float64, a larger noise or jitter.",
                NumericalWarning,
                stacklevel=2,
            )
            return L
        eps *= 10.0
    largest = f"{tried[-1]:.3g}" if tried else "none (first jitter above the cap)"
    raise ValueError(
        f"{where}: the {n}×{n} matrix ({A.dtype}) is not positive definite even with jitter "
        f"{largest} on its diagonal (cap max_jitter = {cap:.3g}, {len(tried)} tries; mean "
        f"|diagonal| {scale:.3g}, smallest diagonal entry {float(diag.min()):.3g}); check "
        "the variance, noise and jitter."
    )


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
