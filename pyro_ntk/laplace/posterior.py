r"""The linearized Laplace posterior in eigen-form: covariance products and exact draws.

With ``S`` the prior standard deviations (``(P,)``) and the kept eigenpairs
``S_T F S_T ≈ U diag(λ) Uᵀ`` (``U`` ``(P, r)``, orthonormal columns),

.. math::

    \Sigma = S\big(I - U\,\mathrm{diag}\tfrac{\lambda}{1+\lambda}\,U^\top\big) S,
    \qquad
    \Sigma^{1/2} = S\big(I - U\,\mathrm{diag}\big(1 - (1+\lambda)^{-1/2}\big)\,U^\top\big),

exact for the eigen-form (all routes; on ``lanczos`` the kept pairs overestimate variances,
never underestimate them). Cost: O(P·r) per product and per draw, O(P²) for the dense Σ.

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
from torch import Tensor

from pyro_ntk._checks import check_positive_int
from pyro_ntk.laplace.predictive import PREDICTIONS, predictive_mean
from pyro_ntk.laplace.route import map_fisher
from pyro_ntk.preconditioners import EigenPreconditioner
from pyro_ntk.solvers import SolverDiagnostics, solve_damped

__all__ = [
    "LaplacePosterior",
    "apply_covariance",
    "check_temperature",
    "dense_covariance",
    "sample_centred",
]


def apply_covariance(S: Tensor, U: Tensor, lam: Tensor, v: Tensor) -> Tensor:
    """``Σ v`` for ``v`` ``(P,)`` or ``(P, t)``."""
    Sm = S if v.dim() == 1 else S[:, None]
    z = Sm * v
    w = lam / (1 + lam)
    z = z - U @ (w[:, None] * (U.T @ z)) if v.dim() == 2 else z - U @ (w * (U.T @ z))
    return Sm * z


def dense_covariance(S: Tensor, U: Tensor, lam: Tensor) -> Tensor:
    """Dense ``Σ`` ``(P, P)`` (small ``P`` only)."""
    inner = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    inner = inner - (U * (lam / (1 + lam))) @ U.T
    return S[:, None] * inner * S


def sample_centred(
    S: Tensor, U: Tensor, lam: Tensor, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    """Draws of ``N(0, Σ)``, ``(num_samples, P)``: ``Σ^{1/2} ε`` with ``ε ~ N(0, I)``."""
    eps = torch.randn(num_samples, S.shape[0], generator=generator, dtype=S.dtype)
    eps = eps.to(S.device)
    shrink = 1 - (1 + lam).rsqrt()
    return S * (eps - ((eps @ U) * shrink) @ U.T)


class LaplacePosterior:
    """The fitted posterior of :class:`~pyro_ntk.LinearizedLaplace`: Σ, solves, draws, predictions.

    The base of :class:`~pyro_ntk.LinearizedLaplace`, whose ``fit`` sets what it reads: the
    linearization ``lin``, the likelihood, σ² (``variance``), the ``temperature``, δ*, the
    kept eigenpairs ``(U, λ)`` and the route with its data.
    """

    @property
    def num_params(self) -> int:
        """P, the length of δ."""
        return self.lin.num_params

    @property
    def method_used(self) -> str:
        """The route of the last fit (``auto`` resolved): ``"dense"``, ``"kernel"``, ``"lanczos"``."""
        self._require_fit("LinearizedLaplace.method_used")
        return self._route.method.value

    def prior_std(self, variance: Tensor | None = None) -> Tensor:
        """S = σ per linearized parameter, shape ``(P,)``."""
        var = self.variance if variance is None else variance
        return self.lin.space.expand_group_values(var).sqrt()

    def _require_fit(self, where: str) -> None:
        if self._route is None:
            raise RuntimeError(f"{where}: call fit(X, y) first.")

    def _map_std(self, variance: Tensor | None = None) -> Tensor:
        """S_T = σ/√T, the prior standard deviations of the (tempered) MAP problem, ``(P,)``."""
        return self.prior_std(variance) / math.sqrt(self.temperature)

    @property
    def _U(self) -> Tensor:
        """The kept eigenvectors ``(P, r)`` (formed on first use on the ``kernel`` route)."""
        return self._route.U

    @property
    def eigenvalues(self) -> Tensor:
        """λ, the kept eigenvalues of the prior-whitened Fisher ``S F S``."""
        self._require_fit("LinearizedLaplace.eigenvalues")
        return self._lam

    def covariance(self) -> Tensor:
        """Dense Σ ``(P, P)`` (small ``P`` only)."""
        self._require_fit("LinearizedLaplace.covariance")
        return dense_covariance(self.prior_std(), self._U, self._lam)

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
        F = map_fisher(self._problem_fit, self._f_map)
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
        return sample_centred(self.prior_std(), self._U, self._lam, num_samples, generator)

    # ------------------------------------------------------------------ prediction
    def predictive_f(self, X: Tensor, *, full_cov: bool = False) -> tuple[Tensor, Tensor]:
        r"""Mean ``(N, O)`` and variance ``(N, O)`` (or per-example covariance ``(N, O, O)``).

        .. math:: \mu = f(x;\theta^*) + J\delta^*,\quad
            J \Sigma J^\top = J S^2 J^\top - (J S U)\,\mathrm{diag}\tfrac{\lambda}{1+\lambda}\,(J S U)^\top

        from one JVP of ``r + 1`` columns and the exact NTK diagonal, or the per-example
        Jacobian when ``full_cov`` (:mod:`pyro_ntk.laplace.predictive`); on the ``kernel``
        route from the cross kernels ``J S² J_dataᵀ`` instead, with no ``P × r`` matrix
        (:meth:`~pyro_ntk.laplace.kernel.KernelRoute.function_moments`).
        """
        where = "LinearizedLaplace.predictive_f"
        self._require_fit(where)
        X = self.lin.check_inputs(where, "X", X)
        return self._route.function_moments(
            X, self.delta, self.variance, self.temperature, full_cov
        )

    def predict(
        self,
        X: Tensor,
        *,
        method: str = "probit",
        num_samples: int = 200,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Predictive mean of ``y``: class probabilities, expected counts or means.

        ``method="probit"``: Bernoulli ``σ(μ / √(1 + π v / 8))``; categorical, the extended
        probit ``softmax(μ_k / √(1 + π v_k / 8))``; Poisson ``exp(μ + v/2)`` (exact);
        Gaussian ``μ``. ``method="mc"``: the average over ``num_samples`` posterior draws of
        δ, pushed through one JVP (joint over outputs, exact for the eigen-form).
        ``method="map"``: the likelihood's mean at the posterior mean ``μ = f(x; θ*) + J δ*``
        alone (``softmax(μ)``, ``σ(μ)``, ``exp(μ)``, ``μ``; the covariance is ignored: the
        point prediction of the linearized MAP, one JVP).

        Returns:
            categorical ``(N, O)``; otherwise ``(N,)`` for ``O = 1`` or ``(N, O)``.
        """
        where = "LinearizedLaplace.predict"
        self._require_fit(where)
        if method not in PREDICTIONS:
            raise ValueError(f"{where}: method must be 'probit', 'mc' or 'map', got {method!r}.")
        check_positive_int(where, "num_samples", num_samples)
        moments = draws = None
        if method == "probit":
            moments = self.predictive_f(X)
        else:
            X = self.lin.check_inputs(where, "X", X)
            if method == "mc":
                draws = (self.delta + self.sample(num_samples, generator=generator)).T  # (P, S)
        return predictive_mean(self._lik, self.lin, X, self.delta, method, moments, draws)

    # ------------------------------------------------------------------ evidence


def check_temperature(where: str, temperature: object) -> float:
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
