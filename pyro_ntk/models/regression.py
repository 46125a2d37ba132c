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
from pyro_ntk.distributions import LinearizedNetwork, check_jitter
from pyro_ntk.gp import NTKSystem, add_noise, initial_hyperparameters
from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.options import SolverOptions
from pyro_ntk.parameters import normalize_positive
from pyro_ntk.solvers import SolverDiagnostics

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
    * ``solver="cholesky"`` (in ``options``, a :class:`~pyro_ntk.options.SolverOptions`):
      the dense kernel is built once (per layer for layer variances) and factored at
      every step; exact; float64 recommended. ``"auto"`` on the dense route with one σ²
      factors nothing: the marginal likelihood and its gradient come from one
      eigendecomposition of the kernel, made once, ``O(N·O)`` per step after it
      (:class:`~pyro_ntk.gp.KernelSpectrum`).
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
      :meth:`pyro_ntk.gp.NTKSystem.solve`); ``last_solve.attempts`` lists the
      steps. The CG-path marginal likelihood escalates the same way (``docs/numerics.rst``).
    * The network is never trained: it is not a submodule, only θ* copies are used.

    Args:
        X: training inputs ``(N, ...)`` (any shape the network accepts).
        y: targets ``(N,)`` for a single-output network or ``(N, O)``.
        network: the trained ``nn.Module`` or a :class:`~pyro_ntk.Linearization`.
        noise: initial s² > 0; ``None``: ``mean(r²) / 10`` with ``r = y − m(X)`` the
            targets' residuals about the mean (:func:`pyro_ntk.gp.initial_hyperparameters`),
            1 when ``y`` is ``None`` or the residuals are all 0.
        variance: initial σ² > 0: a scalar, or ``(G,)`` with ``layer_variances``; ``None``:
            ``mean(r²) / mean(diag K)`` with ``K`` the NTK at σ² = 1 (the prior variance of
            ``f`` then matches the residuals' mean square), the same value for every layer
            with ``layer_variances`` (so the kernel starts as with one σ²), 1 without ``y``.
        layer_variances: one σ_g² per parameter group (layer) of the linearization. With
            few targets (≲ 50) their type-II maximum likelihood over-fits: integrate them out
            (:func:`pyro_ntk.integrate_hyperparameters`), or use one σ² or ``layer_shrinkage``.
        layer_shrinkage: τ > 0 of the hierarchical log-normal prior of the per-layer
            variances (MAP, with ``layer_variances``): :meth:`model` adds
            ``−½ Σ_g (log σ_g² − mean_g log σ_g²)² / τ²`` to the log-density (a
            ``pyro.factor``), i.e. ``log σ_g² ~ N(log σ̄², τ²)`` about a common ``σ̄²`` with a
            flat prior. Without it the evidence of a few targets tends to put all the variance
            on one layer and overfit (transfer benchmark, 10 labels: ``computers`` test NLL
            1.85 without, 1.01 with τ = 1; ``stackoverflow`` 2.98 and 2.42; where one layer is
            the right answer it costs: ``txhousing`` 1.66 and 1.97). ``None`` (default): no
            prior, type-II maximum likelihood, which lets the variances say which layers the
            task needs to move (``examples/layer_relevance.py``).
        mean: ``"network"``, ``"zero"`` or a callable ``X -> (N,)`` / ``(N, O)``.
        options: the solver choices, a :class:`~pyro_ntk.options.SolverOptions` (``solver``
            ``"auto"`` / ``"cholesky"`` / ``"cg"``, ``preconditioner``, ``max_cholesky_size``,
            ``cg_tolerance`` for solves and SLQ, ``max_cg_iterations``,
            ``num_trace_samples``, ``preconditioner_rank``; ``None``: the defaults).
        jitter: ε ≥ 0 added to the diagonal.
        params: which parameters to linearize (see :class:`~pyro_ntk.Linearization`).
        chunk_size: inputs per chunk for the Jacobian products.
        num_posterior_samples: pathwise draws for the CG-path predictive variances.
        posterior_seed: seed of those draws.
        noise_floor: the lower bound of s² (its constraint is ``s² > noise_floor``);
            ``None``: ``1e-4 × var(y)`` when ``noise`` is ``None`` (GPyTorch's default
            bound of 1e-4 on standardized targets), 0 when a noise is given or there is no
            ``y``; 0: none. With few, nearly noise-free points the
            marginal likelihood keeps falling as s² → 0 and the predictive becomes
            overconfident: on the demo's sine task (10 points) the test NLL is 4.61 at the
            unbounded optimum s² = 1e-9 and 0.435 at the floor (``docs/numerics.rst``).
            When :func:`pyro_ntk.fit` ends with s² on this default floor it warns: the data
            then cannot tell noise from signal, and on noisy targets the predictive is
            overconfident (the transfer suite's 10-label cells: ``docs/transfer_benchmark.rst``);
            give the noise level you expect as ``noise_floor`` (e.g. ``1e-2 × var(y)``).

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
        layer_shrinkage: float | None = None,
        mean: str | Callable[[Tensor], Tensor] = "network",
        options: SolverOptions | None = None,
        jitter: float = 1e-6,
        params=None,
        chunk_size: int | None = None,
        num_posterior_samples: int = 512,
        posterior_seed: int = 0,
        noise_floor: float | None = None,
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
        if layer_shrinkage is not None and (
            isinstance(layer_shrinkage, bool)
            or not isinstance(layer_shrinkage, (int, float))
            or not 0 < layer_shrinkage < float("inf")
        ):
            raise ValueError(
                f"{where}: layer_shrinkage must be a float > 0 or None, got {layer_shrinkage!r}."
            )
        self.layer_shrinkage = None if layer_shrinkage is None else float(layer_shrinkage)
        self.num_posterior_samples = check_positive_int(
            where, "num_posterior_samples", num_posterior_samples
        )
        self.posterior_seed = int(posterior_seed)
        self._options = options
        self.set_data(X, y)

        given_noise = noise
        needed = y is not None and (noise is None or variance is None)
        start_noise, start_variance = self._initial_values() if needed else (1.0, 1.0)
        noise = normalize_positive(
            where, "noise", start_noise if noise is None else noise, lin.dtype, lin.device
        )
        if variance is None:  # one σ², or the same σ² for every layer
            shape = (len(lin.groups),) if self.layer_variances else ()
            variance = torch.full(shape, start_variance, dtype=lin.dtype, device=lin.device)
        variance, _ = lin.space.normalize_variance(
            where, variance, self.layer_variances, positive=True
        )
        self.noise_floor = self._noise_floor(where, noise_floor, y if given_noise is None else None)
        self.noise_floor_by_default = noise_floor is None and self.noise_floor > 0
        if self.noise_floor > 0 and not bool((noise.detach() > self.noise_floor).all()):
            raise ValueError(
                f"{where}: noise {noise.detach().cpu().tolist()} is not above noise_floor "
                f"{self.noise_floor:.3g}; give a larger noise or a smaller noise_floor (0 for none)."
            )
        floor = constraints.greater_than(self.noise_floor) if self.noise_floor > 0 else None
        self.noise = PyroParam(noise, floor or constraints.positive)
        self.variance = PyroParam(variance, constraints.positive)

    @staticmethod
    def _noise_floor(where: str, noise_floor: object, y: Tensor | None) -> float:
        """``noise_floor``, or ``1e-4 × var(y)`` when ``None`` (0 when ``y`` is ``None``)."""
        if noise_floor is None:
            if y is None or y.numel() < 2:
                return 0.0
            return 1e-4 * float(y.detach().reshape(y.shape[0], -1).var(0).mean())
        if isinstance(noise_floor, bool) or not isinstance(noise_floor, (int, float)):
            raise TypeError(
                f"{where}: noise_floor must be a float >= 0 or None, got {noise_floor!r}."
            )
        if not (0 <= noise_floor < float("inf")):
            raise ValueError(f"{where}: noise_floor must be a float >= 0, got {noise_floor!r}.")
        return float(noise_floor)

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
            # a fit evaluates the model many times: the spectral route from the first one
            self._system = NTKSystem(lin, X, self._options, where=where, eager_spectrum=True)
            self._mean_X = self._mean(X).detach()
        self.X = X
        self.y = y
        self._squeeze = (y is None and O == 1) or (y is not None and y.dim() == 1)

    def _initial_values(self) -> tuple[float, float]:
        """``(s², σ²)`` from the data (:func:`pyro_ntk.gp.initial_hyperparameters`)."""
        sysm = self._system
        residual = self.y.reshape(sysm.N, sysm.O) - self._mean_X
        one = torch.ones((), dtype=self.linearization.dtype, device=self.linearization.device)
        return initial_hyperparameters(residual, sysm.kernel_diag(one, False))

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
        """Observe ``y ~ N(m(X), σ²K + s²I)`` at site ``"y"`` (sample it when ``y`` is None).

        With per-layer variances and ``layer_shrinkage`` τ, the factor
        ``"layer_shrinkage"`` adds ``−½ Σ_g (log σ_g² − mean log σ²)² / τ²``.
        """
        self.set_mode("model")
        if self.layer_variances and self.layer_shrinkage is not None:
            log_v = self.variance.log()
            spread = (log_v - log_v.mean()).square().sum()
            pyro.factor(
                self._pyro_get_fullname("layer_shrinkage"), -0.5 * spread / self.layer_shrinkage**2
            )
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
        Xnew = self.linearization.check_inputs(where, "Xnew", Xnew)
        self._check_Xnew_shape(Xnew)
        self.set_mode("guide")
        sysm = self._system
        N, O, M = sysm.N, sysm.O, Xnew.shape[0]
        r = (self.y.reshape(N, O) - self._mean_X).reshape(N * O, 1)
        shift, cov = sysm.posterior(
            Xnew, r, self.variance, self.layer_variances, self.noise + self.jitter,
            full_cov=full_cov, num_samples=self.num_posterior_samples, seed=self.posterior_seed,
        )  # fmt: skip
        mean = self._mean(Xnew).reshape(M * O) + shift
        if not noiseless:  # the CG route's estimate carries no hyperparameter gradient
            noise = self.noise if sysm.method == "cholesky" else self.noise.detach()
            cov = add_noise(cov, noise, full_cov=full_cov)
        shape = (M,) if self._squeeze else (M, O)
        return mean.reshape(shape), (cov if full_cov else cov.reshape(shape))
