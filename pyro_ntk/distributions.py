r"""The linearized network as a Pyro distribution over its outputs at fixed inputs.

.. math::

    f(X) \sim \mathcal{N}\big(m(X),\; \sigma^2 K(X, X) + (s^2 + \epsilon)\, I\big),
    \qquad K(X, X) = J(X)\,\mathrm{diag}(\sigma_g^2)\,J(X)^\top,

the law of :math:`f_{\mathrm{lin}}(X; \theta) = f(X; \theta^*) + J(X)(\theta - \theta^*)` under
the prior :math:`\theta - \theta^* \sim \mathcal{N}(0, \mathrm{diag}(\sigma^2))`, plus an
optional observation noise :math:`s^2` and a jitter :math:`\epsilon`.

Two ways to evaluate the density share one cache per ``(θ*, X)`` (:class:`NTKSystem`):

* ``"cholesky"``: the dense ``(N·O) × (N·O)`` kernel (per parameter group when the
  variances are per layer) is built **once** and recombined for every σ²; ``O((N·O)³)``
  per evaluation, exact.
* ``"cg"``: matrix-free, ``linear_operator``'s preconditioned CG + stochastic Lanczos
  quadrature on :class:`pyro_ntk.operators.NTKLinearOperator` plus a diagonal, with the
  preconditioner from :func:`pyro_ntk.preconditioners.make_preconditioner` (built once,
  reused for every σ² and s²); ``O(iterations × (one JVP + one VJP over X))``.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Sequence

import torch
from linear_operator import settings as lo_settings
from linear_operator.utils.warnings import NumericalWarning
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn

from pyro_ntk._checks import check_choice, check_finite, check_positive_int, check_tensor
from pyro_ntk.linearization import Linearization
from pyro_ntk.solvers import (
    ESCALATION_ITERATION_FACTOR,
    SolveAttempt,
    SolverDiagnostics,
    cholesky_with_jitter,
    solve_with_escalation,
)

__all__ = [
    "CHOLESKY_MEMORY_FRACTION",
    "DEFAULT_MAX_CHOLESKY_SIZE",
    "PRECONDITIONERS",
    "SOLVERS",
    "LinearizedNetwork",
    "NTKSystem",
    "available_memory",
    "choose_solver",
]

SOLVERS = ("auto", "cholesky", "cg")
PRECONDITIONERS = ("auto", "fisher", "nystrom", "pivoted_cholesky", None)
DEFAULT_MAX_CHOLESKY_SIZE = 4000
"""``solver="auto"`` uses the dense Cholesky path while ``N·O`` is at most this (and fits).

