r"""NTK-GP regression on row-sharded data: distributed CG, predictive and marginal likelihood.

.. math::

    A = \sigma^2 K(X, X) + (s^2 + \epsilon) I,\qquad \alpha = A^{-1}(y - m(X)),\qquad
    w = \mathrm{diag}(\sigma^2)\, J^\top \alpha \in \mathbb{R}^P,

    \mu_* = m(X_*) + J(X_*)\, w,\qquad
    \Sigma_* = \sigma^2 K_{**} - \sigma^4 K_{*X} A^{-1} K_{X*},

    \log p(y) = -\tfrac12 (y - m)^\top \alpha - \tfrac12 \log\det A - \tfrac{n}{2}\log 2\pi,
    \qquad \log\det A = \log\det M + \operatorname{tr}\log(M^{-1/2} A M^{-1/2}).

``X``, ``y`` and every function-space vector are row-sharded; ``w`` is a ``P``-vector,
the same on every rank after one all-reduce, so the predictive mean at test points on
*any* rank is a local JVP with no communication.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyro_ntk._checks import check_choice, check_finite, check_positive_int, check_tensor
from pyro_ntk.distributed.linearization import ShardedLinearization
from pyro_ntk.distributed.preconditioner import (
    ShardedEigenPreconditioner,
    ShardedFisherPreconditioner,
)
from pyro_ntk.gp import add_noise, conditional_covariance, explained_covariance
from pyro_ntk.parameters import normalize_positive
from pyro_ntk.solvers import (
    SolverDiagnostics,
    lanczos_quadrature,
    solve_with_escalation,
)

__all__ = ["ShardedNTKRegression"]


class ShardedNTKRegression:
    r"""Exact NTK-GP regression whose training data are row-sharded over ``torch.distributed`` ranks.

    .. math::

        y \sim \mathcal{N}\big(m(X),\ \sigma^2 K(X, X) + (s^2 + \epsilon) I\big),\qquad
        \mu_* = m(X_*) + J(X_*)\,\mathrm{diag}(\sigma^2) J^\top \alpha,\qquad
        \Sigma_* = \sigma^2 K_{**} - \sigma^4 K_{*X} A^{-1} K_{X*}

    Each rank passes its shard ``X_r``, ``y_r`` (see :func:`~pyro_ntk.distributed.shard_rows`)
    and the same network. Solves are preconditioned CG with all-reduced inner products
    (:func:`~pyro_ntk.solvers.solve_with_escalation`: an unconverged solve reruns with 4×
    the iterations, then warns) and a :class:`ShardedFisherPreconditioner` built once; the
    posterior covariance is :func:`pyro_ntk.gp.conditional_covariance` with an all-reduce,
    the log-determinant a :func:`~pyro_ntk.solvers.lanczos_quadrature`.

    * :meth:`fit` (collective): ``α`` and the ``P``-vector ``w = diag(σ²) Jᵀα``.
    * :meth:`predict_mean` (local, no communication): ``m(X_*) + J(X_*) w`` at any
      rank's test points.
    * :meth:`predict` (collective): mean and exact variance (or covariance) at each rank's
      own test points (any number per rank, ``None`` for none): the test inputs are
      gathered and one CG solve with ``Σ_r M_r·O`` right-hand sides is shared.
    * :meth:`log_marginal_likelihood` (collective): the quadratic term from the CG solve,
      ``log det A`` as the preconditioner's exact ``log det M`` plus a stochastic Lanczos
      quadrature of ``tr log(M^{-1/2} A M^{-1/2})`` (unbiased; exact when ``M = A``).

    The hyperparameters ``σ²`` (scalar or per layer ``(G,)``) and ``s²`` are fixed
    numbers here (no gradients through the distributed solves): choose them with the
    single-process :class:`~pyro_ntk.NTKGPRegression` on a subset, or compare
    :meth:`log_marginal_likelihood` over a grid (the preconditioner is reused).

    Communication per CG iteration: one all-reduce of ``P·t`` numbers (the NTK product),
    one of ``k·t`` (the preconditioner) and three of ``t``, for ``t`` right-hand sides;
    independent of the number of rows. Compute per iteration: one JVP and one VJP over
    the local ``N_r`` rows. Memory per rank: ``O((P + N_r O) (k + t))``.

    Args:
        X: this rank's training inputs ``(N_r, ...)``, ``N_r ≥ 1``.
        y: this rank's targets ``(N_r,)`` (single output) or ``(N_r, O)``.
        network: the trained ``nn.Module`` (same weights on every rank) or a
            :class:`ShardedLinearization`.
        noise: ``s² > 0``.
        variance: ``σ² > 0``, a scalar or ``(G,)`` per parameter group.
        mean: ``"network"`` (``m = f(·; θ*)``) or ``"zero"``.
        params: which parameters to linearize.
        group: the process group (``None``: default, or one process).
        chunk_size: inputs per chunk within the shard.
        preconditioner: ``"fisher"`` or ``None``.
        preconditioner_rank: ``k``.
        jitter: ``ε ≥ 0`` added to the diagonal.
        cg_tolerance: CG relative residual.
        max_cg_iterations: CG iteration cap.
        seed: seed of the preconditioner's sketch and of the log-determinant probes.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> X = torch.linspace(-1, 1, 20, dtype=torch.float64).unsqueeze(-1)
        >>> gp = ShardedNTKRegression(X, torch.sin(3 * X).squeeze(-1), net.double(), noise=0.1,
        ...                           preconditioner_rank=5)
        >>> mean, var = gp.predict(torch.zeros(3, 1, dtype=torch.float64))
        >>> mean.shape, var.shape, gp.last_solve.converged
        (torch.Size([3]), torch.Size([3]), True)
    """

    def __init__(
        self,
        X: Tensor,
        y: Tensor,
        network: nn.Module | ShardedLinearization,
        *,
        noise: Tensor | float = 1.0,
        variance: Tensor | float = 1.0,
        mean: str = "network",
        params=None,
        group: object | None = None,
        chunk_size: int | None = None,
        preconditioner: str | None = "fisher",
        preconditioner_rank: int = 100,
        jitter: float = 0.0,
        cg_tolerance: float = 1e-8,
        max_cg_iterations: int = 1000,
        seed: int = 0,
    ):
        where = "ShardedNTKRegression"
        if isinstance(network, ShardedLinearization):
            lin = network
        elif isinstance(network, nn.Module):
            lin = ShardedLinearization(network, params, group=group, chunk_size=chunk_size)
        else:
            raise TypeError(
                f"{where}: network must be an nn.Module or a ShardedLinearization, got "
                f"{type(network).__name__}."
            )
        self.linearization = lin
        self.comm = lin.comm
        check_choice(where, "mean", mean, ("network", "zero"))
        check_choice(where, "preconditioner", preconditioner, ("fisher", None))
        check_positive_int(where, "preconditioner_rank", preconditioner_rank)
        check_positive_int(where, "max_cg_iterations", max_cg_iterations)
        if not (isinstance(cg_tolerance, float | int) and 0 < cg_tolerance < 1):
            raise ValueError(f"{where}: cg_tolerance must be in (0, 1), got {cg_tolerance!r}.")
        if isinstance(jitter, bool) or not (isinstance(jitter, float | int) and jitter >= 0):
            raise ValueError(f"{where}: jitter must be a float >= 0, got {jitter!r}.")
        self.X = lin.check_inputs(where, "X", X)
        N, O = self.X.shape[0], lin.output_dim(self.X)
        y = check_tensor(where, "y", y)
        if not ((y.shape == (N,) and O == 1) or y.shape == (N, O)):
            expected = f"({N},) or ({N}, {O})" if O == 1 else f"({N}, {O})"
            raise ValueError(f"{where}: y has shape {tuple(y.shape)}; expected {expected}.")
        if y.dtype != lin.dtype:
            raise TypeError(f"{where}: y has dtype {y.dtype}, expected {lin.dtype}.")
        self.y = check_finite(where, "y", y)
        self.noise = normalize_positive(where, "noise", noise, lin.dtype, lin.device).detach()
        variance, _ = lin.space.normalize_variance(where, variance, positive=True)
        self.variance = variance.detach()
        self.mean = mean
        self.jitter = float(jitter)
        self.cg_tolerance = float(cg_tolerance)
        self.max_cg_iterations = max_cg_iterations
        self.seed = int(seed)
        self.num_outputs = O
        self.num_data = self.comm.sum_int(N)
        self._residual = (self.y.reshape(N, O) - self._mean(self.X)).reshape(N * O)
        self._preconditioner = (
            ShardedFisherPreconditioner(
                lin, self.X, rank=preconditioner_rank, seed=self.seed, variance=self.variance
            )
            if preconditioner == "fisher"
            else None
        )
        self._alpha: Tensor | None = None
        self._weights: Tensor | None = None
        self.last_solve: SolverDiagnostics | None = None

    # ------------------------------------------------------------------ pieces
    def _mean(self, X: Tensor) -> Tensor:
        if self.mean == "network":
            return self.linearization(X)
        return torch.zeros(X.shape[0], self.num_outputs, dtype=X.dtype, device=X.device)

    @property
    def diagonal(self) -> Tensor:
        """``s² + ε``, the diagonal added to ``σ² K``."""
        return self.noise + self.jitter

    def _eigenform(self) -> tuple[ShardedEigenPreconditioner, float]:
        if self._preconditioner is not None:
            return self._preconditioner.eigenform(self.variance)
        lin, n = self.linearization, self.X.shape[0] * self.num_outputs
        empty = torch.zeros(n, 0, dtype=lin.dtype, device=lin.device)
        eig = ShardedEigenPreconditioner(
            empty, empty[0], comm=self.comm, size=self.num_data * self.num_outputs
        )
        return eig, 1.0

    def matmul(self, V: Tensor) -> Tensor:
        """This rank's rows of ``A V = σ² K V + (s² + ε) V`` (a collective)."""
        return (
            self.linearization.ntk_mvm(self.X, self.X, V, variance=self.variance)
            + self.diagonal * V
        )

    def solve(self, B: Tensor) -> tuple[Tensor, SolverDiagnostics]:
        """This rank's rows of ``A⁻¹ B`` by preconditioned CG (a collective).

        Args:
            B: this rank's rows ``(N_r·O,)`` or ``(N_r·O, t)``.

        Returns:
            ``(Z_r, diagnostics)``; also stored in :attr:`last_solve`.
        """
        closure, setup = None, 0.0
        if self._preconditioner is not None:
            eig, c = self._eigenform()
            closure, setup = eig.solve_closure(c, self.diagonal), eig.setup_seconds
        Z, diag = solve_with_escalation(
            self.matmul,
            B,
            preconditioner=closure,
            preconditioner_name=None if closure is None else "fisher",
            preconditioner_rank=None if closure is None else self._preconditioner.rank,
            tol=self.cg_tolerance,
            max_iter=self.max_cg_iterations,
            setup_seconds=setup,
            reduce=self.comm.all_reduce,
            where="ShardedNTKRegression.solve",
        )
        self.last_solve = diag
        return Z, diag

    # ------------------------------------------------------------------ posterior
    def fit(self) -> ShardedNTKRegression:
        """Solve ``α = A⁻¹(y − m)`` and reduce ``w = diag(σ²) Jᵀα`` (a collective); returns self."""
        alpha, _ = self.solve(self._residual)
        self._alpha = alpha
        N, O = self.X.shape[0], self.num_outputs
        scale = self.linearization.space.expand_group_values(self.variance)
        self._weights = self.linearization.vjp(self.X, alpha.reshape(N, O)) * scale
        return self

    @property
    def weights(self) -> Tensor:
        """``w = diag(σ²) Jᵀ α`` ``(P,)``, the same on every rank (after :meth:`fit`)."""
        if self._weights is None:
            raise RuntimeError("ShardedNTKRegression.weights: call fit() first (on every rank).")
        return self._weights

    def _shape(self, values: Tensor, M: int) -> Tensor:
        return values.reshape(M) if self.y.dim() == 1 else values.reshape(M, self.num_outputs)

    def predict_mean(self, Xnew: Tensor) -> Tensor:
        """Posterior mean ``m(X_*) + J(X_*) w`` at local test points, no communication.

        Args:
            Xnew: ``(M, ...)``.

        Returns:
            ``(M,)`` (1-D ``y``) or ``(M, O)``. Cost: one forward and one JVP over ``M``.
        """
        where = "ShardedNTKRegression.predict_mean"
        lin = self.linearization
        Xnew = lin.check_inputs(where, "Xnew", Xnew)
        mean = self._mean(Xnew) + lin.jvp(Xnew, self.weights)
        return self._shape(mean, Xnew.shape[0])

    def predict(
        self, Xnew: Tensor | None = None, *, full_cov: bool = False, noiseless: bool = True
    ) -> tuple[Tensor, Tensor] | None:
        r"""Posterior mean and exact variance (or covariance) at this rank's test points.

        A collective: every rank calls it, each with its own ``Xnew`` (``None`` or a
        different number of rows allowed). Fits first if needed.

        Args:
            Xnew: ``(M_r, ...)`` or ``None`` (this rank has no test points).
            full_cov: return the ``(M_r·O, M_r·O)`` covariance (rows ``m·O + o``) of this
                rank's points instead of the marginal variances.
            noiseless: ``False`` adds ``s²`` (predictive of a new observation).

        Returns:
            ``(mean, var)`` of shapes ``(M_r,)`` / ``(M_r, O)``, or ``(mean, cov)``; ``None``
            when ``Xnew`` is ``None``. Cost: one CG solve with ``Σ_r M_r·O`` right-hand
            sides, a dense ``(N_r·O, Σ_r M_r·O)`` cross-kernel per rank; communication: one
            all-gather of the test inputs, the solve's, and one all-reduce of
            ``Σ_r M_r·O`` numbers (``(Σ_r M_r·O)²`` with ``full_cov``).
        """
        where = "ShardedNTKRegression.predict"
        lin, O = self.linearization, self.num_outputs
        if Xnew is None:
            local = self.X.new_zeros((0, *self.X.shape[1:]))
        else:
            local = lin.check_inputs(where, "Xnew", Xnew)
        if self._weights is None:
            self.fit()
        gathered, mine = self.comm.all_gather_rows(local)
        if gathered.shape[0] == 0:
            raise ValueError(f"{where}: no rank passed test points (every Xnew is None).")
        cross = lin.local_ntk_dense(self.X, gathered, self.variance)  # σ² K(X_r, X_*)
        Z, _ = self.solve(cross)
        rows = slice(mine.start * O, mine.stop * O)
        explained = explained_covariance(
            cross, Z, full_cov=full_cov, reduce=self.comm.all_reduce, rows=rows
        )
        if Xnew is None:
            return None
        if full_cov:
            prior = lin.local_ntk_dense(local, None, self.variance)
        else:
            prior = lin.ntk_diag(local, self.variance)
        cov = conditional_covariance(prior, explained, full_cov=full_cov)
        mean = self.predict_mean(local)
        if not noiseless:
            cov = add_noise(cov, self.noise, full_cov=full_cov)
        return mean, (cov if full_cov else self._shape(cov, local.shape[0]))

    def log_marginal_likelihood(
        self, *, num_probes: int = 16, max_lanczos_steps: int = 50, lanczos_tol: float = 1e-10
    ) -> Tensor:
        r"""``log N(y | m, A)`` over all ranks' data (a collective; the same on every rank).

        .. math:: \log\det A = \log\det M + \operatorname{tr}\log(M^{-1/2} A M^{-1/2})

        The first term is exact (the preconditioner's determinant lemma; ``M = s² I``
        without a preconditioner), the second a stochastic Lanczos quadrature with
        ``num_probes`` Gaussian probes (each rank draws its rows, seed ``(seed, rank)``):
        unbiased, with standard deviation ``≈ sqrt(2 Σ_i log²λ_i / t)`` over the
        eigenvalues ``λ_i`` of ``M^{-1/2} A M^{-1/2}``, so zero when ``M = A``.

        Args:
            num_probes: ``t``.
            max_lanczos_steps: Lanczos steps per probe (stops early on an invariant
                subspace, ``β ≤ lanczos_tol · |α|``).
            lanczos_tol: breakdown threshold.

        Returns:
            A 0-dim tensor. Cost: the :meth:`fit` solve plus up to ``max_lanczos_steps``
            products of ``t`` columns with ``A`` and ``M^{-1/2}`` (twice).
        """
        where = "ShardedNTKRegression.log_marginal_likelihood"
        check_positive_int(where, "num_probes", num_probes)
        check_positive_int(where, "max_lanczos_steps", max_lanczos_steps)
        if self._alpha is None:
            self.fit()
        reduce = self.comm.all_reduce
        quad = reduce((self._residual * self._alpha).sum())
        eig, c = self._eigenform()
        inv_sqrt = eig.inverse_sqrt_closure(c, self.diagonal)
        lin = self.linearization
        gen = torch.Generator(device=lin.device).manual_seed(
            self.seed * 1_000_003 + 7919 + self.comm.rank
        )
        n_local = self.X.shape[0] * self.num_outputs
        probes = torch.randn(n_local, num_probes, generator=gen, dtype=lin.dtype, device=lin.device)
        nodes, weights, steps = lanczos_quadrature(
            lambda V: inv_sqrt(self.matmul(inv_sqrt(V))),
            probes,
            max_lanczos_steps,
            lanczos_tol,
            reduce=reduce,
        )
        norms2 = reduce(probes.square().sum(0))  # ‖g_i‖², (t,)
        tiny = torch.finfo(nodes.dtype).tiny
        trace_log = (norms2 * (weights * nodes.clamp_min(tiny).log()).sum(-1)).sum() / num_probes
        self.last_lanczos_steps = steps
        logdet = eig.logdet(c, self.diagonal) + trace_log
        n = self.num_data * self.num_outputs
        return -0.5 * quad - 0.5 * logdet - 0.5 * n * math.log(2 * math.pi)

    def __repr__(self) -> str:
        return (
            f"ShardedNTKRegression(N={self.num_data} over {self.comm.world_size} rank(s), "
            f"O={self.num_outputs}, P={self.linearization.num_params})"
        )
