r"""Gaussian log-density of residuals under ``A = σ²K + d I``: Cholesky, or mBCG + SLQ escalated.

.. math:: \log \mathcal N(r; 0, A) = -\tfrac12\big(r^\top A^{-1} r + \log|A| + n \log 2\pi\big)

Two routes, each taking its collaborators explicitly (a factor, or an operator factory,
preconditioners and a dense fallback), never the system that owns them:

* :func:`cholesky_log_prob`: exact from the lower factor ``L`` (``O(n²)`` per column).
* :func:`mbcg_log_prob`: linear_operator's ``inv_quad_logdet`` (one mBCG run for
  ``A⁻¹ r`` and the SLQ probes of ``log|A|``, the preconditioner's exact ``log|M|``
  added), escalated by :func:`pyro_ntk.solvers.escalate` when it stops unconverged.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable

import torch
from linear_operator import settings as lo_settings
from torch import Tensor

from pyro_ntk.options import PreconditionerKind, SolverOptions
from pyro_ntk.solvers import (
    AttemptResult,
    EscalationText,
    Rung,
    SolverDiagnostics,
    escalate,
    linear_operator_cg_figures,
)

__all__ = ["cholesky_log_prob", "linear_operator_settings", "mbcg_log_prob"]

MBCG_LOG_DENSITY = EscalationText(
    "log-density",
    "the log-density's CG (linear_operator mBCG with SLQ for log|A|)",
    "the exact dense log-density",
    "estimate",
    "replaced by the exact dense log-density",
)


def linear_operator_settings(options: SolverOptions) -> contextlib.ExitStack:
    """linear_operator's settings for the matrix-free route of ``options``.

    Never its own Cholesky; ``options``' CG tolerance, iteration cap and probe count; at most
    20 Lanczos quadrature steps; no gpytorch pivoted-Cholesky preconditioner when the
    preconditioner is ``"none"``.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(lo_settings.max_cholesky_size(0))
    stack.enter_context(lo_settings.cg_tolerance(options.cg_tolerance))
    stack.enter_context(lo_settings.max_cg_iterations(options.max_cg_iterations))
    stack.enter_context(lo_settings.num_trace_samples(options.num_trace_samples))
    stack.enter_context(
        lo_settings.max_lanczos_quadrature_iterations(min(20, options.max_cg_iterations))
    )
    if options.preconditioner == PreconditionerKind.NONE:
        stack.enter_context(lo_settings.max_preconditioner_size(0))
    return stack


def cholesky_log_prob(diff: Tensor, L: Tensor) -> Tensor:
    r"""``log N(diff; 0, L Lᵀ)`` for ``diff`` of shape ``S + batch + (n,)``, ``L`` ``batch + (n, n)``.

    Exact and differentiable; cost ``O(n²)`` per column after the factor.

    Example:
        >>> L = torch.linalg.cholesky(torch.tensor([[2.0, 0.5], [0.5, 1.0]]))
        >>> lp = cholesky_log_prob(torch.zeros(2), L)
        >>> bool(torch.isclose(lp, -0.5 * (2 * torch.log(torch.tensor(2 * torch.pi)) +
        ...                                 torch.logdet(L @ L.T))))
        True
    """
    n = L.shape[-1]
    zero = torch.zeros((), dtype=L.dtype, device=L.device).expand(n)
    mvn = torch.distributions.MultivariateNormal(zero, scale_tril=L, validate_args=False)
    return mvn.log_prob(diff)


def _columns_log_prob(cols: Tensor, L: Tensor) -> Tensor:
    """``(c,)`` log-densities of the columns of ``cols`` ``(n, c)`` from the factor ``L``."""
    const = cols.shape[0] * math.log(2 * math.pi)
    z = torch.linalg.solve_triangular(L, cols, upper=False)  # L⁻¹ r
    return -0.5 * (z.square().sum(0) + const) - torch.log(L.diagonal()).sum()


def mbcg_log_prob(
    cols: Tensor,
    operator: Callable[[object], object],
    *,
    preconditioner: object,
    stronger: Callable[[], object | None] | None,
    dense_factor: Callable[[], Tensor] | None,
    options: SolverOptions,
    where: str,
) -> tuple[Tensor, SolverDiagnostics]:
    r"""Log-density of each column of ``cols`` ``(n, c)`` by mBCG + SLQ, escalated.

    linear_operator's ``inv_quad_logdet`` warns when its CG stops above the tolerance;
    both terms are then biased, often by orders of magnitude. That warning is read
    (:func:`~pyro_ntk.solvers.linear_operator_cg_figures`) and the evaluation escalates
    (:func:`~pyro_ntk.solvers.escalate`): 4× the iterations (mBCG cannot be warm-started),
    then the stronger preconditioner, then the exact dense log-density from
    ``dense_factor()`` (differentiable, like the Cholesky route; a ``MemoryError`` or
    ``ValueError`` from it is recorded and the best mBCG estimate is returned, with a
    warning).

    Args:
        cols: residuals ``r`` as columns ``(n, c)``.
        operator: ``preconditioner ↦`` the ``LinearOperator`` ``A`` with it attached.
        preconditioner: the first preconditioner (``kind`` and ``rank`` are recorded).
        stronger: ``() ↦`` the escalation's preconditioner or ``None``.
        dense_factor: ``() ↦ L`` with ``L Lᵀ = A`` (memory guard included), or ``None``.
        options: CG tolerance, iteration cap, probes and the preconditioner choice.
        where: the public entry point, for messages.

    Returns:
        ``((c,) log-densities, diagnostics)``; ``diagnostics.attempts`` lists the steps.
        Cost per attempt: up to ``max_iter`` products with ``A`` of ``c + num_trace_samples``
        columns.
    """
    const = cols.shape[0] * math.log(2 * math.pi)

    def attempt(rung: Rung, warm: object) -> AttemptResult:
        start = time.perf_counter()
        with linear_operator_settings(options), lo_settings.max_cg_iterations(rung.max_iter):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                inv_quad, logdet = operator(rung.preconditioner).inv_quad_logdet(
                    inv_quad_rhs=cols, logdet=True, reduce_inv_quad=False
                )
        figures = linear_operator_cg_figures(caught)
        return AttemptResult(
            -0.5 * (inv_quad + logdet + const), "mbcg",
            figures[0] if figures else 0, figures[1] if figures else math.nan, figures is None,
            time.perf_counter() - start,
            note="" if figures else "linear_operator reports figures only when unconverged",
        )  # fmt: skip

    def build_stronger() -> tuple[object, str | None, int | None] | None:
        pre = stronger()
        return (
            None if pre is None else (pre, getattr(pre, "kind", None), getattr(pre, "rank", None))
        )

    def exact() -> tuple[Tensor, float]:
        return _columns_log_prob(cols, dense_factor()), 0.0

    return escalate(
        attempt,
        preconditioner=preconditioner,
        preconditioner_name=getattr(preconditioner, "kind", None),
        preconditioner_rank=getattr(preconditioner, "rank", None),
        stronger=None if stronger is None else build_stronger,
        dense=None if dense_factor is None else exact,
        tol=options.cg_tolerance,
        max_iter=options.max_cg_iterations,
        num_rhs=cols.shape[-1],
        text=MBCG_LOG_DENSITY,
        where=where,
    )