Measured with ``benchmarks/bench_solver.py`` (issue 8; trained 26-128-128-1 MLP, P = 20,097,
float64, 2-core CPU): a full :class:`~pyro_ntk.NTKGPRegression` evaluation (log marginal
likelihood, its gradient, posterior mean) costs the same on both paths at ``N·O = 4000`` when
repeated (19.8 s each, loaded machine) and dense is 1.5× faster for the first one; dense is
5–9× faster at 1000–2000 (first evaluation) and 4–5× slower at 8000. On an H100 the dense
solve wins up to ``10⁴`` (``benchmarks/RESULTS.md``): raise ``max_cholesky_size`` there.
"""

CHOLESKY_MEMORY_FRACTION = 0.5
"""Share of the available memory the dense path may take for its kernel and factor."""

ESCALATION_RANK_FACTOR = 4
"""An unconverged CG solve (:meth:`NTKSystem.solve`) escalates to a preconditioner of this
many times the rank (see :meth:`NTKSystem.stronger_preconditioner`)."""


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes of memory available now on ``device``, or ``None`` when unknown.

    CUDA: the free memory reported by ``torch.cuda.mem_get_info``. CPU: ``MemAvailable``
    from ``/proc/meminfo`` (Linux); ``None`` elsewhere.

    Args:
        device: a torch device (``None``: CPU).

    Returns:
        Available bytes, or ``None``.

    Example:
        >>> m = available_memory("cpu")
        >>> m is None or m > 0
        True
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def choose_solver(
    size: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    *,
    max_cholesky_size: int = DEFAULT_MAX_CHOLESKY_SIZE,
    memory_budget: int | None = None,
    memory_fraction: float = CHOLESKY_MEMORY_FRACTION,
) -> str:
    r"""The ``solver="auto"`` rule: ``"cholesky"`` or ``"cg"`` for an ``n × n`` system.

    Dense Cholesky when ``n = N·O`` is at most the measured crossover and the dense kernel
    and its factor fit in a share of the memory,

    .. math:: n \le n_{\max} \quad\text{and}\quad
        2\, n^2 \cdot \mathrm{itemsize} \le \text{fraction} \times \text{budget},

    matrix-free preconditioned CG otherwise. Cost: ``O(1)`` (one read of ``/proc/meminfo``
    or one ``mem_get_info`` when ``memory_budget`` is ``None``).

    Args:
        size: ``n = N·O``.
        dtype: floating dtype of the kernel.
        device: where the kernel would live (``None``: CPU).
        max_cholesky_size: the crossover ``n_max`` (see :data:`DEFAULT_MAX_CHOLESKY_SIZE`).
        memory_budget: bytes available; ``None`` reads :func:`available_memory` (when that
            is unknown too, only the size rule applies).
        memory_fraction: share of the budget the dense path may take, in ``(0, 1]``.

    Returns:
        ``"cholesky"`` or ``"cg"``.

    Example:
        >>> choose_solver(1000, torch.float64, memory_budget=2**30)
        'cholesky'
        >>> choose_solver(1000, torch.float64, memory_budget=2**20)  # 16 MB do not fit in 0.5 MB
        'cg'
        >>> choose_solver(10**6, torch.float64, memory_budget=2**50)
        'cg'
    """
    where = "choose_solver"
    check_positive_int(where, "size", size)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}.")
    if isinstance(max_cholesky_size, bool) or not isinstance(max_cholesky_size, int):
        raise ValueError(f"{where}: max_cholesky_size must be an int, got {max_cholesky_size!r}.")
    if not (isinstance(memory_fraction, (int, float)) and 0 < memory_fraction <= 1):
        raise ValueError(f"{where}: memory_fraction must be in (0, 1], got {memory_fraction!r}.")
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0
    ):
        raise ValueError(
            f"{where}: memory_budget must be None or an int >= 0 (bytes), got {memory_budget!r}."
        )
    if size > max_cholesky_size:
        return "cg"
    if memory_budget is None:
        memory_budget = available_memory(device)
        if memory_budget is None:
            return "cholesky"
    need = 2 * size * size * torch.finfo(dtype).bits // 8
    return "cholesky" if need <= memory_fraction * memory_budget else "cg"


def _linearization(where: str, network: object, params, chunk_size) -> Linearization:
    if isinstance(network, Linearization):
        if params is not None or chunk_size is not None:
            raise ValueError(
                f"{where}: params and chunk_size must be None when network is already a "
                f"Linearization (got params={params!r}, chunk_size={chunk_size!r})."
            )
        return network
    if not isinstance(network, nn.Module):
        raise TypeError(
            f"{where}: network must be a torch.nn.Module or a pyro_ntk.Linearization, got "
            f"{type(network).__name__}."
        )
    return Linearization(network, params, chunk_size=chunk_size)


def check_positive(where: str, name: str, value: object, lin: Linearization) -> Tensor:
    """A strictly positive, finite tensor in the network's dtype (scalars are converted)."""
    if not isinstance(value, Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{where}: {name} must be a positive number or tensor, got {type(value).__name__}."
            )
        value = torch.tensor(float(value), dtype=lin.dtype, device=lin.device)
    check_finite(where, name, value)
    if value.dtype != lin.dtype:
        raise TypeError(
            f"{where}: {name} has dtype {value.dtype}; expected the network's dtype {lin.dtype}."
        )
    if not bool((value > 0).all()):
        raise ValueError(
            f"{where}: {name} must be > 0, got {value.detach().cpu().tolist()} "
            f"(shape {tuple(value.shape)})."
        )
    return value


def _load_make_preconditioner():
    try:
        from pyro_ntk.preconditioners import make_preconditioner
    except ImportError:  # pragma: no cover - the module ships with the package
        return None
    return make_preconditioner


def _load_ntk_operator():
    try:
        from pyro_ntk.operators.ntk import NTKLinearOperator
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        raise ImportError(
            "pyro_ntk: the matrix-free path needs pyro_ntk.operators.ntk.NTKLinearOperator, "
            f"which failed to import ({exc}); use solver='cholesky'."
        ) from exc
    return NTKLinearOperator


