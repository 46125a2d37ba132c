r"""Preconditioned conjugate gradients with diagnostics, for symmetric positive definite systems.

.. math::

    A X = B, \qquad A \in \mathbb{R}^{n \times n} \text{ SPD}, \quad B \in \mathbb{R}^{n \times t},

solved for all ``t`` right-hand sides at once (one ``A``-product of ``t`` columns per
iteration). Everything stays on the operator's device: the convergence test is a tensor
operation and the host reads it only every ``check_every`` iterations, so a GPU runs the
iteration without host round trips. Each solve returns a :class:`SolverDiagnostics`; an
unconverged solve also emits a :class:`~linear_operator.utils.warnings.NumericalWarning`
with its figures. :func:`solve_damped` applies it to the damped system ``(A + δ I) X = B``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from pyro_ntk._checks import check_positive_int, check_tensor
from pyro_ntk.solvers.diagnostics import SolverDiagnostics

__all__ = ["MatmulLike", "conjugate_gradient", "solve_damped"]

MatmulLike = Callable[[Tensor], Tensor]


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
