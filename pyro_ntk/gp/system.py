r"""The kernel system of one ``(θ*, X)``: cached linear algebra with ``A = σ²K(X, X) + d I``.

.. math::

    A = \sigma^2 K(X, X) + d\, I, \qquad K(X, X) = J(X)\,\mathrm{diag}(\sigma_g^2)\,J(X)^\top,
    \qquad d = s^2 + \epsilon,

shared by :class:`~pyro_ntk.LinearizedNetwork` (its log-density) and
:class:`~pyro_ntk.NTKGPRegression` (its evidence and posterior). Two routes, chosen by
:func:`~pyro_ntk.solvers.choose_solver` for ``solver="auto"``:

* ``"cholesky"``: the dense ``(N·O) × (N·O)`` kernel (per parameter group when the
  variances are per layer) is built **once** and recombined for every σ²; ``O((N·O)³)``
  per evaluation, exact. With ``solver="auto"``, one σ² and one ``d``, the log-density
  comes instead from one eigendecomposition of ``K`` made once per data set, at the second
  evaluation (:class:`~pyro_ntk.gp.spectral.KernelSpectrum`): ``O(N·O)`` per evaluation
  after it. ``solver="cholesky"`` keeps the factor at every evaluation.
* ``"cg"``: matrix-free, :class:`pyro_ntk.operators.NTKLinearOperator` plus a diagonal,
  with the preconditioner of :func:`pyro_ntk.preconditioners.make_preconditioner` (built
  once, reused for every σ² and s²); ``O(iterations × (one JVP + one VJP over X))``. An
  unconverged solve or log-density escalates (:func:`~pyro_ntk.solvers.escalate`).
"""

from __future__ import annotations

import itertools
import warnings

import torch
from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator
from torch import Tensor

from pyro_ntk.gp.log_density import cholesky_log_prob, linear_operator_settings, mbcg_log_prob
from pyro_ntk.gp.posterior import cholesky_posterior, pathwise_covariance, pathwise_posterior
from pyro_ntk.gp.spectral import KernelSpectrum
from pyro_ntk.linearization import Linearization
from pyro_ntk.operators.ntk import NTKLinearOperator
from pyro_ntk.options import PreconditionerKind, Solver, SolverOptions
from pyro_ntk.preconditioners import make_preconditioner
from pyro_ntk.solvers import (
    SolverDiagnostics,
    cholesky_with_jitter,
    choose_solver,
    solve_with_escalation,
)

__all__ = ["ESCALATION_RANK_FACTOR", "NTKSystem"]

ESCALATION_RANK_FACTOR = 4
"""An unconverged CG escalates to a preconditioner of this many times the rank
(see :meth:`NTKSystem.stronger_preconditioner`)."""


