r"""The kernel system of one ``(θ*, X)``: cached linear algebra with σ²K(X, X) + d I.

.. math::

    A = \sigma^2 K(X, X) + d\, I, \qquad K(X, X) = J(X)\,\mathrm{diag}(\sigma_g^2)\,J(X)^\top,
    \qquad d = s^2 + \epsilon,

shared by :class:`~pyro_ntk.distributions.LinearizedNetwork` (its log-density) and
:class:`~pyro_ntk.NTKGPRegression` (its evidence and posterior solves). Two routes, chosen
by :func:`~pyro_ntk.solvers.choose_solver` for ``solver="auto"``:

* ``"cholesky"``: the dense ``(N·O) × (N·O)`` kernel (per parameter group when the
  variances are per layer) is built **once** and recombined for every σ²; ``O((N·O)³)``
  per evaluation, exact.
* ``"cg"``: matrix-free, ``linear_operator``'s preconditioned CG + stochastic Lanczos
  quadrature on :class:`pyro_ntk.operators.NTKLinearOperator` plus a diagonal, with the
  preconditioner from :func:`pyro_ntk.preconditioners.make_preconditioner` (built once,
  reused for every σ² and s²); ``O(iterations × (one JVP + one VJP over X))``. An
  unconverged solve escalates (:func:`~pyro_ntk.solvers.solve_with_escalation`).
"""

from __future__ import annotations

import math

import torch
from linear_operator import settings as lo_settings
from torch import Tensor

from pyro_ntk._checks import check_choice, check_positive_int
from pyro_ntk._mbcg import mbcg_log_prob
from pyro_ntk.linearization import Linearization
from pyro_ntk.solvers import (
    DEFAULT_MAX_CHOLESKY_SIZE,
    SolverDiagnostics,
    cholesky_with_jitter,
    choose_solver,
    solve_with_escalation,
)

__all__ = ["ESCALATION_RANK_FACTOR", "PRECONDITIONERS", "SOLVERS", "NTKSystem"]

SOLVERS = ("auto", "cholesky", "cg")
PRECONDITIONERS = ("auto", "fisher", "nystrom", "pivoted_cholesky", None)

ESCALATION_RANK_FACTOR = 4
"""An unconverged CG solve (:meth:`NTKSystem.solve`) escalates to a preconditioner of this
many times the rank (see :meth:`NTKSystem.stronger_preconditioner`)."""


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
        solver: ``"auto"`` (:func:`~pyro_ntk.solvers.choose_solver`: Cholesky while ``N·O <=
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
        self.X = linearization.check_inputs(where, "X", X)
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
            self.lin.check_dense_memory(
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
            lp = mbcg_log_prob(self, cols, v[idx], layer, d[idx])
            results.append(lp.reshape(batch[:k]))
        return torch.stack(results, dim=-1).reshape(batch)

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
        self.lin.check_dense_memory(
            self.where,
            f"the dense fallback of an unconverged CG solve, {G + 2} × ({n}, {n})",
            (G + 2) * n * n,
        )
        _, L = self.dense_factor(variance, layer, diag)
        return torch.cholesky_solve(rhs, L)


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
