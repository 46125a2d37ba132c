r"""The kernel route of the linearized Laplace: exact in function space for small ``N·O``.

With ``Λ = L Lᵀ`` at the MAP (``L = diag(L_n)``, the likelihood's Hessian roots) and
``B = Jᵀ L`` ``(P, N·O)``, ``F = B Bᵀ``, so the non-zero eigenpairs of ``S_T F S_T`` are
those of the ``N·O × N·O`` Gram

.. math:: (S_T B)^\top (S_T B) = \sum_g \frac{\sigma_g^2}{T}\, L^\top J_g J_g^\top L
    = V \operatorname{diag}(\lambda) V^\top, \qquad U = S_T B V / \sqrt{\lambda},

exact for any ``P``: the per-layer Grams ``J_g J_gᵀ`` of the function-space problem
(:class:`~pyro_ntk.laplace.function_space.FunctionSpaceMAP`, built by the linearization's
kernel products, never a Jacobian, and kept while the data, the prior mean and θ* are
unchanged). The MAP is exact too (Newton's method
on ``N·O`` unknowns), and :meth:`KernelRoute.optimize_prior` maximises the evidence with δ*
refitted at every σ². The predictive stays in function space
(:meth:`KernelRoute.function_moments`: cross kernels ``J_* S² Jᵀ`` and ``(V, λ)``); the
``P × r`` directions ``U`` are formed on first use only (draws, CG solves, the dense Σ).

Cost: one dense kernel per layer group (O(P·(N·O)²) at most) once, then O((N·O)³) per
Newton step and per posterior, the cross kernels of ``M`` test inputs (once per σ²);
memory O(G·(N·O)²) for the Grams, and ``P × r`` for ``U`` when it is formed — no ``N·O × P``
Jacobian.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyro_ntk.laplace.function_space import FunctionSpaceMAP, block_left, block_sandwich
from pyro_ntk.laplace.predictive import posterior_moments
from pyro_ntk.laplace.route import LaplaceMethod, LaplaceProblem, LaplaceRoute
from pyro_ntk.solvers import cholesky_with_jitter

__all__ = ["KernelRoute"]


class KernelRoute(LaplaceRoute):
    """The eigen-form from the ``N·O × N·O`` Gram; the MAP by function-space Newton."""

    method = LaplaceMethod.KERNEL

    def __init__(self, problem: LaplaceProblem, function_space: FunctionSpaceMAP):
        super().__init__(problem)
        self.fs = function_space
        self.dual = self.delta = None  # a* and δ* of the last fit_map, at σ² and T of map_at
        self.map_at = self.fitted_at = None

    def fit_map(self, variance: Tensor, temperature: float, max_iter: int) -> Tensor:
        """δ* = m + S_T² Jᵀ a* by Newton's method in function space (exact)."""
        var = variance / temperature  # the MAP's prior variance σ²/T
        self.dual = self.fs.solve(var, max_iter=max_iter)
        self.delta = self.fs.delta(var, self.dual)
        self.map_at = (variance.detach().clone(), temperature)
        return self.delta

    def _eigenpairs(self, f_map, variance, temperature, seed):
        # the Grams B_gᵀ B_g = Lᵀ (J_g J_gᵀ) L (G, N·O, N·O) from the function-space problem's
        # J_g J_gᵀ without a pass over P (the evidence in σ_g² uses them)
        self.L = self.problem.likelihood.hessian_root(f_map, self.problem.noise)  # (N, O, O)
        self.grams = block_sandwich(self.L, self.fs.grams)
        var = variance.expand(len(self.problem.lin.groups)) / temperature
        self.eig = _nonzero_eigh(torch.einsum("g,gab->ab", var, self.grams))
        self.S = self.prior_std(variance, temperature)
        self.fitted_at = (variance.detach().clone(), temperature)
        return None, self.eig[0]  # U = S_T B V / √λ on first use (:meth:`_directions`)

    def _directions(self) -> Tensor:
        """``U = S_T Jᵀ L V / √λ`` ``(P, r)``: one VJP with ``r`` columns at the data."""
        lam, V = self.eig
        BV = self.fs.vjp(block_left(self.L, V))  # B V = Jᵀ (L V)
        return self.S[:, None] * BV / lam.sqrt()

    def function_moments(self, X, delta, variance, temperature, full_cov):
        r"""Predictive moments in function space: no ``P × r`` matrix, no JVP with ``r`` columns.

        With ``C = K(X, X_data) = J_* S² Jᵀ`` at σ² (:meth:`FunctionSpaceMAP.cross_moments`),
        ``J_* S U = C L V / √(T λ)`` (as ``S S_T = S²/√T``), so

        .. math:: J_* \Sigma J_*^\top = J_* S^2 J_*^\top
            - \tfrac1T\, C L V \operatorname{diag}\tfrac{1}{1+\lambda} V^\top L^\top C^\top,
            \qquad J_* \delta^* = J_* m + \tfrac1T\, C a^*,

        the second for the function-space MAP δ* = m + S_T² Jᵀ a* (another δ takes one JVP).
        At a σ² or T other than the posterior's (changed without a refit) the parameter-space
        formula of the base class is used. Cost: :meth:`~FunctionSpaceMAP.cross_moments`
        (reused across temperatures), then ``O(M·O·(N·O)·r)``.
        """
        if not _same(self.fitted_at, variance, temperature):
            return super().function_moments(X, delta, variance, temperature, full_cov)
        lam, V = self.eig[0][self.keep], self.eig[1][:, self.keep]
        c = self.fs.cross_moments(X, variance, full_cov)
        W = c.kernel @ (block_left(self.L, V) / (temperature * lam).sqrt())  # J_* S U
        if delta is self.delta and _same(self.map_at, variance, temperature):
            mean = c.mean + (c.kernel @ self.dual).reshape(c.mean.shape) / temperature
        else:
            mean = self.problem.lin(X) + self.problem.lin.jvp(X, delta)
        return mean, posterior_moments(c.prior, W.reshape(*c.mean.shape, -1), lam)

    def log_det(self, variance: Tensor, temperature: float, where: str) -> Tensor:
        """Cholesky of ``I + Σ_g (σ_g²/T) B_gᵀ B_g`` ``(N·O, N·O)`` (scalar or per-layer σ²)."""
        # (S_T B)ᵀ (S_T B) = Σ_g (σ_g²/T) B_gᵀ B_g
        var = variance.expand(len(self.problem.lin.groups)) / temperature
        gram = torch.einsum("g,gab->ab", var, self.grams)
        A = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) + gram
        return 2 * cholesky_with_jitter(A, where=where).diagonal().log().sum()

    def optimize_prior(
        self, variance: Tensor, temperature: float, rounds: int, num_steps: int, fit_steps: int
    ):
        """Maximise the refitted evidence over ``log σ²`` by L-BFGS; yields σ² after each round.

        Each round is ``num_steps`` L-BFGS iterations on the function-space evidence with
        ``a*`` (hence δ*, Λ and the log-determinant) refitted at every σ² and its implicit
        derivative; σ²/T is kept within :meth:`FunctionSpaceMAP.log_variance_bounds`.
        """
        fs, T = self.fs, temperature
        bounds = fs.log_variance_bounds(per_group=variance.dim() > 0)
        lo, hi = (b + math.log(T) for b in bounds)  # bounds on σ²/T
        log_var = torch.maximum(torch.minimum(variance.log(), hi), lo)
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

        for _ in range(rounds):
            opt.step(closure)
            yield torch.maximum(torch.minimum(log_var.detach(), hi), lo).exp()


def _same(at: tuple[Tensor, float] | None, variance: Tensor, temperature: float) -> bool:
    """Whether ``(σ², T)`` is the pair ``at`` a fit recorded."""
    return at is not None and at[1] == temperature and torch.equal(at[0], variance)


def _nonzero_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a Gram ``AᵀA`` (M × M) above rounding (relative ``M·eps``)."""
    mu, V = torch.linalg.eigh(gram)
    keep = mu > mu.max().clamp_min(0) * torch.finfo(mu.dtype).eps * gram.shape[0]
    return mu[keep], V[:, keep]