class NTKSystem:
    r"""Cached linear algebra with :math:`A = \sigma^2 K(X, X) + d\, I` for one ``(θ*, X)``.

    Everything that does not depend on the hyperparameters is built at most once: the
    dense kernel (one ``(N·O)²`` matrix, or one per parameter group for per-layer
    variances) on the Cholesky route, the preconditioner on the CG route. The
    hyperparameters (σ², scalar or ``(..., G)``, and the diagonal ``d = s² + jitter``) are
    arguments of every method, so gradients with respect to them flow.

    Args:
        linearization: the :class:`~pyro_ntk.Linearization` of the network.
        X: inputs ``(N, ...)``.
        options: a :class:`~pyro_ntk.options.SolverOptions` (``None``: the defaults).
        where: the public entry point, for error messages.
        eager_spectrum: take the spectral route from the first dense evaluation (a model that
            is evaluated many times, e.g. during a fit) instead of the second.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> sysm = NTKSystem(Linearization(net.double()), torch.randn(6, 2, dtype=torch.float64))
        >>> sysm.method, sysm.size
        ('cholesky', 6)
    """

    def __init__(
        self,
        linearization: Linearization,
        X: Tensor,
        options: SolverOptions | None = None,
        *,
        where: str = "NTKSystem",
        eager_spectrum: bool = False,
    ):
        if options is None:
            options = SolverOptions()
        elif not isinstance(options, SolverOptions):
            raise TypeError(
                f"{where}: options must be a pyro_ntk.options.SolverOptions or None, got "
                f"{type(options).__name__}."
            )
        self.lin = linearization
        self.X = linearization.check_inputs(where, "X", X)
        self.N = X.shape[0]
        self.O = linearization.output_dim(X)
        self.size = self.N * self.O
        self.where = where
        self.options = options
        if options.solver == Solver.AUTO:
            self.method = choose_solver(
                self.size,
                linearization.dtype,
                linearization.device,
                max_cholesky_size=options.max_cholesky_size,
            )
        else:
            self.method = options.solver.value
        self.spectral = options.solver == Solver.AUTO  # the eigen route on the dense method
        self._spectrum: KernelSpectrum | None | bool = False  # False: not made yet
        self._dense_calls = 1 if eager_spectrum else 0  # spectral from the second call on
        self.warned_precision = False  # one float32/jitter warning per system (first figures)
        self.last_route: str | None = None  # "spectral", "cholesky" or "cg": last log_prob
        self._K: Tensor | None = None  # (N·O, N·O), σ² = 1
        self._K_groups: Tensor | None = None  # (G, N·O, N·O)
        self._diag_groups: Tensor | None = None  # (G, N·O)
        self._preconditioner = None
        self._stronger = None  # the escalation's preconditioner, built on first need
        self._stronger_built = False
        self.last_solve: SolverDiagnostics | None = None
        self.last_log_prob: SolverDiagnostics | None = None  # CG route: mBCG attempts

    # ------------------------------------------------------------------ dense pieces
    @property
    def num_groups(self) -> int:
        """G, the number of parameter groups (layers)."""
        return len(self.lin.groups)

    def group_scales(self) -> list[Tensor]:
        """One-hot variance vectors ``e_g`` ``(G,)``: ``lin.ntk(..., variance=e_g)`` is layer g's kernel."""
        G = self.num_groups
        return [torch.eye(G, dtype=self.lin.dtype, device=self.lin.device)[g] for g in range(G)]

    def kernel(self, variance: Tensor, layer: bool) -> Tensor:
        r"""Dense :math:`\sigma^2 K(X, X)`, shape ``batch + (N·O, N·O)``, from the cache."""
        if not layer:
            if self._K is None:
                self._K = self.lin.ntk_dense(self.X).detach()
            return variance[..., None, None] * self._K
        return torch.einsum("...g,gij->...ij", variance, self.group_kernels())

    def group_kernels(self) -> Tensor:
        """The per-layer kernels ``K_g(X, X)`` at ``σ_g² = 1``, ``(G, N·O, N·O)`` (cached)."""
        if self._K_groups is None:
            n, G = self.size, self.num_groups
            self.lin.check_dense_memory(
                self.where, f"{G} per-layer kernels of shape ({n}, {n})", G * n * n
            )
            self._K_groups = torch.stack(
                [self.lin.ntk_dense(self.X, variance=s).detach() for s in self.group_scales()]
            )
        return self._K_groups

    def kernel_diag(self, variance: Tensor, layer: bool) -> Tensor:
        r"""Exact :math:`\mathrm{diag}\,\sigma^2 K(X, X)`, shape ``batch + (N·O,)``."""
        if self._diag_groups is None:
            if self._K is not None and not layer:
                self._diag_groups = self._K.diagonal().unsqueeze(0)
            else:
                self._diag_groups = torch.stack(
                    [self.lin.ntk_diag(self.X, variance=s).detach() for s in self.group_scales()]
                )
        groups = self._diag_groups
        if not layer:
            return variance[..., None] * groups.sum(0)
        return torch.einsum("...g,gi->...i", variance, groups)

    def dense_factor(self, variance: Tensor, layer: bool, diag: Tensor) -> tuple[Tensor, Tensor]:
        """Dense ``A = σ²K + diag·I`` and its Cholesky factor ``L``.

        On failure a growing jitter is added (:func:`pyro_ntk.solvers.cholesky_with_jitter`),
        with a warning unless :attr:`warned_precision` (one such warning per system, the first
        one's figures standing for a fit's later steps); a failure even with jitter raises.
        """
        A = self.kernel(variance, layer)
        A = A + diag[..., None, None] * torch.eye(self.size, dtype=A.dtype, device=A.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            L = cholesky_with_jitter(A, where=self.where)
        for w in caught[: 0 if self.warned_precision else None]:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.warned_precision = self.warned_precision or bool(caught)
        return A, L

    def spectrum(self) -> KernelSpectrum | None:
        """``K = Q diag(λ) Qᵀ`` at σ² = 1, made once (``None``: not PSD, warned once).

        :meth:`log_prob` makes it at its second dense evaluation (its first with
        ``eager_spectrum``), so that a one-off density (a ``LinearizedNetwork`` built per
        call) pays one factor, not a decomposition.
        """
        if self._spectrum is False:
            one = torch.ones((), dtype=self.lin.dtype, device=self.lin.device)
            self._spectrum = KernelSpectrum.of(self.kernel(one, False), where=self.where)
        return self._spectrum

    def _fallback_factor(self, variance: Tensor, layer: bool, diag: Tensor, what: str) -> Tensor:
        """The escalation's last step: the dense factor, memory guard first."""
        n, G = self.size, self.num_groups if layer else 1
        self.lin.check_dense_memory(
            self.where,
            f"the dense fallback of an unconverged {what}, {G + 2} × ({n}, {n})",
            (G + 2) * n * n,
        )
        return self.dense_factor(variance, layer, diag)[1]

    # ------------------------------------------------------------------ matrix-free pieces
    def preconditioner(self):
        """The preconditioner of ``options`` (built on first use, then reused)."""
        if self._preconditioner is None:
            self._preconditioner = make_preconditioner(
                self.options.preconditioner, self.lin, self.X,
                rank=self.options.preconditioner_rank, seed=0,
            )  # fmt: skip
        return self._preconditioner

    def stronger_preconditioner(self):
        """The escalation's stronger preconditioner, built once on first need.

        The same kind at :data:`ESCALATION_RANK_FACTOR` × the rank (capped at ``N·O``), or
        the Fisher preconditioner at ``preconditioner_rank`` when there was none; ``None``
        when the current rank already equals ``N·O``.
        """
        if not self._stronger_built:
            self._stronger_built = True
            current = self.preconditioner()
            kind, rank = getattr(current, "kind", None), getattr(current, "rank", 0)
            if kind is None:
                self._stronger = make_preconditioner(
                    PreconditionerKind.FISHER,
                    self.lin,
                    self.X,
                    rank=self.options.preconditioner_rank,
                )
            elif rank < self.size:
                self._stronger = make_preconditioner(
                    kind, self.lin, self.X, rank=ESCALATION_RANK_FACTOR * rank, seed=1
                )
        return self._stronger

    def operator(self, variance: Tensor, diag: Tensor, preconditioner=None):
        r"""``AddedDiagLinearOperator(σ²K, d I)`` with a preconditioner attached (no batch).

        ``preconditioner``: one to attach instead of :meth:`preconditioner` (escalation).
        """
        K = NTKLinearOperator(self.X, variance=variance, network=self.lin)
        D = DiagLinearOperator(diag.expand(self.size))
        precond = self.preconditioner() if preconditioner is None else preconditioner
        return AddedDiagLinearOperator(
            K, D, preconditioner_override=precond.override(variance, diag)
        )

    # ------------------------------------------------------------------ densities and solves
    def log_prob(self, diff: Tensor, variance: Tensor, layer: bool, diag: Tensor) -> Tensor:
        r"""Gaussian log-density of ``diff`` (``S + batch + (N·O,)``) with covariance ``A``.

        .. math:: -\tfrac12\big(r^\top A^{-1} r + \log|A| + n \log 2\pi\big)

        Dense route, one σ² (``solver="auto"``), from the second evaluation on (or once
        :meth:`spectrum` is made): :class:`~pyro_ntk.gp.spectral.KernelSpectrum`, ``O(N·O)``;
        else (per-layer σ², ``solver="cholesky"``, a kernel that is not PSD, a singular ``A``)
        :func:`~pyro_ntk.gp.cholesky_log_prob`.
        CG route: :func:`~pyro_ntk.gp.mbcg_log_prob` once per distinct hyperparameter value,
        all samples (leading dims of ``diff``) solved together; :attr:`last_log_prob` records
        it. :attr:`last_route` names the route taken.
        """
        vbatch = variance.shape[:-1] if layer else variance.shape
        batch = torch.broadcast_shapes(vbatch, diag.shape, diff.shape[:-1])
        if self.method == "cholesky":
            again, self._dense_calls = self._dense_calls > 0, self._dense_calls + 1
            eligible = self.spectral and (not layer or variance.shape[-1] == 1)
            spec = self.spectrum() if eligible and (again or self._spectrum) else None
            if spec is not None:
                spec.warned_precision |= self.warned_precision
                lp = spec.log_prob(diff, variance[..., 0] if layer else variance, diag)
                self.warned_precision = spec.warned_precision
                if lp is not None:
                    self.last_route = "spectral"
                    return lp
            self.last_route = "cholesky"
            return cholesky_log_prob(diff, self.dense_factor(variance, layer, diag)[1])
        self.last_route = "cg"
        k = len(batch) - len(torch.broadcast_shapes(vbatch, diag.shape))
        pshape = batch[k:]
        diff = diff.expand(batch + (self.size,))
        v = variance.expand(pshape + ((variance.shape[-1],) if layer else ()))
        d = diag.expand(pshape)
        results = []
        for idx in itertools.product(*map(range, pshape)):  # () once when unbatched
            rhs = diff[(Ellipsis,) + idx + (slice(None),)]
            cols = rhs.reshape(-1, self.size).T  # (N·O, columns)
            vi, di = v[idx], d[idx]
            lp, self.last_log_prob = mbcg_log_prob(
                cols,
                lambda pre, vi=vi, di=di: self.operator(vi, di, pre),
                preconditioner=self.preconditioner(),
                stronger=self.stronger_preconditioner,
                dense_factor=lambda vi=vi, di=di: self._fallback_factor(
                    vi, layer, di, "log-density"
                ),
                options=self.options,
                where=self.where,
            )
            results.append(lp.reshape(batch[:k]))
        return torch.stack(results, dim=-1).reshape(batch)

    def record_cholesky(self, A: Tensor, x: Tensor, rhs: Tensor) -> None:
        """Set :attr:`last_solve` for a Cholesky solve ``A x = rhs`` (residual recomputed)."""
        num = (rhs - A @ x).detach().norm(dim=0)
        den = rhs.detach().norm(dim=0).clamp_min(torch.finfo(rhs.dtype).tiny)
        self.last_solve = SolverDiagnostics(
            method="cholesky",
            iterations=0,
            relative_residual=float((num / den).max()) if rhs.numel() else 0.0,
            converged=True,
            tol=self.options.cg_tolerance,
            matvecs=0,
            num_rhs=rhs.shape[-1],
        )

    def solve(self, rhs: Tensor, variance: Tensor, layer: bool, diag: Tensor) -> Tensor:
        r"""``A⁻¹ rhs`` for ``rhs`` of shape ``(N·O, k)`` (scalar or ``(G,)`` σ², no batch).

        Records :attr:`last_solve`. Cholesky route: exact, its residual recomputed with one
        product. CG route: preconditioned CG, all ``k`` columns in one batched iteration,
        escalated when it stops above the tolerance
        (:func:`pyro_ntk.solvers.solve_with_escalation`): 4× ``max_cg_iterations``
        warm-started, then :meth:`stronger_preconditioner`, then the dense Cholesky solve
        when the memory guard admits ``N·O``; ``last_solve.attempts`` lists every step.
        """
        if self.method == "cholesky":
            A, L = self.dense_factor(variance, layer, diag)
            x = torch.cholesky_solve(rhs, L)
            self.record_cholesky(A, x, rhs)
            return x
        op = self.operator(variance, diag)
        pre = self.preconditioner()
        with linear_operator_settings(self.options):
            precond_closure, _, _ = op._preconditioner()
            used = pre if precond_closure is not None else None

            def stronger():
                built = self.stronger_preconditioner()
                if built is None:
                    return None
                return built.solve_closure(variance, diag), built.kind, built.rank

            def dense() -> Tensor:
                L = self._fallback_factor(variance, layer, diag, "CG solve")
                return torch.cholesky_solve(rhs, L)

            x, self.last_solve = solve_with_escalation(
                op._matmul,
                rhs,
                preconditioner=precond_closure,
                preconditioner_name=getattr(used, "kind", None),
                preconditioner_rank=getattr(used, "rank", None),
                stronger=stronger,
                dense=dense,
                tol=self.options.cg_tolerance,
                max_iter=self.options.max_cg_iterations,
                # a host check per iteration is free on CPU; amortise it on accelerators
                check_every=1 if rhs.device.type == "cpu" else 10,
                setup_seconds=getattr(used, "setup_seconds", 0.0),
                where=self.where,
            )
        return x

    # ------------------------------------------------------------------ posterior
    def posterior(
        self,
        Xnew: Tensor,
        residual: Tensor,
        variance: Tensor,
        layer: bool,
        diag: Tensor,
        *,
        full_cov: bool,
        num_samples: int,
        seed: int,
    ) -> tuple[Tensor, Tensor]:
        r"""``(μ_* − m_*, Σ_*)`` at ``Xnew`` given ``residual = y − m(X)`` ``(N·O, 1)``.

        Cholesky route: exact (:func:`~pyro_ntk.gp.cholesky_posterior`). CG route: the
        mean by one solve, the covariance from ``num_samples`` pathwise draws
        (:func:`~pyro_ntk.gp.pathwise_posterior`, seeded by ``seed``), without gradients
        with respect to the hyperparameters. Returns the ``(M·O,)`` mean shift and the
        ``(M·O, M·O)`` covariance (``full_cov``) or ``(M·O,)`` variances.
        """
        if self.method == "cholesky":
            A, L = self.dense_factor(variance, layer, diag)
            shift, cov, alpha = cholesky_posterior(
                self.lin, self.X, Xnew, residual, L, variance, full_cov=full_cov
            )
            self.record_cholesky(A, alpha, residual)
            return shift, cov
        # no gradient through the CG iterations: the pathwise estimate is for prediction
        variance, diag = variance.detach(), diag.detach()
        shift, dev = pathwise_posterior(
            self.lin, self.X, Xnew, residual, variance, layer, diag,
            lambda rhs: self.solve(rhs, variance, layer, diag), num_samples, seed,
        )  # fmt: skip
        return shift, pathwise_covariance(dev, full_cov=full_cov)
