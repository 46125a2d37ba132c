r"""Exact GP regression with the empirical NTK, as a ``pyro.contrib.gp`` model.

.. math::

    y \sim \mathcal{N}\big(m(X),\; \sigma^2 K(X, X) + s^2 I\big),\qquad
    K = J\,\mathrm{diag}(\sigma_g^2)\,J^\top,\quad m(X) = f(X; \theta^*),

with the full ``(N·O) × (N·O)`` cross-output NTK for multi-output networks, and the
noise :math:`s^2` and kernel variance :math:`\sigma^2` (or per-layer :math:`\sigma_g^2`)
fitted by the marginal likelihood with Pyro's inference.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro.contrib.gp.models.model import GPModel
from pyro.contrib.gp.parameterized import Parameterized
from pyro.distributions import constraints
from pyro.nn.module import PyroParam
from torch import Tensor, nn

from pyro_ntk._checks import check_choice, check_finite, check_positive_int, check_tensor
from pyro_ntk.distributions import (
    LinearizedNetwork,
    check_jitter,
    check_positive,
)
from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.ntk_system import NTKSystem
from pyro_ntk.solvers import DEFAULT_MAX_CHOLESKY_SIZE, SolverDiagnostics

__all__ = ["NTKGPRegression"]


class NTKGPRegression(GPModel):
    r"""GP regression whose kernel is a trained network's empirical NTK and whose mean is the network.

    .. math::

        y \sim \mathcal{N}\big(m(X),\; \sigma^2 K + (s^2 + \epsilon) I\big),\qquad
        \mu_* = m(X_*) + \sigma^2 K_{*X} A^{-1}(y - m(X)),\qquad
        \Sigma_* = \sigma^2 K_{**} - \sigma^4 K_{*X} A^{-1} K_{X*},

    with :math:`A = \sigma^2 K_{XX} + (s^2 + \epsilon) I`.

    * :meth:`model` observes ``y`` through :class:`~pyro_ntk.LinearizedNetwork` (site
      ``"y"``, event shape ``y.shape``); ``noise`` (s²) and ``variance`` (σ², or one per
      layer with ``layer_variances=True``) are ``PyroParam``\ s with positive constraints,
      so :func:`pyro.contrib.gp.util.train` or plain ``SVI(model.model, model.guide, ...)``
      fit them by the marginal likelihood; they also accept ``PyroSample`` priors.
    * ``solver="cholesky"``: the dense kernel is built once (per layer for layer
      variances) and recombined at every step; exact; float64 recommended.
      ``solver="cg"``: matrix-free, ``linear_operator``'s preconditioned CG + stochastic
      Lanczos quadrature for the marginal likelihood, the preconditioner
      (``make_preconditioner``) built once and reused for every σ², s².
      ``"auto"``: Cholesky while ``N·O <= max_cholesky_size`` (default 4000, measured) and
      the dense kernel fits in memory (:func:`pyro_ntk.solvers.choose_solver`).
    * :meth:`forward` on the CG path computes the mean by one CG solve and the variances
      from ``num_posterior_samples`` pathwise posterior draws
      (:math:`f_{\mathrm{post}} = f_{\mathrm{prior}} + \sigma^2 K_{\cdot X} A^{-1}
      (y - m - f_{\mathrm{prior}}(X) - \varepsilon)`), each prior draw one JVP, all draws
      solved together as one batched right-hand side. The variance estimate is unbiased
      with relative standard deviation :math:`\sqrt{2/S}` (6 % at ``S = 512``) plus the CG
      error; draws use a private generator seeded by ``posterior_seed`` (deterministic).
    * :attr:`last_solve` holds the iterations and relative residual of the latest solve. A
      CG solve that stops above ``cg_tolerance`` warns and escalates (4× the iterations, a
      4×-rank preconditioner, then dense Cholesky when it fits in memory;
      :meth:`pyro_ntk.ntk_system.NTKSystem.solve`); ``last_solve.attempts`` lists the
      steps. The CG-path marginal likelihood escalates the same way (``docs/numerics.rst``).
    * The network is never trained: it is not a submodule, only θ* copies are used.

    Args:
        X: training inputs ``(N, ...)`` (any shape the network accepts).
        y: targets ``(N,)`` for a single-output network or ``(N, O)``.
        network: the trained ``nn.Module`` or a :class:`~pyro_ntk.Linearization`.
        noise: initial s² > 0 (default 1).
        variance: initial σ² > 0: a scalar, or ``(G,)`` with ``layer_variances`` (default 1).
        layer_variances: one σ_g² per parameter group (layer) of the linearization.
        mean: ``"network"``, ``"zero"`` or a callable ``X -> (N,)`` / ``(N, O)``.
        solver: ``"auto"``, ``"cholesky"`` or ``"cg"``.
        preconditioner: ``"auto"``, ``"fisher"``, ``"nystrom"``, ``"pivoted_cholesky"`` or
            ``None`` (CG path).
        jitter: ε ≥ 0 added to the diagonal.
        params: which parameters to linearize (see :class:`~pyro_ntk.Linearization`).
        chunk_size: inputs per chunk for the Jacobian products.
        cg_tolerance: CG relative-residual tolerance (solves and SLQ).
        max_cg_iterations: CG iteration cap.
        num_trace_samples: SLQ probe vectors for the log-determinant.
        preconditioner_rank: the preconditioner's rank.
        max_cholesky_size: the ``"auto"`` threshold on ``N·O``.
        num_posterior_samples: pathwise draws for the CG-path predictive variances.
        posterior_seed: seed of those draws.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> X = torch.linspace(-1, 1, 8).unsqueeze(-1)
        >>> gp = NTKGPRegression(X, torch.sin(3 * X).squeeze(-1), net, noise=torch.tensor(0.1))
        >>> losses = pyro.contrib.gp.util.train(gp, num_steps=5)
        >>> mean, var = gp(torch.zeros(3, 1))
        >>> mean.shape, var.shape
        (torch.Size([3]), torch.Size([3]))
    """

    def __init__(
        self,
        X: Tensor,
        y: Tensor,
        network: nn.Module | Linearization,
        noise: Tensor | float | None = None,
        variance: Tensor | float | None = None,
        layer_variances: bool = False,
        mean: str | Callable[[Tensor], Tensor] = "network",
        solver: str = "auto",
        preconditioner: str | None = "auto",
        jitter: float = 1e-6,
        params=None,
        chunk_size: int | None = None,
        cg_tolerance: float = 1e-4,
        max_cg_iterations: int = 1000,
        num_trace_samples: int = 10,
        preconditioner_rank: int = 100,
        max_cholesky_size: int = DEFAULT_MAX_CHOLESKY_SIZE,
        num_posterior_samples: int = 512,
        posterior_seed: int = 0,
    ):
        where = "NTKGPRegression"
        Parameterized.__init__(self)  # GPModel.__init__ would call set_data before we are ready
        self.linearization = as_linearization(where, network, params, chunk_size)
        lin = self.linearization
        if isinstance(mean, str):
            check_choice(where, "mean", mean, ("network", "zero"))
        elif not callable(mean):
            raise TypeError(f"{where}: mean must be 'network', 'zero' or a callable, got {mean!r}.")
        self.mean = mean
        self.jitter = check_jitter(where, jitter)
        self.kernel = None  # the kernel is the network's NTK, held by the linearization
        self.mean_function = self._mean
        self.layer_variances = bool(layer_variances)
        self.num_posterior_samples = check_positive_int(
            where, "num_posterior_samples", num_posterior_samples
        )
        self.posterior_seed = int(posterior_seed)
        self._system_options = dict(
            solver=solver,
            preconditioner=preconditioner,
            max_cholesky_size=max_cholesky_size,
            cg_tolerance=cg_tolerance,
            max_cg_iterations=max_cg_iterations,
            num_trace_samples=num_trace_samples,
            preconditioner_rank=preconditioner_rank,
            where=where,
        )
        self.set_data(X, y)

        G = len(lin.groups)
        if noise is None:
            noise = torch.tensor(1.0, dtype=lin.dtype, device=lin.device)
        noise = check_positive(where, "noise", noise, lin)
        if noise.dim() != 0:
            raise ValueError(f"{where}: noise must be a scalar, got shape {tuple(noise.shape)}.")
        if variance is None:
            variance = torch.ones(G if layer_variances else (), dtype=lin.dtype, device=lin.device)
        variance = check_positive(where, "variance", variance, lin)
        expected = (G,) if layer_variances else ()
        if tuple(variance.shape) != expected:
            raise ValueError(
                f"{where}: variance has shape {tuple(variance.shape)}; expected {expected} "
                f"(layer_variances={layer_variances}, groups {lin.groups})."
            )
        self.noise = PyroParam(noise, constraints.positive)
        self.variance = PyroParam(variance, constraints.positive)

    # ------------------------------------------------------------------ data
    def set_data(self, X: Tensor, y: Tensor | None = None) -> None:
        """Set (and validate) the training data; rebuilds the solver caches when ``X`` changes.

        Args:
            X: inputs ``(N, ...)``.
            y: targets ``(N,)`` (single-output network) or ``(N, O)``; ``None`` makes
                :meth:`model` sample ``y`` (prior predictive).
        """
        where = "NTKGPRegression"
        lin = self.linearization
        X = lin.check_inputs(where, "X", X)
        N, O = X.shape[0], lin.output_dim(X)
        if y is not None:
            y = check_tensor(where, "y", y)
            expected = f"({N},) or ({N}, {O})" if O == 1 else f"({N}, {O})"
            if y.dim() == 0 or y.shape[0] != N:
                raise ValueError(
                    f"{where}: y has shape {tuple(y.shape)} but X has N = {N} rows; expected "
                    f"{expected}."
                )
            if not ((y.dim() == 1 and O == 1) or (y.dim() == 2 and y.shape[1] == O)):
                raise ValueError(
                    f"{where}: y has shape {tuple(y.shape)}, but the network gives O = {O} "
                    f"output(s) per input; expected {expected}."
                )
            if y.dtype != lin.dtype:
                raise TypeError(f"{where}: y has dtype {y.dtype}, expected {lin.dtype}.")
            check_finite(where, "y", y)
        old = getattr(self, "_system", None)
        if old is None or old.X is not X:
            self._system = NTKSystem(lin, X, **self._system_options)
            self._mean_X = self._mean(X).detach()
        self.X = X
        self.y = y
        self._squeeze = (y is None and O == 1) or (y is not None and y.dim() == 1)

    def _mean(self, X: Tensor) -> Tensor:
        """m(X), shape ``(N, O)``."""
        lin = self.linearization
        if self.mean == "network":
            return lin(X)
        N, O = X.shape[0], lin.output_dim(X)
        if self.mean == "zero":
            return torch.zeros(N, O, dtype=lin.dtype, device=lin.device)
        m = check_tensor("NTKGPRegression", "mean(X)", self.mean(X))
        if m.shape == (N,) and O == 1:
            m = m.unsqueeze(-1)
        if m.shape != (N, O):
            raise ValueError(
                f"NTKGPRegression: mean(X) returned shape {tuple(m.shape)}; expected ({N}, {O})"
                + (f" or ({N},)" if O == 1 else "")
                + "."
            )
        return check_finite("NTKGPRegression", "mean(X)", m)

    @property
    def num_outputs(self) -> int:
        """O, the network's outputs per input."""
        return self._system.O

    @property
    def last_solve(self) -> SolverDiagnostics | None:
        """Diagnostics (method, iterations, relative residual) of the latest :meth:`forward` solve."""
        return self._system.last_solve

    @property
    def solver(self) -> str:
        """The solver in use, ``"cholesky"`` or ``"cg"`` (``"auto"`` resolved)."""
        return self._system.method

    # ------------------------------------------------------------------ Pyro
    def _distribution(self) -> LinearizedNetwork:
        return LinearizedNetwork(
            self.linearization,
            self.X,
            variance=self.variance,
            mean=self._mean_X,
            jitter=self.jitter,
            noise=self.noise,
            layer_variances=self.layer_variances,
            squeeze_output=self._squeeze,
            system=self._system,
        )

    @pyro.nn.pyro_method
    def model(self) -> Tensor:
        """Observe ``y ~ N(m(X), σ²K + s²I)`` at site ``"y"`` (sample it when ``y`` is None)."""
        self.set_mode("model")
        return pyro.sample(self._pyro_get_fullname("y"), self._distribution(), obs=self.y)

    @pyro.nn.pyro_method
    def guide(self) -> None:
        """Load the hyperparameters (MAP/variational guides of ``PyroSample`` priors)."""
        self.set_mode("guide")
        self._load_pyro_samples()

    def forward(
        self, Xnew: Tensor, full_cov: bool = False, noiseless: bool = True
    ) -> tuple[Tensor, Tensor]:
        r"""Posterior mean and variance (or covariance) of f (or y) at ``Xnew``.

        Args:
            Xnew: test inputs ``(M, ...)``, feature shape of ``X``.
            full_cov: return the full covariance instead of the marginal variances.
            noiseless: ``False`` adds s² (the predictive of a new observation).

        Returns:
            ``(mean, var)``: mean ``(M,)`` (1-D ``y``) or ``(M, O)``; var of the same shape,
            or cov ``(M, M)`` / ``(M·O, M·O)`` (rows ``m·O + o``) with ``full_cov``.
            Cholesky path: exact, ``O((N·O)³ + N·O·M·O)`` plus one dense cross-kernel.
            CG path: one batched CG solve of ``1 + S`` columns, one JVP over ``[X; Xnew]``
            and one NTK product; variances are Monte Carlo (see the class notes), and the
            results carry no gradient with respect to the hyperparameters.
        """
        where = "NTKGPRegression.forward"
        if self.y is None:
            raise ValueError(f"{where}: no training targets; call set_data(X, y) first.")
        lin = self.linearization
        Xnew = lin.check_inputs(where, "Xnew", Xnew)
        self._check_Xnew_shape(Xnew)
        self.set_mode("guide")
        variance, noise = self.variance, self.noise
        sysm = self._system
        N, O, M = sysm.N, sysm.O, Xnew.shape[0]
        d = noise + self.jitter
        r = (self.y.reshape(N, O) - self._mean_X).reshape(N * O, 1)
        m_new = self._mean(Xnew).reshape(M * O)
        if sysm.method == "cholesky":
            A, L = sysm.dense_factor(variance, self.layer_variances, d)
            Kxs = lin.ntk_dense(self.X, Xnew, variance=variance)  # (N·O, M·O)
            alpha = torch.cholesky_solve(r, L)
            mean = m_new + (Kxs.T @ alpha).squeeze(-1)
            W = torch.linalg.solve_triangular(L, Kxs, upper=False)
            sysm.record_cholesky(A, alpha, r)
            if full_cov:
                cov = lin.ntk_dense(Xnew, variance=variance) - W.T @ W
            else:
                var = (lin.ntk_diag(Xnew, variance=variance) - W.square().sum(0)).clamp_min(0.0)
        else:
            # no gradient through the CG iterations: the pathwise estimate is for prediction
            variance, noise, d = variance.detach(), noise.detach(), d.detach()
            S = self.num_posterior_samples
            gen = torch.Generator(device=lin.device).manual_seed(self.posterior_seed)
            opts = dict(dtype=lin.dtype, device=lin.device, generator=gen)
            sd = variance.sqrt()
            sd = sd[lin.space.group_index()] if self.layer_variances else sd
            z = torch.randn(lin.num_params, S, **opts) * (sd if sd.dim() == 0 else sd[:, None])
            prior = lin.jvp(torch.cat([self.X, Xnew]), z).reshape((N + M) * O, S)
            eps = d.sqrt() * torch.randn(N * O, S, **opts)
            rhs = torch.cat([r, -(prior[: N * O] + eps)], dim=1)  # (N·O, 1 + S)
            sol = sysm.solve(rhs, variance, self.layer_variances, d)
            KS = lin.ntk_mvm(Xnew, self.X, sol, variance=variance)  # (M·O, 1 + S)
            mean = m_new + KS[:, 0]
            dev = prior[N * O :] + KS[:, 1:]  # pathwise f_post − E f_post, (M·O, S)
            if full_cov:
                cov = dev @ dev.T / S
            else:
                var = dev.square().mean(1)
        shape = (M,) if self._squeeze else (M, O)
        if full_cov:
            if not noiseless:
                cov = cov + noise * torch.eye(M * O, dtype=cov.dtype, device=cov.device)
            return mean.reshape(shape), cov
        if not noiseless:
            var = var + noise
        return mean.reshape(shape), var.reshape(shape)
