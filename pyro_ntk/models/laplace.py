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
matrix-free routes (``method``): ``"dense"`` (``P × P`` Fisher, small ``P``), ``"kernel"``
(the ``N·O × N·O`` Gram ``Lᵀ J S² Jᵀ L``, ``Λ = L Lᵀ``: exact for any ``P`` when ``N·O`` is
small, e.g. few-shot transfer) and ``"lanczos"`` (``r`` Lanczos steps on the matrix-free
``S F S`` from :class:`~pyro_ntk.FisherLinearOperator`).

**Tempered posterior** (``temperature`` ``T``, default 1): ``p_T(δ | y) ∝ p(y | δ)^{1/T} p(δ)``.
Multiplying its log density by ``T`` shows that its Laplace approximation is the ordinary one
with prior variance ``σ²/T`` (the MAP δ*_T, and ``S_T = S/√T``) and covariance multiplied by
``T``:

.. math::

    \Sigma_T = (F/T + D)^{-1} = T\,(F + T D)^{-1}
        = S\big(I - U\,\mathrm{diag}\tfrac{\lambda}{1+\lambda}\,U^\top\big) S,
    \qquad S_T F S_T = U \mathrm{diag}(\lambda) U^\top,

so a "cold" posterior (``T < 1``) fits the mean under the wider prior ``σ²/T`` and removes
more of the prior variance along the directions the data inform (λ grows as ``1/T``); the
directions they do not inform keep the prior variance σ² (the predictive's ``J S² Jᵀ``).
"""

from __future__ import annotations

import math

import torch
from linear_operator.utils.lanczos import lanczos_tridiag
from torch import Tensor, nn

from pyro_ntk._checks import (
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_tensor,
)
from pyro_ntk.fisher import FisherLinearOperator
from pyro_ntk.linearization import Linearization, check_linearization
from pyro_ntk.models._laplace_kernel import _KernelMAP, block_left, block_sandwich
from pyro_ntk.models._likelihoods import (
    LIKELIHOODS,
    _hessian_root,
    _log_likelihood,
    check_targets,
)
from pyro_ntk.models.linearized import _check_variance
from pyro_ntk.parameters import ParamSelector
from pyro_ntk.preconditioners import EigenPreconditioner
from pyro_ntk.solvers import SolverDiagnostics, cholesky_with_jitter, solve_damped

METHODS = ("auto", "dense", "kernel", "lanczos")
_PROBIT = math.pi / 8


# ---------------------------------------------------------------------- the model
class LinearizedLaplace:
    r"""Linearized Laplace for a trained network under a GLM likelihood.

    .. math::

        p(\delta \mid y) \approx \mathcal N(\delta^*, (F + D)^{-1}),\qquad
        f_*(x) \sim \mathcal N\big(f(x;\theta^*) + J(x)\delta^*,\; J(x)\,\Sigma\,J(x)^\top\big).

    ``fit`` finds δ* (L-BFGS on the convex log joint, or Adam on minibatches; on the
    ``kernel`` route Newton's method in function space, ``δ* = m + S² Jᵀ a``, exact in a few
    ``N·O``-sized steps; the same MAP as SVI with ``AutoDelta`` on
    :class:`~pyro_ntk.models.LinearizedModel`) and the
    posterior's eigen-form; :meth:`predict` gives class probabilities (probit or Monte Carlo)
    test chunk by test chunk, with one JVP of ``r + 1`` (or ``S``) columns per chunk and no
    Jacobian for all test points; :meth:`log_marginal_likelihood` is the Laplace evidence and
    :meth:`optimize_prior` maximises it over σ² (scalar or per layer).

    Args:
        network: the trained ``nn.Module`` (never mutated).
        likelihood: ``"categorical"`` (``O ≥ 2`` logits), ``"bernoulli"`` (logits),
            ``"poisson"`` (log-rates) or ``"gaussian"`` (means; needs ``noise``).
        variance: prior variance σ² of δ (scalar, or ``(G,)`` with ``layer_variances``).
        layer_variances: one σ_g² per layer.
        params: which parameters to linearize.
        noise: Gaussian observation variance (``"gaussian"`` only).
        method: ``"auto"`` (``dense`` if ``P ≤ 2000``, else ``kernel`` if ``N·O ≤ 2000``,
            else ``lanczos``), ``"dense"``, ``"kernel"`` or ``"lanczos"``.
        rank: Lanczos steps (kept eigenpairs) for ``"lanczos"``.
        slq_probes: probes of the stochastic-Lanczos-quadrature log-determinant on the
            ``"lanczos"`` route (0: the truncated eigenvalue sum instead).
        slq_steps: Lanczos steps per SLQ probe.
        chunk_size: inputs per chunk for Jacobian products.
        linearization: an existing :class:`~pyro_ntk.Linearization` to share.
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

    Cost: ``dense`` O(N·O·P² + P³) time, O(P²) memory; ``kernel`` the Jacobian on the data
    once (O(P·(N·O)²) for the per-layer Grams ``J_g J_gᵀ``, kept while the data, the prior
    mean and θ* are unchanged, so refits at another σ² or ``temperature`` skip it), then
    O((N·O)³) per Newton step and one VJP with ``r ≤ N·O`` columns per posterior, O(P·N·O)
    memory; ``lanczos`` ``r`` Fisher products (JVP + VJP over N each), O(P·r) memory.

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
        network: nn.Module | None,
        likelihood: str = "categorical",
        variance: float | Tensor = 1.0,
        layer_variances: bool = False,
        params: ParamSelector = None,
        *,
        noise: float | None = None,
        method: str = "auto",
        rank: int = 100,
        slq_probes: int = 10,
        slq_steps: int = 30,
        chunk_size: int | None = None,
        linearization: Linearization | None = None,
        prior_mean: Tensor | None = None,
        temperature: float = 1.0,
    ):
        where = "LinearizedLaplace"
        if linearization is None:
            linearization = Linearization(network, params, chunk_size=chunk_size)
        else:
            check_linearization(where, linearization)
        check_choice(where, "likelihood", likelihood, LIKELIHOODS)
        check_choice(where, "method", method, METHODS)
        if (likelihood == "gaussian") != (noise is not None):
            raise ValueError(
                f"{where}: noise is required for, and only for, the gaussian likelihood; got "
                f"noise={noise!r} with likelihood={likelihood!r}."
            )
        self.lin = linearization
        self.likelihood = likelihood
        self.layer_variances = bool(layer_variances)
        self.variance = _check_variance(where, variance, linearization, layer_variances)
        self.noise = (
            None if noise is None else _check_variance(where, noise, linearization, False, "noise")
        )
        self.method = method
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
        self.temperature = _check_temperature(where, temperature)
        self.delta: Tensor | None = None
        self._fitted = False
        self._kernel_cache: _KernelMAP | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def num_params(self) -> int:
        """P, the length of δ."""
        return self.lin.num_params

    def prior_std(self, variance: Tensor | None = None) -> Tensor:
        """S = σ per linearized parameter, shape ``(P,)``."""
        var = self.variance if variance is None else variance
        return self.lin.space.expand_group_values(var).sqrt()

    def _map_std(self, variance: Tensor | None = None) -> Tensor:
        """S_T = σ/√T, the prior standard deviations of the (tempered) MAP problem, ``(P,)``."""
        return self.prior_std(variance) / math.sqrt(self.temperature)

    def _check_data(self, where: str, X: Tensor, y: object) -> tuple[Tensor, Tensor, int]:
        X = self.lin.check_inputs(where, "X", X)
        O = self.lin.output_dim(X)
        if self.likelihood == "categorical" and O < 2:
            raise ValueError(
                f"{where}: the categorical likelihood needs O >= 2 logits, got O = {O}."
            )
        return X, check_targets(where, self.likelihood, y, X.shape[0], O, self.lin.dtype), O

    def _require_fit(self, where: str) -> None:
        if not self._fitted:
            raise RuntimeError(f"{where}: call fit(X, y) first.")

    def _log_joint(self, f0: Tensor, X: Tensor, y: Tensor, delta: Tensor, S: Tensor) -> Tensor:
        f = f0 + self.lin.jvp(X, delta)
        quad = ((delta - self.prior_mean) / S).square().sum()
        return _log_likelihood(self.likelihood, f, y, self.noise) - 0.5 * quad

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
            y: targets (see :func:`check_targets`).
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
        self.temperature = _check_temperature(where, self.temperature)
        X, y, O = self._check_data(where, X, y)
        check_positive_int(where, "num_steps", num_steps)
        check_nonnegative_int(where, "newton_steps", newton_steps)
        check_positive_int(where, "batch_size", batch_size, allow_none=True)
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"{where}: optimizer must be 'lbfgs' or 'adam', got {optimizer!r}.")
        kernel = self._choose_method(X.shape[0], O) == "kernel"
        exact = kernel and optimizer == "lbfgs" and batch_size is None
        if exact:
            self._map_kernel(self._kernel_problem(X, y), X, y, num_steps)
        else:
            self._map(X, y, num_steps, optimizer, lr, batch_size, seed)
        self._posterior(X, seed)
        for _ in range(0 if exact else newton_steps):  # the function-space MAP is exact
            self._newton_step(X, y, seed)
        return self

    def _kernel_problem(self, X: Tensor, y: Tensor) -> _KernelMAP:
        """The function-space problem of ``(X, y)``, kept while X, y, m and θ* are unchanged.

        Refits on the same data (another temperature or σ², a cross-validation grid) then
        cost Newton steps of ``N·O`` unknowns, not a new Jacobian.
        """
        if self._kernel_cache is None or not self._kernel_cache.matches(X, y):
            self._kernel_cache = _KernelMAP(self, X, y)
        return self._kernel_cache

    def _newton_step(self, X: Tensor, y: Tensor, seed: int) -> None:
        """δ ← δ + (F + D_T)⁻¹ ∇ log p(y, δ): exact Newton (F + D_T = Σ_T / T is the Hessian)."""
        S = self._map_std()
        delta = self.delta.clone().requires_grad_(True)
        f0 = self._f_map - self.lin.jvp(X, self.delta)
        m = self.prior_mean
        before = float(self._loglik - 0.5 * ((self.delta - m) / S).square().sum())
        (g,) = torch.autograd.grad(self._log_joint(f0, X, y, delta, S), delta)
        if self.method_used == "lanczos":  # the eigen-form is truncated: solve exactly by CG
            step = self.solve(g, tol=1e-10, warn=False)[0] / self.temperature
        else:
            step = self._apply_covariance(g) / self.temperature
        new = self.delta + step
        with torch.no_grad():
            f_map = f0 + self.lin.jvp(X, new)
            loglik = _log_likelihood(self.likelihood, f_map, y, self.noise)
        if float(loglik - 0.5 * ((new - m) / S).square().sum()) > before:  # accept ascent only
            self.delta, self._f_map, self._loglik = new, f_map, loglik
            self._posterior(X, seed)

    def _apply_covariance(self, v: Tensor) -> Tensor:
        """Σ_T v from the eigen-form, ``v`` of shape ``(P,)`` or ``(P, t)``."""
        S = self.prior_std()
        Sm = S if v.dim() == 1 else S[:, None]
        z = Sm * v
        w = self._lam / (1 + self._lam)
        z = (
            z - self._U @ (w[:, None] * (self._U.T @ z))
            if v.dim() == 2
            else z - self._U @ (w * (self._U.T @ z))
        )
        return Sm * z

    def _map(self, X, y, num_steps, optimizer, lr, batch_size, seed) -> None:
        S = self._map_std()
        start = torch.zeros(self.num_params, dtype=self.lin.dtype, device=self.lin.device)
        delta = (start if self.delta is None else self.delta.clone()).requires_grad_(True)
        f0 = self.lin(X)
        N = X.shape[0]
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(
                [delta], lr=lr or 1.0, max_iter=num_steps, line_search_fn="strong_wolfe",
                tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20,
            )  # fmt: skip

            def closure() -> Tensor:
                opt.zero_grad()
                loss = -self._log_joint(f0, X, y, delta, S) / N
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt = torch.optim.Adam([delta], lr=lr or 0.01)
            gen = torch.Generator().manual_seed(seed)
            B = batch_size or N
            for _ in range(num_steps):
                idx = torch.randperm(N, generator=gen)[:B].to(X.device)
                opt.zero_grad()
                f = f0[idx] + self.lin.jvp(X[idx], delta)
                lik = _log_likelihood(self.likelihood, f, y[idx], self.noise) * (N / B)
                loss = -(lik - 0.5 * ((delta - self.prior_mean) / S).square().sum()) / N
                loss.backward()
                opt.step()
        self.delta = delta.detach()
        with torch.no_grad():
            self._f_map = f0 + self.lin.jvp(X, self.delta)
            self._loglik = _log_likelihood(self.likelihood, self._f_map, y, self.noise)
        self._X, self._y = X, y

    def _map_kernel(self, fs: _KernelMAP, X: Tensor, y: Tensor, max_iter: int) -> None:
        """δ* by Newton's method in function space (exact; ``kernel`` route)."""
        var = self.variance / self.temperature  # the MAP's prior variance σ²/T
        a = fs.solve(var, max_iter=max_iter)
        self.delta = fs.delta(var, a)
        with torch.no_grad():
            self._f_map = fs.f0 + self.lin.jvp(X, self.delta)
            self._loglik = _log_likelihood(self.likelihood, self._f_map, y, self.noise)
        self._X, self._y = X, y

    def _fisher(self, X: Tensor) -> FisherLinearOperator:
        """F with Λ at the MAP outputs (the linear model's exact Hessian of −log p(y|δ))."""
        return FisherLinearOperator(
            X, linearization=self.lin, likelihood=self.likelihood,
            noise=1.0 if self.noise is None else self.noise,
            outputs=self._f_map,  # Λ(f_lin(X; δ*)), not Λ(f(X; θ*))
        )  # fmt: skip

    def _choose_method(self, N: int, O: int) -> str:
        if self.method != "auto":
            return self.method
        if self.num_params <= 2000:
            return "dense"
        return "kernel" if N * O <= 2000 else "lanczos"

    def _posterior(self, X: Tensor, seed: int = 0) -> None:
        N, O = self._f_map.shape
        self.method_used = self._choose_method(N, O)
        S = self._map_std()  # eigenpairs of S_T F S_T
        if self.method_used == "dense":
            # unscaled F (P, P), kept for evidence optimisation; S F S = U diag(λ) Uᵀ
            self._F = self._fisher(X).to_dense()
            lam, U = torch.linalg.eigh(S[:, None] * self._F * S)
        elif self.method_used == "kernel":
            # F = B Bᵀ with B = Jᵀ L (P, N·O), L = diag(L_n) the root of Λ at δ*. The Grams
            # B_gᵀ B_g = Lᵀ (J_g J_gᵀ) L (G, N·O, N·O) come from the function-space problem's
            # J_g J_gᵀ without a pass over P (the evidence in σ_g² uses them), and S_T B's Gram
            # is Σ_g (σ_g²/T) B_gᵀ B_g
            L = _hessian_root(self.likelihood, self._f_map, self.noise)  # (N, O, O)
            self._grams = block_sandwich(L, self._kernel_problem(X, self._y).grams)
            var = self.variance.expand(len(self.lin.groups)) / self.temperature
            lam, V = self._nonzero_eigh(torch.einsum("g,gab->ab", var, self._grams))
            # eigenvectors of S_T B Bᵀ S_T: S_T B V / √λ, where B V = Jᵀ (L V) is one VJP
            BV = (
                self.lin.vjp(X, block_left(L, V).reshape(N, O, -1))
                if len(lam)
                else V.new_zeros(self.num_params, 0)
            )
            U = S[:, None] * BV.reshape(self.num_params, -1) / lam.sqrt()
        else:
            F = self._fisher(X)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            init = torch.randn(self.num_params, 1, generator=gen, dtype=self.lin.dtype)
            Q, T = lanczos_tridiag(
                lambda V: S[:, None] * F._matmul(S[:, None] * V),
                max_iter=min(self.rank, self.num_params),
                dtype=self.lin.dtype, device=self.lin.device,
                matrix_shape=(self.num_params, self.num_params), init_vecs=init.to(self.lin.device),
            )  # fmt: skip
            theta, W = torch.linalg.eigh(T)
            lam, U = theta, Q @ W
            self._slq = self._slq_nodes(F, S, seed) if self.slq_probes else None
        keep = lam > lam.max().clamp_min(0) * torch.finfo(lam.dtype).eps * 10
        self._U, self._lam = U[:, keep], lam[keep]
        self._fitted = True

    def _slq_nodes(self, F: FisherLinearOperator, S: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Stochastic Lanczos quadrature nodes θ and weights w ``(m, k)`` of ``S F S``.

        ``tr log(I + c·S F S) ≈ P · mean_i Σ_j w_ij log(1 + c θ_ij)`` for any scale ``c``
        (Ubaru, Chen & Saad 2017), from ``m`` Rademacher probes and ``k`` Lanczos steps each,
        all probes batched in every Fisher product.
        """
        P, m = self.num_params, self.slq_probes
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        Z = torch.randint(0, 2, (P, m), generator=gen).to(S) * 2 - 1
        _, T = lanczos_tridiag(
            lambda V: S[:, None] * F._matmul(S[:, None] * V),
            max_iter=min(self.slq_steps, P), dtype=S.dtype, device=S.device,
            matrix_shape=(P, P), init_vecs=Z,
        )  # fmt: skip
        theta, V = torch.linalg.eigh(T.reshape(m, *T.shape[-2:]))
        return theta.clamp_min(0), V[..., 0, :].square()

    @staticmethod
    def _nonzero_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
        """Eigenpairs of a Gram ``AᵀA`` (M × M) above rounding (relative ``M·eps``)."""
        mu, V = torch.linalg.eigh(gram)
        keep = mu > mu.max().clamp_min(0) * torch.finfo(mu.dtype).eps * gram.shape[0]
        return mu[keep], V[:, keep]

    # ------------------------------------------------------------------ posterior
    @property
    def eigenvalues(self) -> Tensor:
        """λ, the kept eigenvalues of the prior-whitened Fisher ``S F S``."""
        self._require_fit("LinearizedLaplace.eigenvalues")
        return self._lam

    def covariance(self) -> Tensor:
        """Dense Σ ``(P, P)`` (small ``P`` only)."""
        self._require_fit("LinearizedLaplace.covariance")
        S, U, lam = self.prior_std(), self._U, self._lam
        inner = torch.eye(self.num_params, dtype=S.dtype, device=S.device)
        inner = inner - (U * (lam / (1 + lam))) @ U.T
        return S[:, None] * inner * S

    def solve(
        self, B: Tensor, *, tol: float = 1e-8, max_iter: int = 500, warn: bool = True
    ) -> tuple[Tensor, SolverDiagnostics]:
        """Σ B = (F/T + D)⁻¹ B by CG on ``S_T F S_T + I``, preconditioned by the kept eigenpairs.

        ``Σ_T B = S (S_T F S_T + I)⁻¹ S B`` with ``S_T = S/√T`` (``T = 1``: ``(F + D)⁻¹ B``).

        Args:
            B: ``(P,)`` or ``(P, t)``.
            tol: relative residual target.
            max_iter: CG iteration cap.
            warn: emit a ``NumericalWarning`` when CG does not converge.

        Returns:
            ``(Σ B, diagnostics)``. Cost: one Fisher product per iteration (matrix-free).
        """
        self._require_fit("LinearizedLaplace.solve")
        S, St = self.prior_std(), self._map_std()
        F = self._fisher(self._X)
        Sm = S if B.dim() == 1 else S[:, None]
        pre = EigenPreconditioner(self._U, self._lam)
        Z, diag = solve_damped(
            lambda V: St[:, None] * F._matmul(St[:, None] * V) if V.dim() == 2
            else St * F._matmul(St * V),
            Sm * B, 1.0, preconditioner=pre, tol=tol, max_iter=max_iter, warn=warn,
        )  # fmt: skip
        return Sm * Z, diag

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Posterior draws of δ − δ* ~ N(0, Σ), shape ``(num_samples, P)``.

        δ = S (ε − U diag(1 − (1+λ)^{-1/2}) Uᵀ ε) with ε ~ N(0, I): exact for the eigen-form.
        """
        self._require_fit("LinearizedLaplace.sample")
        S, U, lam = self.prior_std(), self._U, self._lam
        eps = torch.randn(num_samples, self.num_params, generator=generator, dtype=S.dtype)
        eps = eps.to(S.device)
        shrink = 1 - (1 + lam).rsqrt()
        return S * (eps - ((eps @ U) * shrink) @ U.T)

    # ------------------------------------------------------------------ prediction
    def predictive_f(
        self, X: Tensor, *, full_cov: bool = False, chunk_size: int = 256
    ) -> tuple[Tensor, Tensor]:
        r"""Mean ``(N, O)`` and variance ``(N, O)`` (or per-example covariance ``(N, O, O)``).

        .. math:: \mu = f(x;\theta^*) + J\delta^*,\quad
            J \Sigma J^\top = J S^2 J^\top - (J S U)\,\mathrm{diag}\tfrac{\lambda}{1+\lambda}\,(J S U)^\top

        computed per test chunk with one JVP of ``r + 1`` columns (and the exact NTK diagonal,
        or the chunk's per-example Jacobian when ``full_cov``).
        """
        where = "LinearizedLaplace.predictive_f"
        self._require_fit(where)
        X = self.lin.check_inputs(where, "X", X)
        check_positive_int(where, "chunk_size", chunk_size)
        S, U, lam = self.prior_std(), self._U, self._lam
        V = torch.cat([self.delta[:, None], S[:, None] * U], dim=1)  # (P, 1 + r)
        w = lam / (1 + lam)
        means, covs = [], []
        for start in range(0, X.shape[0], chunk_size):
            Xc = X[start : start + chunk_size]
            # [δ*, S U] → [J δ*, J S U] in one JVP
            JV = self.lin.jvp(Xc, V)
            means.append(self.lin(Xc) + JV[..., 0])
            W = JV[..., 1:]  # (n, O, r)
            if full_cov:
                J = self.lin.jacobian(Xc)
                prior = torch.einsum("nop,nqp->noq", J * S.square(), J)
                covs.append(prior - torch.einsum("nor,nqr->noq", W * w, W))
            else:
                prior = self.lin.ntk_diag(Xc, self.variance).reshape(W.shape[:2])
                covs.append((prior - (W.square() * w).sum(-1)).clamp_min(0))
        return torch.cat(means), torch.cat(covs)

    def predict(
        self,
        X: Tensor,
        *,
        method: str = "probit",
        num_samples: int = 200,
        chunk_size: int = 256,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Predictive mean of ``y``: class probabilities, expected counts or means.

        ``method="probit"``: Bernoulli ``σ(μ / √(1 + π v / 8))``; categorical, the extended
        probit ``softmax(μ_k / √(1 + π v_k / 8))``; Poisson ``exp(μ + v/2)`` (exact);
        Gaussian ``μ``. ``method="mc"``: the average over ``num_samples`` posterior draws of
        δ, pushed through one JVP per chunk (joint over outputs, exact for the eigen-form).
        ``method="map"``: the likelihood's mean at the posterior mean ``μ = f(x; θ*) + J δ*``
        alone (``softmax(μ)``, ``σ(μ)``, ``exp(μ)``, ``μ``; the covariance is ignored: the
        point prediction of the linearized MAP, one JVP per chunk).

        Returns:
            categorical ``(N, O)``; otherwise ``(N,)`` for ``O = 1`` or ``(N, O)``.
        """
        where = "LinearizedLaplace.predict"
        self._require_fit(where)
        if method not in ("probit", "mc", "map"):
            raise ValueError(f"{where}: method must be 'probit', 'mc' or 'map', got {method!r}.")
        check_positive_int(where, "num_samples", num_samples)
        if method in ("probit", "map"):
            if method == "map":
                X = self.lin.check_inputs(where, "X", X)
                check_positive_int(where, "chunk_size", chunk_size)
                mu = torch.cat([
                    self.lin(Xc) + self.lin.jvp(Xc, self.delta) for Xc in X.split(chunk_size)
                ])  # fmt: skip
                var = torch.zeros_like(mu)
            else:
                mu, var = self.predictive_f(X, chunk_size=chunk_size)
            if self.likelihood == "categorical":
                out = torch.softmax(mu / (1 + _PROBIT * var).sqrt(), -1)
            elif self.likelihood == "bernoulli":
                out = torch.sigmoid(mu / (1 + _PROBIT * var).sqrt())
            elif self.likelihood == "poisson":
                out = (mu + var / 2).exp()
            else:
                out = mu
        else:
            X = self.lin.check_inputs(where, "X", X)
            draws = (self.delta + self.sample(num_samples, generator=generator)).T  # (P, S)
            outs = []
            for start in range(0, X.shape[0], chunk_size):
                Xc = X[start : start + chunk_size]
                f = self.lin(Xc).unsqueeze(-1) + self.lin.jvp(Xc, draws)  # (n, O, S)
                if self.likelihood == "categorical":
                    outs.append(torch.softmax(f, 1).mean(-1))
                elif self.likelihood == "bernoulli":
                    outs.append(torch.sigmoid(f).mean(-1))
                elif self.likelihood == "poisson":
                    outs.append(f.exp().mean(-1))
                else:
                    outs.append(f.mean(-1))
            out = torch.cat(outs)
        return out if self.likelihood == "categorical" or out.shape[-1] != 1 else out[..., 0]

    # ------------------------------------------------------------------ evidence
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
        S, T = self.prior_std(var), self.temperature
        route = self.method_used
        if route == "dense":
            A = torch.eye(self.num_params, dtype=S.dtype, device=S.device)
            L = cholesky_with_jitter(A + S[:, None] * self._F * S / T, where=where)
            logdet = 2 * L.diagonal().log().sum()
        elif route == "kernel":
            # (S_T B)ᵀ (S_T B) = Σ_g (σ_g²/T) B_gᵀ B_g
            gram = torch.einsum("g,gab->ab", var.expand(len(self.lin.groups)) / T, self._grams)
            A = torch.eye(gram.shape[0], dtype=S.dtype, device=S.device) + gram
            logdet = 2 * cholesky_with_jitter(A, where=where).diagonal().log().sum()
        else:
            if self.layer_variances and variance is not None:
                raise ValueError(
                    f"{where}: per-layer variances need method='dense' or 'kernel'; the lanczos "
                    "route keeps only the eigenpairs of S F S at the fitted σ²."
                )
            c = var / self.variance
            if self._slq is None:
                logdet = torch.log1p(self._lam * c).sum()
            else:
                theta, w = self._slq
                logdet = self.num_params * (w * torch.log1p(c * theta)).sum(-1).mean()
        quad = ((self.delta - self.prior_mean) / S).square().sum()
        return self._loglik / T - 0.5 * quad - 0.5 * logdet

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
        if not self._fitted:
            self.fit(X, y, num_steps=fit_steps)
        if self.method_used == "kernel":
            return self._optimize_prior_kernel(X, y, rounds, num_steps, fit_steps)
        history = []
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

    def _optimize_prior_kernel(
        self, X: Tensor, y: Tensor, rounds: int, num_steps: int, fit_steps: int
    ) -> list[float]:
        fs = self._kernel_problem(X, y)
        T = self.temperature
        lo, hi = (b + math.log(T) for b in fs.log_variance_bounds())  # bounds on σ²/T
        log_var = torch.maximum(torch.minimum(self.variance.log(), hi), lo)
        log_var = log_var.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [log_var], max_iter=num_steps, line_search_fn="strong_wolfe",
            tolerance_grad=1e-7, tolerance_change=1e-10,
        )  # fmt: skip
        state: dict[str, Tensor | None] = {"a": None}

        def closure() -> Tensor:
            opt.zero_grad()
            var = torch.maximum(torch.minimum(log_var, hi), lo).exp()
            state["a"] = fs.solve(var.detach() / T, state["a"], max_iter=fit_steps)
            loss = -fs.evidence(var / T, state["a"], temperature=T)
            loss.backward()
            return loss

        history = []
        for _ in range(rounds):
            opt.step(closure)
            self.variance = torch.maximum(torch.minimum(log_var.detach(), hi), lo).exp()
            self._map_kernel(fs, X, y, fit_steps)
            self._posterior(X)
            history.append(float(self.log_marginal_likelihood()))
        return history

    def __repr__(self) -> str:
        state = (
            f"rank={self._lam.numel()}, method={self.method_used!r}" if self._fitted else "unfitted"
        )
        temp = "" if self.temperature == 1 else f", temperature={self.temperature:g}"
        return (
            f"LinearizedLaplace(likelihood={self.likelihood!r}, P={self.num_params}{temp}, {state})"
        )


def _check_temperature(where: str, temperature: object) -> float:
    """A finite positive float, or ValueError/TypeError naming ``where``."""
    if isinstance(temperature, Tensor) and temperature.numel() == 1:
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(
            f"{where}: temperature must be a positive float, got {type(temperature).__name__}."
        )
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"{where}: temperature must be a finite number > 0 (1: the Bayes posterior), got "
            f"{temperature!r}."
        )
    return float(temperature)
