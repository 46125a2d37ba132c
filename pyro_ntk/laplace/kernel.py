r"""The kernel route of the linearized Laplace: exact in function space for small ``N·O``.

With ``Λ = L Lᵀ`` at the MAP (``L = diag(L_n)``, the likelihood's Hessian roots) and
``B = Jᵀ L`` ``(P, N·O)``, ``F = B Bᵀ``, so the non-zero eigenpairs of ``S_T F S_T`` are
those of the ``N·O × N·O`` Gram

.. math:: (S_T B)^\top (S_T B) = \sum_g \frac{\sigma_g^2}{T}\, L^\top J_g J_g^\top L
    = V \operatorname{diag}(\lambda) V^\top, \qquad U = S_T B V / \sqrt{\lambda},

exact for any ``P``: the per-layer Grams ``J_g J_gᵀ`` of the function-space problem
(:class:`~pyro_ntk.laplace.function_space.FunctionSpaceMAP`, kept while the data, the
prior mean and θ* are unchanged) and one VJP with ``r ≤ N·O`` columns. The MAP is exact
too (Newton's method on ``N·O`` unknowns), and :meth:`KernelRoute.optimize_prior`
maximises the evidence with δ* refitted at every σ².

Cost: O(P·(N·O)²) for the Grams once, then O((N·O)³) per Newton step and per posterior;
O(P·N·O) memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyro_ntk.laplace.function_space import FunctionSpaceMAP, block_left, block_sandwich
from pyro_ntk.laplace.route import LaplaceMethod, LaplaceProblem, LaplaceRoute
from pyro_ntk.solvers import cholesky_with_jitter

__all__ = ["KernelRoute"]


class KernelRoute(LaplaceRoute):
    """The eigen-form from the ``N·O × N·O`` Gram; the MAP by function-space Newton."""

    method = LaplaceMethod.KERNEL

    def __init__(self, problem: LaplaceProblem, function_space: FunctionSpaceMAP):
        super().__init__(problem)
        self.fs = function_space

    def fit_map(self, variance: Tensor, temperature: float, max_iter: int) -> Tensor:
        """δ* = m + S_T² Jᵀ a* by Newton's method in function space (exact)."""
        var = variance / temperature  # the MAP's prior variance σ²/T
        return self.fs.delta(var, self.fs.solve(var, max_iter=max_iter))

    def _eigenpairs(self, f_map, variance, temperature, seed):
        lin, (N, O) = self.problem.lin, f_map.shape
        S = self.prior_std(variance, temperature)
        # the Grams B_gᵀ B_g = Lᵀ (J_g J_gᵀ) L (G, N·O, N·O) from the function-space problem's
        # J_g J_gᵀ without a pass over P (the evidence in σ_g² uses them)
        L = self.problem.likelihood.hessian_root(f_map, self.problem.noise)  # (N, O, O)
        self.grams = block_sandwich(L, self.fs.grams)
        var = variance.expand(len(lin.groups)) / temperature
        lam, V = _nonzero_eigh(torch.einsum("g,gab->ab", var, self.grams))
        # eigenvectors of S_T B Bᵀ S_T: S_T B V / √λ, where B V = Jᵀ (L V) is one VJP
        BV = (
            lin.vjp(self.problem.X, block_left(L, V).reshape(N, O, -1))
            if len(lam)
            else V.new_zeros(lin.num_params, 0)
        )
        return S[:, None] * BV.reshape(lin.num_params, -1) / lam.sqrt(), lam

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


def _nonzero_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a Gram ``AᵀA`` (M × M) above rounding (relative ``M·eps``)."""
    mu, V = torch.linalg.eigh(gram)
    keep = mu > mu.max().clamp_min(0) * torch.finfo(mu.dtype).eps * gram.shape[0]
    return mu[keep], V[:, keep]