class NTKSystem:
    r"""Cached linear algebra with :math:`A = \sigma^2 K(X, X) + d\, I` for one ``(θ*, X)``.

    Everything that does not depend on the hyperparameters is built at most once: the
    dense kernel (one ``(N·O)²`` matrix, or one per parameter group for per-layer
    variances) on the Cholesky path, the preconditioner on the CG path. The
    hyperparameters (σ², scalar or ``(..., G)``, and the diagonal ``d = s² + jitter``) are
    arguments of every method, so gradients with respect to them flow.

    Args:
        linearization: the :class:`~pyro_ntk.Linearization` of the network.
        X: inputs ``(N, ...)``.
        solver: ``"auto"`` (:func:`choose_solver`: Cholesky while ``N·O <=
            max_cholesky_size`` and the dense kernel fits in memory), ``"cholesky"`` or ``"cg"``.
        preconditioner: ``"auto"``, ``"fisher"``, ``"nystrom"``, ``"pivoted_cholesky"`` or
            ``None`` (CG path only; passed to ``make_preconditioner``).
        max_cholesky_size: the ``"auto"`` threshold on ``N·O``.
        cg_tolerance: CG stopping rule (mean relative residual), also used for the SLQ solves.
        max_cg_iterations: CG iteration cap.
        num_trace_samples: probe vectors of stochastic Lanczos quadrature (log-determinant).
        preconditioner_rank: rank of the preconditioner.
        where: the public entry point, for error messages.
    """

    def __init__(
        self,
        linearization: Linearization,
        X: Tensor,
        *,
        solver: str = "auto",
        preconditioner: str | None = "auto",
        max_cholesky_size: int = DEFAULT_MAX_CHOLESKY_SIZE,
        cg_tolerance: float = 1e-4,
        max_cg_iterations: int = 1000,
        num_trace_samples: int = 10,
        preconditioner_rank: int = 100,
        where: str = "NTKSystem",
    ):
        check_choice(where, "solver", solver, SOLVERS)
        check_choice(where, "preconditioner", preconditioner, PRECONDITIONERS)
        check_positive_int(where, "max_cg_iterations", max_cg_iterations)
        check_positive_int(where, "num_trace_samples", num_trace_samples)
        check_positive_int(where, "preconditioner_rank", preconditioner_rank)
        if isinstance(max_cholesky_size, bool) or not isinstance(max_cholesky_size, int):
            raise ValueError(
                f"{where}: max_cholesky_size must be an int, got {max_cholesky_size!r}."
            )
        if not (isinstance(cg_tolerance, (int, float)) and cg_tolerance > 0):
            raise ValueError(
                f"{where}: cg_tolerance must be a positive float, got {cg_tolerance!r}."
            )
        self.lin = linearization
        self.X = linearization._check_X(where, "X", X)
        self.N = X.shape[0]
        self.O = linearization.output_dim(X)
        self.size = self.N * self.O
        self.where = where
        self.method = (
            choose_solver(
                self.size,
                linearization.dtype,
                linearization.device,
                max_cholesky_size=max_cholesky_size,
            )
            if solver == "auto"
            else solver
        )
        self.preconditioner_kind = preconditioner
        self.max_cholesky_size = max_cholesky_size
        self.cg_tolerance = float(cg_tolerance)
        self.max_cg_iterations = max_cg_iterations
        self.num_trace_samples = num_trace_samples
        self.preconditioner_rank = preconditioner_rank
        self._K: Tensor | None = None  # (N·O, N·O), σ² = 1
        self._K_groups: Tensor | None = None  # (G, N·O, N·O)
        self._diag_groups: Tensor | None = None  # (G, N·O)
        self._preconditioner = None
        self._preconditioner_built = False
        self._stronger = None  # the CG escalation's preconditioner, built on first need
        self._stronger_built = False
        self.last_solve: SolverDiagnostics | None = None
        self.last_log_prob: SolverDiagnostics | None = None  # CG path: mBCG attempts

    # ------------------------------------------------------------------ dense pieces
    @property
    def num_groups(self) -> int:
        """G, the number of parameter groups (layers)."""
        return len(self.lin.groups)

    def _group_scales(self) -> list[Tensor]:
        G = self.num_groups
        return [torch.eye(G, dtype=self.lin.dtype, device=self.lin.device)[g] for g in range(G)]

    def kernel(self, variance: Tensor, layer: bool) -> Tensor:
        r"""Dense :math:`\sigma^2 K(X, X)`, shape ``batch + (N·O, N·O)``, from the cache."""
        if not layer:
            if self._K is None:
                self._K = self.lin.ntk_dense(self.X).detach()
            return variance[..., None, None] * self._K
        if self._K_groups is None:
            n, G = self.size, self.num_groups
            self.lin._check_dense_memory(
                self.where, f"{G} per-layer kernels of shape ({n}, {n})", G * n * n
            )
            self._K_groups = torch.stack(
                [self.lin.ntk_dense(self.X, variance=s).detach() for s in self._group_scales()]
            )
        return torch.einsum("...g,gij->...ij", variance, self._K_groups)

    def kernel_diag(self, variance: Tensor, layer: bool) -> Tensor:
        r"""Exact :math:`\mathrm{diag}\,\sigma^2 K(X, X)`, shape ``batch + (N·O,)``."""
        if self._diag_groups is None:
            if self._K is not None and not layer:
                self._diag_groups = self._K.diagonal().unsqueeze(0)
            else:
                self._diag_groups = torch.stack(
                    [self.lin.ntk_diag(self.X, variance=s).detach() for s in self._group_scales()]
                )
        groups = self._diag_groups
        if not layer:
            return variance[..., None] * groups.sum(0)
        return torch.einsum("...g,gi->...i", variance, groups)

    def cholesky(self, A: Tensor) -> Tensor:
        """Lower Cholesky factor of ``A``; on failure adds a growing jitter, with a warning.

        See :func:`pyro_ntk.solvers.cholesky_with_jitter` (defaults: first jitter 1e-10 ×
        mean diagonal in float64, 1e-6 in float32, ×10 per try, capped at 1e-2 × mean
        diagonal; beyond the cap a ``ValueError`` with the figures).
        """
        return cholesky_with_jitter(A, where=self.where)

    # ------------------------------------------------------------------ matrix-free pieces
    def preconditioner(self):
        """The preconditioner from ``make_preconditioner`` (built on first use, then reused)."""
        if not self._preconditioner_built:
            self._preconditioner_built = True
            kind = self.preconditioner_kind
            make = _load_make_preconditioner()
            if make is not None:  # None → IdentityPreconditioner: plain CG, not gpytorch's
                self._preconditioner = make(
                    kind, self.lin, self.X, rank=self.preconditioner_rank, seed=0
                )
        return self._preconditioner

    def operator(self, variance: Tensor, diag: Tensor, preconditioner=None):
        r"""``AddedDiagLinearOperator(σ²K, d I)`` with the preconditioner attached (no batch).

        ``preconditioner``: one to attach instead of :meth:`preconditioner` (escalation).
        """
        from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator

        NTKLinearOperator = _load_ntk_operator()
        K = NTKLinearOperator(self.X, variance=variance, linearization=self.lin)
        D = DiagLinearOperator(diag.expand(self.size))
        precond = self.preconditioner() if preconditioner is None else preconditioner
        override = None if precond is None else precond.override(variance, diag)
        return AddedDiagLinearOperator(K, D, preconditioner_override=override)

    def _settings(self):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(lo_settings.max_cholesky_size(0))
        stack.enter_context(lo_settings.cg_tolerance(self.cg_tolerance))
        stack.enter_context(lo_settings.max_cg_iterations(self.max_cg_iterations))
        stack.enter_context(lo_settings.num_trace_samples(self.num_trace_samples))
        stack.enter_context(
            lo_settings.max_lanczos_quadrature_iterations(min(20, self.max_cg_iterations))
        )
        if self.preconditioner_kind == "pivoted_cholesky" and self.preconditioner() is None:
            # linear_operator's own pivoted Cholesky, forced on at our rank
            stack.enter_context(lo_settings.min_preconditioning_size(0))
            stack.enter_context(lo_settings.max_preconditioner_size(self.preconditioner_rank))
        elif self.preconditioner_kind is None:
            stack.enter_context(lo_settings.max_preconditioner_size(0))
        return stack

    # ------------------------------------------------------------------ densities and solves
    def log_prob(self, diff: Tensor, variance: Tensor, layer: bool, diag: Tensor) -> Tensor:
        r"""Gaussian log-density of ``diff`` (``S + batch + (N·O,)``) with covariance ``A``.

        .. math:: -\tfrac12\big(r^\top A^{-1} r + \log|A| + n \log 2\pi\big)
        """
        vbatch = variance.shape[:-1] if layer else variance.shape
        batch = torch.broadcast_shapes(vbatch, diag.shape, diff.shape[:-1])
        if self.method == "cholesky":
            A = self.kernel(variance, layer)
            A = A + diag[..., None, None] * torch.eye(self.size, dtype=A.dtype, device=A.device)
            L = self.cholesky(A)
            zero = torch.zeros((), dtype=A.dtype, device=A.device).expand(self.size)
            mvn = torch.distributions.MultivariateNormal(zero, scale_tril=L, validate_args=False)
            return mvn.log_prob(diff)
        # matrix-free: one inv_quad_logdet per distinct hyperparameter value, all samples
        # (leading dims of diff) solved together as columns
        k = len(batch) - len(torch.broadcast_shapes(vbatch, diag.shape))
        pshape = batch[k:]
        diff = diff.expand(batch + (self.size,))
        v = variance.expand(pshape + ((variance.shape[-1],) if layer else ()))
        d = diag.expand(pshape)
        results = []
        for idx in _ndindex(pshape):
            rhs = diff[(Ellipsis,) + idx + (slice(None),)]
            cols = rhs.reshape(-1, self.size).T  # (N·O, columns)
            lp = self._cg_log_prob(cols, v[idx], layer, d[idx])
            results.append(lp.reshape(batch[:k]))
        return torch.stack(results, dim=-1).reshape(batch)

    def _cg_log_prob(self, cols: Tensor, variance: Tensor, layer: bool, diag: Tensor) -> Tensor:
        r"""Log-density of each column of ``cols`` ``(N·O, c)`` by mBCG + SLQ, escalated.

        linear_operator's ``inv_quad_logdet`` (one mBCG run for ``A⁻¹ r`` and the SLQ probes
        of ``log|A|``, the preconditioner's exact ``log|M|`` added) warns
        ``"CG terminated in k iterations with average residual norm ρ"`` when it stops above
        the tolerance; both terms are then biased, often by orders of magnitude. That
        warning is caught and the evaluation escalates like :meth:`solve`: 4× the
        iterations (mBCG cannot be warm-started), then :meth:`stronger_preconditioner`, then
        the exact dense log-density when the memory guard admits it (differentiable, like
        the Cholesky path); otherwise the last estimate is returned with a warning.
        :attr:`last_log_prob` records the attempts.
        """
        const = self.size * math.log(2 * math.pi)
        attempts: list[SolveAttempt] = []
        lp = None
        F = ESCALATION_ITERATION_FACTOR
        for step, factor in (
            ("initial", 1),
            ("more_iterations", F),
            ("stronger_preconditioner", F),
        ):
            if step == "stronger_preconditioner":
                pre = self.stronger_preconditioner()
                if pre is None:
                    continue
            else:
                pre = self.preconditioner()
            cap = factor * self.max_cg_iterations
            start = time.perf_counter()
            with self._settings(), lo_settings.max_cg_iterations(cap):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    inv_quad, logdet = self.operator(variance, diag, pre).inv_quad_logdet(
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
                    f"{self.where}: the log-density's CG (linear_operator mBCG with SLQ for "
                    f"log|A|) stopped unconverged after {figures[0]} iterations with mean "
                    f"relative residual {figures[1]:.3e} > tol {self.cg_tolerance:.1e}; "
                    "escalating: 4× the iterations, then a stronger preconditioner, then the "
                    "exact dense log-density where the memory allows.",
                    NumericalWarning,
                    stacklevel=4,
                )
        if attempts[-1].converged:
            outcome = f"reached tol with {attempts[-1].step}"
        else:
            n, G = self.size, self.num_groups if layer else 1
            start = time.perf_counter()
            try:
                self.lin._check_dense_memory(
                    self.where,
                    f"the dense fallback of an unconverged log-density, {G + 2} × ({n}, {n})",
                    (G + 2) * n * n,
                )
                _, L = self.dense_factor(variance, layer, diag)
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
        self.last_log_prob = SolverDiagnostics(
            method=last.method,
            iterations=sum(a.iterations for a in attempts),
            relative_residual=last.relative_residual,
            converged=last.converged,
            tol=self.cg_tolerance,
            matvecs=0,
            num_rhs=cols.shape[-1],
            solve_seconds=sum(a.seconds for a in attempts),
            attempts=attempts,
        )
        if len(attempts) > 1:
            warnings.warn(
                f"{self.where}: escalated log-density {outcome}. Attempts: "
                + "; ".join(str(a) for a in attempts)
                + ".",
                NumericalWarning,
                stacklevel=4,
            )
        return lp

    def dense_factor(self, variance: Tensor, layer: bool, diag: Tensor) -> tuple[Tensor, Tensor]:
        """Dense ``A = σ²K + diag·I`` and its Cholesky factor ``L`` (jitter retried)."""
        A = self.kernel(variance, layer)
        A = A + diag * torch.eye(self.size, dtype=A.dtype, device=A.device)
        return A, self.cholesky(A)

    def record_cholesky(self, A: Tensor, x: Tensor, rhs: Tensor) -> None:
        """Set :attr:`last_solve` for a Cholesky solve ``A x = rhs`` (residual recomputed)."""
        self.last_solve = SolverDiagnostics(
            method="cholesky",
            iterations=0,
            relative_residual=_relative_residual(A @ x, rhs),
            converged=True,
            tol=self.cg_tolerance,
            matvecs=0,
            num_rhs=rhs.shape[-1],
        )

    def solve(self, rhs: Tensor, variance: Tensor, layer: bool, diag: Tensor) -> Tensor:
        r"""``A⁻¹ rhs`` for ``rhs`` of shape ``(N·O, k)`` (scalar or ``(G,)`` σ², no batch).

        Records :attr:`last_solve` (a :class:`~pyro_ntk.solvers.SolverDiagnostics`).
        Cholesky path: exact, its residual recomputed with one product. CG path:
        preconditioned CG, all ``k`` columns in one batched iteration; if it stops above
        the tolerance it escalates (:func:`pyro_ntk.solvers.solve_with_escalation`, with a
        ``NumericalWarning`` carrying the figures): 4× ``max_cg_iterations`` warm-started,
        then :meth:`stronger_preconditioner`, then the dense Cholesky solve when the
        memory guard admits ``N·O``; ``last_solve.attempts`` lists every step.
        """
        if self.method == "cholesky":
            A, L = self.dense_factor(variance, layer, diag)
            x = torch.cholesky_solve(rhs, L)
            self.record_cholesky(A, x, rhs)
            return x
        op = self.operator(variance, diag)
        pre = self.preconditioner()
        with self._settings():
            precond_closure, _, _ = op._preconditioner()
            used = pre if precond_closure is not None else None

            def stronger():
                built = self.stronger_preconditioner()
                if built is None:
                    return None
                return built.solve_closure(variance, diag), built.kind, built.rank

            x, self.last_solve = solve_with_escalation(
                op._matmul,
                rhs,
                preconditioner=precond_closure,
                preconditioner_name=getattr(used, "kind", None),
                preconditioner_rank=getattr(used, "rank", None),
                stronger=stronger,
                dense=lambda: self._dense_solve(rhs, variance, layer, diag),
                tol=self.cg_tolerance,
                max_iter=self.max_cg_iterations,
                # a host check per iteration is free on CPU; amortise it on accelerators
                check_every=1 if rhs.device.type == "cpu" else 10,
                setup_seconds=getattr(used, "setup_seconds", 0.0),
                where=self.where,
            )
        return x

    def stronger_preconditioner(self):
        """The CG escalation's stronger preconditioner, built once on first need.

        The same kind at :data:`ESCALATION_RANK_FACTOR` × the rank (capped at ``N·O``), or
        the Fisher preconditioner at ``preconditioner_rank`` when there was none; ``None``
        when the current rank already equals ``N·O``.
        """
        if not self._stronger_built:
            self._stronger_built = True
            make = _load_make_preconditioner()
            current = self.preconditioner()
            kind, rank = getattr(current, "kind", None), getattr(current, "rank", 0)
            if make is None:  # pragma: no cover - the module ships with the package
                self._stronger = None
            elif kind is None:
                self._stronger = make("fisher", self.lin, self.X, rank=self.preconditioner_rank)
            elif rank < self.size:
                self._stronger = make(
                    kind, self.lin, self.X, rank=ESCALATION_RANK_FACTOR * rank, seed=1
                )
        return self._stronger

    def _dense_solve(self, rhs: Tensor, variance: Tensor, layer: bool, diag: Tensor) -> Tensor:
        """The CG escalation's last step: ``A⁻¹ rhs`` by dense Cholesky, memory guard first."""
        n, G = self.size, self.num_groups if layer else 1
        self.lin._check_dense_memory(
            self.where,
            f"the dense fallback of an unconverged CG solve, {G + 2} × ({n}, {n})",
            (G + 2) * n * n,
        )
        _, L = self.dense_factor(variance, layer, diag)
        return torch.cholesky_solve(rhs, L)


