r"""Gaussian log-density by linear_operator's mBCG + stochastic Lanczos quadrature, escalated.

.. math:: \log \mathcal N(r; 0, A) = -\tfrac12\big(r^\top A^{-1} r + \log|A| + n \log 2\pi\big),

``A = σ²K + d I`` of an :class:`~pyro_ntk.ntk_system.NTKSystem` on its matrix-free route.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from typing import TYPE_CHECKING

import torch
from linear_operator import settings as lo_settings
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from pyro_ntk.solvers import ESCALATION_ITERATION_FACTOR, SolveAttempt, SolverDiagnostics

if TYPE_CHECKING:
    from pyro_ntk.ntk_system import NTKSystem

__all__ = ["mbcg_log_prob"]

_LO_CG_UNCONVERGED = re.compile(
    r"CG terminated in (\d+) iterations with average residual norm ([-+0-9.eE]+|nan|inf)"
)
"""linear_operator's non-convergence warning (``linear_operator/utils/linear_cg.py``)."""


def mbcg_log_prob(
    system: NTKSystem, cols: Tensor, variance: Tensor, layer: bool, diag: Tensor
) -> Tensor:
    r"""Log-density of each column of ``cols`` ``(N·O, c)`` by mBCG + SLQ, escalated.

    The matrix-free route of :meth:`~pyro_ntk.ntk_system.NTKSystem.log_prob` for one
    hyperparameter value (scalar or ``(G,)`` σ², scalar ``diag``).

    linear_operator's ``inv_quad_logdet`` (one mBCG run for ``A⁻¹ r`` and the SLQ probes
    of ``log|A|``, the preconditioner's exact ``log|M|`` added) warns
    ``"CG terminated in k iterations with average residual norm ρ"`` when it stops above
    the tolerance; both terms are then biased, often by orders of magnitude. That
    warning is caught and the evaluation escalates like
    :meth:`~pyro_ntk.ntk_system.NTKSystem.solve`: 4× the iterations (mBCG cannot be
    warm-started), then the system's stronger preconditioner, then the exact dense
    log-density when the memory guard admits it (differentiable, like the Cholesky path);
    otherwise the last estimate is returned with a warning.
    The system's ``last_log_prob`` records the attempts.

    Returns:
        ``(c,)`` log-densities.
    """
    const = system.size * math.log(2 * math.pi)
    attempts: list[SolveAttempt] = []
    lp = None
    F = ESCALATION_ITERATION_FACTOR
    for step, factor in (
        ("initial", 1),
        ("more_iterations", F),
        ("stronger_preconditioner", F),
    ):
        if step == "stronger_preconditioner":
            pre = system.stronger_preconditioner()
            if pre is None:
                continue
        else:
            pre = system.preconditioner()
        cap = factor * system.max_cg_iterations
        start = time.perf_counter()
        with system._settings(), lo_settings.max_cg_iterations(cap):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                inv_quad, logdet = system.operator(variance, diag, pre).inv_quad_logdet(
                    inv_quad_rhs=cols, logdet=True, reduce_inv_quad=False
                )
        figures = None
        for w in caught:
            found = _LO_CG_UNCONVERGED.search(str(w.message))
            if found is not None and issubclass(w.category, NumericalWarning):
                figures = (int(found.group(1)), float(found.group(2)))
            else:  # not ours to handle: pass it on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        lp = -0.5 * (inv_quad + logdet + const)
        attempts.append(
            SolveAttempt(
                step, "mbcg", getattr(pre, "kind", None), getattr(pre, "rank", None), cap,
                figures[0] if figures else 0,
                figures[1] if figures else math.nan,
                figures is None,
                time.perf_counter() - start,
                "" if figures else "linear_operator reports figures only when unconverged",
            )
        )  # fmt: skip
        if figures is None:
            break
        if step == "initial":
            warnings.warn(
                f"{system.where}: the log-density's CG (linear_operator mBCG with SLQ for "
                f"log|A|) stopped unconverged after {figures[0]} iterations with mean "
                f"relative residual {figures[1]:.3e} > tol {system.cg_tolerance:.1e}; "
                "escalating: 4× the iterations, then a stronger preconditioner, then the "
                "exact dense log-density where the memory allows.",
                NumericalWarning,
                stacklevel=4,
            )
    if attempts[-1].converged:
        outcome = f"reached tol with {attempts[-1].step}"
    else:
        n, G = system.size, system.num_groups if layer else 1
        start = time.perf_counter()
        try:
            system.lin.check_dense_memory(
                system.where,
                f"the dense fallback of an unconverged log-density, {G + 2} × ({n}, {n})",
                (G + 2) * n * n,
            )
            _, L = system.dense_factor(variance, layer, diag)
        except (ValueError, MemoryError) as exc:
            attempts.append(
                SolveAttempt("cholesky", "cholesky", None, None, 0, 0, math.inf, False,
                             time.perf_counter() - start, f"failed: {exc}")
            )  # fmt: skip
            outcome = (
                "did NOT reach tol: returning the last mBCG estimate (biased; use a larger "
                "noise, a higher preconditioner rank, more iterations or float64)"
            )
        else:
            z = torch.linalg.solve_triangular(L, cols, upper=False)  # L⁻¹ r
            lp = -0.5 * (z.square().sum(0) + const) - torch.log(L.diagonal()).sum()
            attempts.append(
                SolveAttempt("cholesky", "cholesky", None, None, 0, 0, 0.0, True,
                             time.perf_counter() - start)
            )  # fmt: skip
            outcome = "replaced by the exact dense log-density (Cholesky)"
    last = attempts[-1]
    system.last_log_prob = SolverDiagnostics(
        method=last.method,
        iterations=sum(a.iterations for a in attempts),
        relative_residual=last.relative_residual,
        converged=last.converged,
        tol=system.cg_tolerance,
        matvecs=0,
        num_rhs=cols.shape[-1],
        solve_seconds=sum(a.seconds for a in attempts),
        attempts=attempts,
    )
    if len(attempts) > 1:
        warnings.warn(
            f"{system.where}: escalated log-density {outcome}. Attempts: "
            + "; ".join(str(a) for a in attempts)
            + ".",
            NumericalWarning,
            stacklevel=4,
        )
    return lp
