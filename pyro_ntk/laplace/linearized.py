r"""Linearized Laplace: a Gaussian posterior over δ = θ − θ* for the linearized network.

.. math::

    \delta^* = \arg\max_\delta \; \sum_n \log p\big(y_n \mid f(x_n; \theta^*) + J_n \delta\big)
        - \tfrac12 (\delta - m)^\top D (\delta - m),
    \qquad D = \mathrm{diag}(1/\sigma^2_{g(p)}),

    \Sigma = (F + D)^{-1}, \qquad F = \sum_n J_n^\top \Lambda_n J_n,

with ``Λ_n`` the likelihood's Hessian at the MAP outputs ``f_lin(x_n; δ*)`` and ``m`` the
prior mean of δ (``prior_mean``, default 0: the prior centred at θ*). Because the
model is *linear* in δ, ``F`` is its exact Hessian (not an approximation), the MAP problem is
convex, and the posterior is Gaussian up to the likelihood alone. Writing ``S = D^{-1/2}``
(prior standard deviations) and ``S F S = U diag(λ) Uᵀ`` (top eigenpairs),

.. math::

    \Sigma = S\big(I - U\,\mathrm{diag}\tfrac{\lambda}{1+\lambda}\,U^\top\big) S,
    \qquad
    \log p(y) \approx \log p(y \mid \delta^*) - \tfrac12 (\delta^* - m)^{\top} D (\delta^* - m)
        - \tfrac12 \sum_i \log(1 + \lambda_i).

Keeping only the top ``r`` eigenpairs *overestimates* variances (never underestimates them)
and drops the tail of the log-determinant. The eigenpairs come from one of three exact or
matrix-free routes (``method``, a :class:`~pyro_ntk.laplace.LaplaceMethod`): ``"dense"``
(:mod:`~pyro_ntk.laplace.dense`: ``P × P`` Fisher, small ``P``), ``"kernel"``
(:mod:`~pyro_ntk.laplace.kernel`: the ``N·O × N·O`` Gram ``Lᵀ J S² Jᵀ L``, ``Λ = L Lᵀ``:
exact for any ``P`` when ``N·O`` is small, e.g. few-shot transfer) and ``"lanczos"``
(:mod:`~pyro_ntk.laplace.lanczos`: ``r`` Lanczos steps on the matrix-free ``S F S`` from
:class:`~pyro_ntk.FisherLinearOperator`).

**Tempered posterior** (``temperature`` ``T``, default 1): ``p_T(δ | y) ∝ p(y | δ)^{1/T} p(δ)``,
whose Laplace approximation is the ordinary one at prior variance ``σ²/T`` with the
covariance multiplied by ``T`` (:mod:`pyro_ntk.laplace.posterior`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_ntk._checks import (
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_tensor,
)
from pyro_ntk.laplace.dense import DenseRoute
from pyro_ntk.laplace.function_space import FunctionSpaceMAP
from pyro_ntk.laplace.kernel import KernelRoute
from pyro_ntk.laplace.lanczos import LanczosRoute
from pyro_ntk.laplace.map import fit_map, log_joint
from pyro_ntk.laplace.posterior import LaplacePosterior, apply_covariance, check_temperature
from pyro_ntk.laplace.route import (
    LaplaceMethod,
    LaplaceProblem,
    LaplaceRoute,
    choose_method,
)
from pyro_ntk.likelihoods import Likelihood, get_likelihood
from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.parameters import ParamSelector, normalize_positive

__all__ = ["LinearizedLaplace"]


class LinearizedLaplace(LaplacePosterior):
    r"""Linearized Laplace for a trained network under a GLM likelihood.

    .. math::

        p(\delta \mid y) \approx \mathcal N(\delta^*, (F + D)^{-1}),\qquad
        f_*(x) \sim \mathcal N\big(f(x;\theta^*) + J(x)\delta^*,\; J(x)\,\Sigma\,J(x)^\top\big).

    ``fit`` finds δ* (L-BFGS on the convex log joint, or Adam on minibatches; on the
    ``kernel`` route Newton's method in function space, ``δ* = m + S² Jᵀ a``, exact in a few
    ``N·O``-sized steps; the same MAP as SVI with ``AutoDelta`` on
    :class:`~pyro_ntk.models.LinearizedModel`) and the
    posterior's eigen-form; :meth:`predict` gives class probabilities (probit or Monte Carlo)
    with one JVP of ``r + 1`` (or ``S``) columns, or on the ``kernel`` route from the test
    points' cross kernels ``J_* S² Jᵀ`` (function space, no ``P × r`` matrix);
    :meth:`log_marginal_likelihood` is the Laplace evidence and :meth:`optimize_prior`
    maximises it over σ² (scalar or per layer).

    Args:
        network: the trained ``nn.Module`` (never mutated), or a
            :class:`~pyro_ntk.Linearization` to share its θ* copy.
        likelihood: a :class:`~pyro_ntk.likelihoods.Likelihood` or its value:
            ``"categorical"`` (``O ≥ 2`` logits), ``"bernoulli"`` (logits), ``"poisson"``
            (log-rates) or ``"gaussian"`` (means; needs ``noise``).
        variance: prior variance σ² of δ (scalar, or ``(G,)`` with ``layer_variances``).
        layer_variances: one σ_g² per layer.
        params: which parameters to linearize.
        noise: Gaussian observation variance (``"gaussian"`` only).
        method: a :class:`~pyro_ntk.laplace.LaplaceMethod` or its value: ``"auto"``
            (``dense`` if ``P ≤ 2000``, else ``kernel`` if ``N·O ≤ 2000``, else
            ``lanczos``), ``"dense"``, ``"kernel"`` or ``"lanczos"``.
        rank: Lanczos steps (kept eigenpairs) for ``"lanczos"``.
        slq_probes: probes of the stochastic-Lanczos-quadrature log-determinant on the
            ``"lanczos"`` route (0: the truncated eigenvalue sum instead).
        slq_steps: Lanczos steps per SLQ probe.
        chunk_size: inputs per chunk of the Linearization's products (memory bound).
        prior_mean: the prior mean ``m`` of δ, ``(P,)`` (default 0: the prior is centred at
            θ*). The prior is ``N(m, D⁻¹)``: with ``m = θ₀ − θ*`` it is centred at ``θ₀``
            instead, e.g. ``θ₀`` = source weights with a *zero* head when the head at θ* was
            itself fitted to ``(X, y)`` (a prior centred there would count the data twice).
            When θ* is a MAP of the network under that same prior, δ* = 0.
        temperature: ``T > 0`` of the tempered posterior ``p(y | δ)^{1/T} p(δ)`` (default 1:
            the Bayes posterior). Its Laplace approximation is the ordinary one at prior
            variance ``σ²/T`` with the covariance multiplied by ``T`` (module docstring). It is
            read by :meth:`fit`: to change it, set ``la.temperature`` and fit again. A
            temperature is not a property of the model: choose it by held-out likelihood
            (cross-validation), not by the evidence.

    Cost: ``dense`` O(N·O·P² + P³) time, O(P²) memory; ``kernel`` one dense kernel per
    layer group on the data (the per-layer Grams ``J_g J_gᵀ`` by the engine's kernel
    products, never a Jacobian; kept while the data, the prior mean and θ* are unchanged,
    so refits at another σ² or ``temperature`` skip them), then O((N·O)³) per Newton step
    and per posterior, the cross kernels of ``M`` test points (reused across temperatures),
    O(G·(N·O)²) memory; ``lanczos`` ``r`` Fisher products (JVP + VJP over N each), O(P·r) memory.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X, y = torch.randn(30, 2), torch.randint(0, 3, (30,))
        >>> la = LinearizedLaplace(net, "categorical", variance=1.0).fit(X, y)
        >>> probs = la.predict(torch.randn(5, 2))
        >>> probs.shape, bool(torch.allclose(probs.sum(-1), torch.ones(5)))
        (torch.Size([5, 3]), True)
    """

    def __init__(
        self,
        network: nn.Module | Linearization,
        likelihood: str | Likelihood = "categorical",
        variance: float | Tensor = 1.0,
        layer_variances: bool = False,
        params: ParamSelector = None,
        *,
        noise: float | None = None,
        method: str | LaplaceMethod = "auto",
        rank: int = 100,
        slq_probes: int = 10,
        slq_steps: int = 30,
        chunk_size: int | None = None,
        prior_mean: Tensor | None = None,
        temperature: float = 1.0,
    ):
        where = "LinearizedLaplace"
        linearization = as_linearization(where, network, params, chunk_size)
        lik = get_likelihood(where, likelihood)
        check_choice(where, "method", method, [m.value for m in LaplaceMethod])
        if (lik.kind == Likelihood.GAUSSIAN) != (noise is not None):
            raise ValueError(
                f"{where}: noise is required for, and only for, the gaussian likelihood; got "
                f"noise={noise!r} with likelihood={likelihood!r}."
            )
        self.lin = linearization
        self.likelihood = lik.kind.value
        self._lik = lik
        self.layer_variances = bool(layer_variances)
        variance, _ = linearization.space.normalize_variance(
            where, variance, self.layer_variances, positive=True, convert=True
        )
        self.variance = variance.detach().clone()
        if noise is not None:
            noise = normalize_positive(
                where, "noise", noise, self.lin.dtype, self.lin.device, convert=True
            )
        self.noise = None if noise is None else noise.detach().clone()
        self.method = LaplaceMethod(method).value
        self.rank = check_positive_int(where, "rank", rank)
        self.slq_probes = check_nonnegative_int(where, "slq_probes", slq_probes)
        self.slq_steps = check_positive_int(where, "slq_steps", slq_steps)
        P = linearization.num_params
        if prior_mean is None:
            prior_mean = torch.zeros(P, dtype=linearization.dtype, device=linearization.device)
        prior_mean = check_tensor(where, "prior_mean", prior_mean)
        if tuple(prior_mean.shape) != (P,) or not bool(torch.isfinite(prior_mean).all()):
            raise ValueError(
                f"{where}: prior_mean must be a finite (P,) = ({P},) tensor (the prior mean of "
                f"δ = θ − θ*), got shape {tuple(prior_mean.shape)}."
            )
        self.prior_mean = prior_mean.to(linearization.dtype).detach()
        self.temperature = check_temperature(where, temperature)
        self.delta: Tensor | None = None
        self._route: LaplaceRoute | None = None
        self._function_space: FunctionSpaceMAP | None = None

    # ------------------------------------------------------------------ helpers
    def _check_data(self, where: str, X: Tensor, y: object) -> tuple[Tensor, Tensor, int]:
        X = self.lin.check_inputs(where, "X", X)
        O = self.lin.output_dim(X)
        self._lik.check_outputs(where, O)
        return X, self._lik.check_targets(where, y, X.shape[0], O, self.lin.dtype), O

    def _problem(self, X: Tensor, y: Tensor) -> LaplaceProblem:
        return LaplaceProblem(self.lin, self._lik, self.noise, self.prior_mean, X, y)

    def _make_route(self, problem: LaplaceProblem, O: int) -> LaplaceRoute:
        method = choose_method(LaplaceMethod(self.method), self.num_params, problem.X.shape[0], O)
        if method == LaplaceMethod.DENSE:
            return DenseRoute(problem)
        if method == LaplaceMethod.LANCZOS:
            return LanczosRoute(problem, self.rank, self.slq_probes, self.slq_steps)
        return self._kernel_route(problem)

    def _kernel_route(self, problem: LaplaceProblem) -> KernelRoute:
        # the function-space problem is kept while X, y, m and θ* are unchanged: refits on the
        # same data (another temperature or σ², a cross-validation grid) cost Newton steps of
        # N·O unknowns, not a new Jacobian
        if self._function_space is None or not self._function_space.matches(problem):
            self._function_space = FunctionSpaceMAP(problem)
        return KernelRoute(problem, self._function_space)

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        X: Tensor,
        y: Tensor,
        *,
        num_steps: int = 100,
        optimizer: str = "lbfgs",
        lr: float | None = None,
        batch_size: int | None = None,
        newton_steps: int = 1,
        seed: int = 0,
    ) -> LinearizedLaplace:
        """Find δ* and the posterior covariance's eigen-form on data ``(X, y)``.

        Args:
            X: inputs ``(N, ...)``.
            y: targets (see :func:`pyro_ntk.likelihoods.check_targets`).
            num_steps: L-BFGS iterations or Adam steps (the Newton iteration cap on the
                ``kernel`` route).
            optimizer: ``"lbfgs"`` (full batch, strong-Wolfe line search; on the ``kernel``
                route, function-space Newton instead) or ``"adam"``.
            lr: step size (default 1.0 for L-BFGS, 0.01 for Adam).
            batch_size: Adam minibatch size (``None``: full batch; the likelihood is
                rescaled by ``N / batch_size``).
            newton_steps: exact Newton refinements of δ* after the optimizer (each one
                Fisher solve and a new posterior; a step is kept only if it ascends). None
                on the ``kernel`` route with L-BFGS, whose function-space Newton is exact.
            seed: seed of the minibatch order and of Lanczos' start vector.

        Returns:
            ``self``.
        """
        where = "LinearizedLaplace.fit"
        self.temperature = check_temperature(where, self.temperature)
        X, y, O = self._check_data(where, X, y)
        check_positive_int(where, "num_steps", num_steps)
        check_nonnegative_int(where, "newton_steps", newton_steps)
        check_positive_int(where, "batch_size", batch_size, allow_none=True)
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"{where}: optimizer must be 'lbfgs' or 'adam', got {optimizer!r}.")
        problem = self._problem(X, y)
        route = self._make_route(problem, O)
        f0 = self.lin(X)
        exact = isinstance(route, KernelRoute) and optimizer == "lbfgs" and batch_size is None
        if exact:
            delta = route.fit_map(self.variance, self.temperature, num_steps)
        else:
            start = self.delta if self.delta is not None else torch.zeros_like(self.prior_mean)
            delta = fit_map(
                problem, f0, start, self._map_std(), num_steps=num_steps,
                optimizer=optimizer, lr=lr, batch_size=batch_size, seed=seed,
            )  # fmt: skip
        self._set_map(problem, route, f0, delta)
        self._posterior(seed)
        for _ in range(0 if exact else newton_steps):  # the function-space MAP is exact
            self._newton_step(seed)
        return self

    def _set_map(self, problem: LaplaceProblem, route: LaplaceRoute, f0: Tensor, delta) -> None:
        self.delta, self._problem_fit, self._route = delta, problem, route
        with torch.no_grad():
            self._f_map = f0 + self.lin.jvp(problem.X, delta)
            self._loglik = self._lik.log_prob(self._f_map, problem.y, self.noise)

    def _posterior(self, seed: int = 0) -> None:
        self._lam = self._route.fit_posterior(self._f_map, self.variance, self.temperature, seed)

    def _newton_step(self, seed: int) -> None:
        """δ ← δ + (F + D_T)⁻¹ ∇ log p(y, δ): exact Newton (F + D_T = Σ_T / T is the Hessian)."""
        problem, S, m = self._problem_fit, self._map_std(), self.prior_mean
        delta = self.delta.clone().requires_grad_(True)
        f0 = self._f_map - self.lin.jvp(problem.X, self.delta)
        before = float(self._loglik - 0.5 * ((self.delta - m) / S).square().sum())
        (g,) = torch.autograd.grad(log_joint(problem, f0, delta, S), delta)
        if self._route.truncated:  # the eigen-form is truncated: solve exactly by CG
            step = self.solve(g, tol=1e-10, warn=False)[0] / self.temperature
        else:
            step = apply_covariance(self.prior_std(), self._U, self._lam, g) / self.temperature
        new = self.delta + step
        with torch.no_grad():
            f_map = f0 + self.lin.jvp(problem.X, new)
            loglik = self._lik.log_prob(f_map, problem.y, self.noise)
        if float(loglik - 0.5 * ((new - m) / S).square().sum()) > before:  # accept ascent only
            self.delta, self._f_map, self._loglik = new, f_map, loglik
            self._posterior(seed)

    # ------------------------------------------------------------------ posterior
    def log_marginal_likelihood(self, variance: Tensor | None = None) -> Tensor:
        r"""The Laplace evidence at δ* (differentiable in ``variance``; default the current).

        .. math:: \log p(y) \approx \log p(y\mid\delta^*) - \tfrac12 (\delta^* - m)^{\top} D
            (\delta^* - m) - \tfrac12 \log\det(I + S F S)

        With a temperature ``T ≠ 1`` it is the Laplace approximation of the tempered
        posterior's normaliser ``log ∫ p(y | δ)^{1/T} p(δ) dδ``: ``log p(y | δ*)/T −
        ½ (δ* − m)ᵀ D (δ* − m) − ½ log det(I + S F S / T)`` (not a marginal likelihood).

        The log-determinant is exact on the ``dense`` and ``kernel`` routes. On ``lanczos``
        it is the stochastic Lanczos quadrature estimate (``slq_probes > 0``; unbiased up to
        quadrature error, standard error ∝ 1/√probes) or, with ``slq_probes=0``, the sum over
        the ``r`` kept eigenvalues (a lower bound); both can be re-evaluated at a new scalar
        σ² only (``S F S`` scales with it).
        """
        where = "LinearizedLaplace.log_marginal_likelihood"
        self._require_fit(where)
        var = self.variance if variance is None else variance
        if self._route.truncated and self.layer_variances and variance is not None:
            raise ValueError(
                f"{where}: per-layer variances need method='dense' or 'kernel'; the lanczos "
                "route keeps only the eigenpairs of S F S at the fitted σ²."
            )
        logdet = self._route.log_det(var, self.temperature, where)
        quad = ((self.delta - self.prior_mean) / self.prior_std(var)).square().sum()
        return self._loglik / self.temperature - 0.5 * quad - 0.5 * logdet

    def optimize_prior(
        self,
        X: Tensor,
        y: Tensor,
        *,
        rounds: int = 3,
        num_steps: int = 50,
        lr: float = 0.1,
        fit_steps: int = 100,
    ) -> list[float]:
        r"""Maximise the Laplace evidence over σ² (scalar or per layer), refitting δ*.

        On the ``kernel`` route the evidence is maximised *with δ* refitted at every σ²*:
        each round is ``num_steps`` L-BFGS iterations on ``log σ²`` of the function-space
        evidence (δ*, Λ and the log-determinant follow σ² through an exact Newton refit of
        ``N·O`` unknowns, with its implicit derivative), so the result is a stationary point
        of the Laplace evidence itself; ``lr`` is unused. On the ``dense`` and ``lanczos``
        routes each round is Adam (``lr``) on ``log σ²`` for ``num_steps`` steps with δ* and
        Λ fixed, then ``fit(X, y)`` again at the new σ² (warm-started): a fixed-point
        iteration that need not increase the evidence of the refitted model. With a
        ``temperature`` ≠ 1 the objective is the tempered normaliser
        (:meth:`log_marginal_likelihood`); to choose σ² by the evidence of the model itself,
        optimise at ``temperature=1`` and temper afterwards.

        Returns:
            The evidence after each round.
        """
        where = "LinearizedLaplace.optimize_prior"
        X, y, _ = self._check_data(where, X, y)
        check_positive_int(where, "rounds", rounds)
        check_positive_int(where, "num_steps", num_steps)
        if self._route is None:
            self.fit(X, y, num_steps=fit_steps)
        history = []
        if isinstance(self._route, KernelRoute):
            route, f0 = self._kernel_route(self._problem(X, y)), self.lin(X)
            for variance in route.optimize_prior(
                self.variance, self.temperature, rounds, num_steps, fit_steps
            ):
                self.variance = variance
                self._set_map(route.problem, route, f0, route.fit_map(
                    variance, self.temperature, fit_steps
                ))  # fmt: skip
                self._posterior()
                history.append(float(self.log_marginal_likelihood()))
            return history
        for _ in range(rounds):
            log_var = self.variance.log().clone().requires_grad_(True)
            opt = torch.optim.Adam([log_var], lr=lr)
            for _ in range(num_steps):
                opt.zero_grad()
                (-self.log_marginal_likelihood(log_var.exp())).backward()
                opt.step()
            self.variance = log_var.detach().exp()
            self.fit(X, y, num_steps=fit_steps)
            history.append(float(self.log_marginal_likelihood()))
        return history

    def __repr__(self) -> str:
        state = (
            f"rank={self._lam.numel()}, method={self.method_used!r}"
            if self._route is not None
            else "unfitted"
        )
        temp = "" if self.temperature == 1 else f", temperature={self.temperature:g}"
        return (
            f"LinearizedLaplace(likelihood={self.likelihood!r}, P={self.num_params}{temp}, {state})"
        )