_LO_CG_UNCONVERGED = re.compile(
    r"CG terminated in (\d+) iterations with average residual norm ([-+0-9.eE]+|nan|inf)"
)
"""linear_operator's non-convergence warning (``linear_operator/utils/linear_cg.py``)."""


def _relative_residual(Ax: Tensor, b: Tensor) -> float:
    num = (b - Ax).detach().norm(dim=0)
    den = b.detach().norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)
    return float((num / den).max()) if b.numel() else 0.0


def _ndindex(shape: torch.Size):
    if not shape:
        yield ()
        return
    for flat in range(math.prod(shape)):
        idx, rest = [], flat
        for s in reversed(shape):
            idx.append(rest % s)
            rest //= s
        yield tuple(reversed(idx))


def _check_variance(
    where: str, variance: object, lin: Linearization, layer_variances: bool | None
) -> tuple[Tensor, bool]:
    variance = check_positive(where, "variance", variance, lin)
    G = len(lin.groups)
    if layer_variances is None:
        layer_variances = variance.dim() == 1 and variance.shape[0] == G and G > 1
    if layer_variances and (variance.dim() == 0 or variance.shape[-1] != G):
        raise ValueError(
            f"{where}: variance has shape {tuple(variance.shape)}; with layer_variances=True "
            f"its last dimension must be G = {G}, one per parameter group {lin.groups}."
        )
    return variance, bool(layer_variances)


