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

__all__ = ["SolverDiagnostics", "cholesky_with_jitter", "conjugate_gradient", "solve_damped"]

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

    def __str__(self) -> str:
        state = "converged" if self.converged else "NOT converged"
        return (
            f"{self.method}: {state} after {self.iterations} iterations, relative residual "
            f"{self.relative_residual:.2e} (tol {self.tol:.0e}), {self.matvecs} products of "
            f"{self.num_rhs} column(s), setup {self.setup_seconds:.3g}s, solve {self.solve_seconds:.3g}s"
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

    start = time.perf_counter()
    b_norm = torch.linalg.vector_norm(Bm, dim=0)
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
    rz = (R * Z).sum(0)
    rel = torch.linalg.vector_norm(R, dim=0) / safe_b
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
        pAp = (Pd * AP).sum(0)
        alpha = torch.where(active & (pAp > 0), rz / torch.where(pAp > 0, pAp, 1.0), 0.0)
        X = X + alpha * Pd
        R = R - alpha * AP
        Z = precond(R)
        rz_new = (R * Z).sum(0)
        beta = torch.where(active & (rz != 0), rz_new / torch.where(rz != 0, rz, 1.0), 0.0)
        Pd = Z + beta * Pd
        rz = rz_new
        col_iters = col_iters + active.long()
        rel = torch.linalg.vector_norm(R, dim=0) / safe_b
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