class LinearizedNetwork(TorchDistribution):
    r"""The linearized network's outputs at ``X`` as a Pyro distribution, event ``(N, O)``.

    .. math::

        f(X) = m(X) + J(X)\,(\sigma \odot z) + \sqrt{s^2 + \epsilon}\;\xi,\qquad
        z \sim \mathcal{N}(0, I_P),\ \xi \sim \mathcal{N}(0, I_{N \cdot O}),

    i.e. :math:`f(X) \sim \mathcal{N}(m(X), \sigma^2 K + (s^2 + \epsilon) I)` with
    :math:`K = J\,\mathrm{diag}(\sigma_g^2)\,J^\top` the empirical NTK and
    :math:`m(X) = f(X; \theta^*)` (``mean="network"``), zero, or a given tensor.

    * :meth:`rsample` is exact and reparameterized: one batched JVP for all draws, no
      ``N × N`` factorization. The ``√(s² + ε) ξ`` term makes the draws come from exactly
      the law whose density :meth:`log_prob` evaluates (σ²K alone is singular when
      ``N·O > P``); it costs ``N·O`` normal draws.
    * :meth:`log_prob` is exact by Cholesky while ``N·O <= max_cholesky_size``
      (``solver="auto"``), otherwise preconditioned CG + stochastic Lanczos quadrature
      (``linear_operator.inv_quad_logdet`` on ``NTKLinearOperator + (s² + ε) I``);
      gradients flow to ``variance`` and ``noise`` tensors either way.

    Batch shape: broadcast of ``variance``'s batch dims (all of it for a scalar variance,
    all but the last ``G`` for per-layer variances), ``noise``'s shape and the mean's
    leading dims; so it works under vectorized ``Predictive`` and ``pyro.plate``. On the CG
    path, each distinct hyperparameter value in the batch costs one solve.

    The kernel variance is stored as :attr:`kernel_variance`; :attr:`variance` is the
    distribution's marginal variance, as for every torch distribution.

    Args:
        network: the trained ``nn.Module`` or a prebuilt :class:`~pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        variance: prior variance σ² of θ − θ*: a positive scalar, a tensor with batch dims,
            or per-layer ``(..., G)`` values (see ``layer_variances``).
        mean: ``"network"`` (f(X; θ*)), ``"zero"``, or a tensor ``(..., N, O)``.
        jitter: ε ≥ 0 added to the diagonal.
        params: which parameters to linearize (see :class:`~pyro_ntk.Linearization`).
        noise: optional observation noise variance s² > 0 (scalar or batch tensor).
        solver: ``"auto"``, ``"cholesky"`` or ``"cg"``.
        preconditioner: ``"auto"``, ``"fisher"``, ``"nystrom"``, ``"pivoted_cholesky"`` or
            ``None`` (CG path).
        layer_variances: whether ``variance``'s last dim indexes parameter groups; ``None``
            infers it (a 1-D tensor of length G > 1).
        max_cholesky_size: the ``"auto"`` threshold on ``N·O``.
        cg_tolerance: CG relative-residual tolerance.
        max_cg_iterations: CG iteration cap.
        num_trace_samples: SLQ probe vectors.
        preconditioner_rank: rank of the preconditioner.
        chunk_size: inputs per chunk for the Jacobian products.
        squeeze_output: event shape ``(N,)`` instead of ``(N, 1)`` for single-output networks.
        validate_args: torch's distribution argument / sample validation.
        system: an :class:`NTKSystem` for the same ``(θ*, X)`` to reuse its caches.

    Cost: construction one forward over X (for ``mean="network"``); :meth:`rsample` one JVP
    over X with ``prod(sample_shape + batch_shape)`` columns; :meth:`log_prob` see above.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> X = torch.randn(5, 2)
        >>> d = LinearizedNetwork(net, X, variance=0.5)
        >>> f = d.rsample((3,))
        >>> f.shape, d.log_prob(f).shape
        (torch.Size([3, 5, 1]), torch.Size([3]))
    """

    arg_constraints = {
        "kernel_variance": constraints.positive,
        "noise": constraints.nonnegative,
        "loc": constraints.real,
    }
    has_rsample = True

    def __init__(
        self,
        network: nn.Module | Linearization,
        X: Tensor,
        variance: Tensor | float = 1.0,
        mean: str | Tensor = "network",
        jitter: float = 1e-6,
        params=None,
        noise: Tensor | float | None = None,
        solver: str = "auto",
        preconditioner: str | None = "auto",
        *,
        layer_variances: bool | None = None,
        max_cholesky_size: int = DEFAULT_MAX_CHOLESKY_SIZE,
        cg_tolerance: float = 1e-4,
        max_cg_iterations: int = 1000,
        num_trace_samples: int = 10,
        preconditioner_rank: int = 100,
        chunk_size: int | None = None,
        squeeze_output: bool = False,
        validate_args: bool | None = None,
        system: NTKSystem | None = None,
    ):
        where = "LinearizedNetwork"
        if system is not None:
            lin = system.lin
            if X is not system.X:
                raise ValueError(f"{where}: X must be the system's X when system is given.")
        else:
            lin = _linearization(where, network, params, chunk_size)
            X = check_tensor(where, "X", X)
            system = NTKSystem(
                lin,
                X,
                solver=solver,
                preconditioner=preconditioner,
                max_cholesky_size=max_cholesky_size,
                cg_tolerance=cg_tolerance,
                max_cg_iterations=max_cg_iterations,
                num_trace_samples=num_trace_samples,
                preconditioner_rank=preconditioner_rank,
                where=where,
            )
        self.system = system
        self.linearization = lin
        self.X = system.X
        N, O = system.N, system.O
        self.kernel_variance, self.layer_variances = _check_variance(
            where, variance, lin, layer_variances
        )
        if (
            not isinstance(jitter, (int, float))
            or isinstance(jitter, bool)
            or not 0 <= jitter < float("inf")
        ):
            raise ValueError(f"{where}: jitter must be a float >= 0, got {jitter!r}.")
        self.jitter = float(jitter)
        if noise is None:
            self.noise = torch.zeros((), dtype=lin.dtype, device=lin.device)
        else:
            self.noise = check_positive(where, "noise", noise, lin)
        if isinstance(mean, str):
            check_choice(where, "mean", mean, ("network", "zero"))
            if mean == "network":
                self.loc = lin(self.X)
            else:
                self.loc = torch.zeros(N, O, dtype=lin.dtype, device=lin.device)
        else:
            mean = check_finite(where, "mean", check_tensor(where, "mean", mean))
            if mean.dim() < 2 or tuple(mean.shape[-2:]) != (N, O):
                raise ValueError(
                    f"{where}: mean has shape {tuple(mean.shape)}; expected (..., {N}, {O}) "
                    f"for N = {N} inputs and O = {O} outputs."
                )
            self.loc = mean
        vbatch = (
            self.kernel_variance.shape[:-1] if self.layer_variances else self.kernel_variance.shape
        )
        batch_shape = torch.broadcast_shapes(vbatch, self.noise.shape, self.loc.shape[:-2])
        event_shape = (N,) if (squeeze_output and O == 1) else (N, O)
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args)

    @property
    def support(self):
        """Real values of the event shape."""
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def diagonal(self) -> Tensor:
        """The total diagonal ``s² + ε`` added to σ²K."""
        return self.noise + self.jitter

    @property
    def mean(self) -> Tensor:
        """m(X), shape ``batch_shape + event_shape``."""
        return self.loc.reshape(self.loc.shape[:-2] + self.event_shape).expand(
            self.batch_shape + self.event_shape
        )

    @property
    def variance(self) -> Tensor:
        r"""Marginal variances :math:`\sigma^2 K_{ii} + s^2 + \epsilon` (exact, not σ² itself)."""
        d = self.system.kernel_diag(self.kernel_variance, self.layer_variances)
        d = d + self.diagonal[..., None]
        return d.reshape(d.shape[:-1] + self.event_shape).expand(
            self.batch_shape + self.event_shape
        )

    @property
    def covariance_matrix(self) -> Tensor:
        """Dense ``(N·O, N·O)`` covariance (rows ``n·O + o``); for small problems."""
        K = self.system.kernel(self.kernel_variance, self.layer_variances)
        eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        return K + self.diagonal[..., None, None] * eye

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """Exact reparameterized draws, shape ``sample_shape + batch_shape + event_shape``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        lead = shape[: len(shape) - len(self.event_shape)]
        lin = self.linearization
        P, N, O = lin.num_params, self.system.N, self.system.O
        sd = self.kernel_variance.sqrt()
        if self.layer_variances:
            sd = sd[..., lin.space.group_index()]  # (..., P)
        else:
            sd = sd[..., None]
        z = torch.randn(lead + (P,), dtype=lin.dtype, device=lin.device)
        V = (z * sd).reshape(-1, P).T  # (P, k)
        JV = lin.jvp(self.X, V)  # (N, O, k)
        f = JV.permute(2, 0, 1).reshape(lead + (N, O))
        f = f + self.loc
        if self.jitter > 0 or bool((self.noise > 0).any()):
            f = f + self.diagonal.sqrt()[..., None, None] * torch.randn_like(f)
        return f.reshape(shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density, shape ``sample_shape + batch_shape``; exact or CG + SLQ (see class)."""
        N, O = self.system.N, self.system.O
        value = check_tensor("LinearizedNetwork.log_prob", "value", value)
        k = len(self.event_shape)
        if value.dim() < k or tuple(value.shape[value.dim() - k :]) != tuple(self.event_shape):
            raise ValueError(
                f"LinearizedNetwork.log_prob: value has shape {tuple(value.shape)}; expected "
                f"(..., {', '.join(map(str, self.event_shape))}), the event shape."
            )
        if self._validate_args:
            self._validate_sample(value)
        lead = value.shape[: value.dim() - len(self.event_shape)]
        diff = value.reshape(lead + (N, O)) - self.loc
        diff = diff.reshape(diff.shape[:-2] + (N * O,))
        diff = diff.expand(torch.broadcast_shapes(diff.shape[:-1], self.batch_shape) + (N * O,))
        return self.system.log_prob(diff, self.kernel_variance, self.layer_variances, self.diagonal)

    def __repr__(self) -> str:
        return (
            f"LinearizedNetwork(N={self.system.N}, O={self.system.O}, "
            f"P={self.linearization.num_params}, solver={self.system.method!r}, "
            f"batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)})"
        )
