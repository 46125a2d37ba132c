r"""The linearized Laplace's function-space route: exact MAP and evidence for small ``N·O``.

.. math::

    \delta^* = m + S^2 J^\top a^*, \qquad
    a^* = \arg\max_a\; \log p(y \mid \mu_0 + K a) - \tfrac12 a^\top K a,
    \qquad K = J S^2 J^\top,

solved by Newton's method on ``a`` (``N·O`` unknowns, never ``P``); used by the ``"kernel"``
route of :class:`~pyro_ntk.LinearizedLaplace` (:mod:`pyro_ntk.laplace.kernel`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from pyro_ntk.laplace.route import LaplaceProblem

__all__ = ["CrossMoments", "FunctionSpaceMAP", "block_left", "block_sandwich"]


class CrossMoments(NamedTuple):
    """Prior moments of ``f`` at test inputs ``X``: :meth:`FunctionSpaceMAP.cross_moments`."""

    mean: Tensor
    """``f(X; θ*) + J(X) m``, ``(M, O)``."""
    kernel: Tensor
    """``J(X) S² Jᵀ`` against the data, ``(M·O, N·O)``."""
    prior: Tensor
    """``diag J(X) S² J(X)ᵀ`` ``(M, O)``, or its per-example blocks ``(M, O, O)``."""


def _same_key(a: tuple, b: tuple) -> bool:
    return all(
        x.shape == y.shape and x.device == y.device and torch.equal(x, y)
        if isinstance(x, Tensor) else x == y
        for x, y in zip(a, b)
    )  # fmt: skip


def block_left(L: Tensor, Z: Tensor, transpose: bool = False) -> Tensor:
    """``L Z`` (or ``Lᵀ Z``) for the block-diagonal ``L = diag(L_1, …, L_N)`` of ``(N, O, O)``.

    ``Z`` is ``(N·O, k)`` in the sample-major layout; cost ``O(N·O²·k)``, not ``O((N·O)²·k)``.
    """
    N, O, _ = L.shape
    return torch.bmm(L.mT if transpose else L, Z.reshape(N, O, -1)).reshape(N * O, -1)


def block_sandwich(L: Tensor, K: Tensor) -> Tensor:
    """``Lᵀ K L`` for block-diagonal ``L`` ``(N, O, O)`` and ``K`` ``(..., N·O, N·O)``."""
    N, O, _ = L.shape
    K4 = K.reshape(*K.shape[:-2], N, O, N, O)
    LtK = torch.einsum("nca,...ncmd->...namd", L, K4)
    return torch.einsum("...namd,mdb->...namb", LtK, L).reshape(K.shape)


class FunctionSpaceMAP:
    r"""The MAP and Laplace evidence of the linearized model in function space (small ``N·O``).

    By the representer theorem the MAP is ``δ* = m + S² Jᵀ a`` with ``f* = μ₀ + K a``,
    ``K = J S² Jᵀ = Σ_g σ_g² J_g J_gᵀ`` (``N·O × N·O``) and ``μ₀ = f(X; θ*) + J m``; ``a``
    maximises ``Ψ(a) = log p(y | μ₀ + K a) − ½ aᵀ K a``. Newton's method on ``a`` (Rasmussen
    & Williams 2006, §3.4, for any GLM likelihood with ``Λ = L Lᵀ``),

    .. math:: a \leftarrow b - L (I + L^\top K L)^{-1} L^\top K b,
        \qquad b = \Lambda K a + \nabla_f \log p(y \mid f),

    costs O((N·O)³) per step and never touches ``P``. The evidence
    ``Ψ(a*) − ½ log det(I + Lᵀ K L)`` equals :meth:`~pyro_ntk.LinearizedLaplace.log_marginal_likelihood`
    at the refitted δ*; :meth:`evidence` is differentiable in σ² *through* the refit (one
    Newton step from the converged ``a`` has the implicit derivative ``da*/dσ²``, since
    Newton's map is stationary at its fixed point).
    """

    def __init__(self, problem: LaplaceProblem):
        lin, X = problem.lin, problem.X
        self.problem = problem._replace(X=X.detach().clone(), y=problem.y.clone())  # see matches
        self.m = problem.prior_mean.detach().clone()
        self.lin, self.versions = lin, lin.space.versions()
        self.f0 = lin(X)
        self.shape = self.f0.shape  # (N, O)
        n, G = self.f0.numel(), lin.space.num_groups
        lin.check_dense_memory(
            "LinearizedLaplace (kernel route)",
            f"{G} per-group kernels of shape ({n}, {n})",
            G * n * n,
        )
        eye = torch.eye(G, dtype=lin.dtype, device=lin.device)
        # J_g S² J_gᵀ at σ_g² = 1, by the engine's kernel products: no N·O × P Jacobian
        self.grams = torch.stack([lin.ntk_dense(X, variance=e).detach() for e in eye])
        self.mu0 = self.f0 + lin.jvp(X, self.m)
        self._cross: tuple | None = None  # the last cross_moments: (key, result)

    def vjp(self, u: Tensor) -> Tensor:
        """``Jᵀ u`` at the data: ``u`` ``(N·O,)`` or ``(N·O, k)`` gives ``(P,)`` or ``(P, k)``."""
        N, O = self.shape
        return self.lin.vjp(self.problem.X, u.reshape(N, O, *u.shape[1:]))

    def matches(self, problem: LaplaceProblem) -> bool:
        """Whether this is ``problem``: the same X, y, prior mean m, linearization and θ*."""
        mine = self.problem
        return (
            self.lin is problem.lin
            and self.versions == problem.lin.space.versions()
            and all(
                a.shape == b.shape and a.device == b.device and torch.equal(a, b)
                for a, b in (
                    (mine.X, problem.X), (mine.y, problem.y), (self.m, problem.prior_mean)
                )
            )
        )  # fmt: skip

    def log_variance_bounds(self, per_group: bool = True) -> tuple[Tensor, Tensor]:
        """``log σ²`` bounds: prior logit variances between 1e-12 and 1e6.

        Per group ``(G,)`` bounds on ``σ_g²``, or (``per_group=False``) scalar bounds on one σ²
        shared by every group. The evidence is flat far out in σ² (a group that the data
        ignore, or a prior so wide that the likelihood is saturated); the bounds keep a
        quasi-Newton search there finite.
        """
        scale = self.grams.diagonal(dim1=1, dim2=2).mean(-1)
        if not per_group:
            scale = scale.sum()
        scale = scale.clamp_min(torch.finfo(scale.dtype).tiny).log()
        return math.log(1e-12) - scale, math.log(1e6) - scale

    def kernel(self, var: Tensor) -> Tensor:
        """``K = Σ_g σ_g² J_g J_gᵀ`` ``(N·O, N·O)`` at σ² = ``var``."""
        return torch.einsum("g,gab->ab", var.expand(self.grams.shape[0]), self.grams)

    def _psi(self, K: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        f = self.mu0 + (K @ a).reshape(self.shape)
        p = self.problem
        return p.likelihood.log_prob(f, p.y, p.noise) - 0.5 * a @ K @ a, f

    def _root(self, f: Tensor) -> Tensor:
        """The blocks ``L_n`` ``(N, O, O)`` of ``Λ = L Lᵀ`` at the outputs ``f``."""
        return self.problem.likelihood.hessian_root(f, self.problem.noise)

    def _newton(self, K: Tensor, a: Tensor) -> Tensor:
        f = self.mu0 + (K @ a).reshape(self.shape)
        p = self.problem
        g = p.likelihood.grad(f, p.y, p.noise).reshape(-1)
        L = self._root(f)
        A = torch.eye(len(a), dtype=a.dtype, device=a.device) + block_sandwich(L, K)
        C = torch.linalg.cholesky((A + A.T) / 2)
        b = block_left(L, block_left(L, (K @ a)[:, None], transpose=True))[:, 0] + g
        LtKb = block_left(L, (K @ b)[:, None], transpose=True)
        return b - block_left(L, torch.cholesky_solve(LtKb, C))[:, 0]

    @torch.no_grad()
    def solve(self, var: Tensor, a: Tensor | None = None, max_iter: int = 100) -> Tensor:
        """``a*`` by damped Newton (backtracking on Ψ; Ψ is concave)."""
        K = self.kernel(var)
        if a is None:
            a = torch.zeros(K.shape[0], dtype=K.dtype, device=K.device)
        cur = self._psi(K, a)[0]
        for _ in range(max_iter):
            step, t = self._newton(K, a) - a, 1.0
            # Ψ's rounding level: a full step that changes Ψ by less is still taken (it
            # removes the last digits of the gradient), a worse one is halved
            slack = 1e-12 * (1 + abs(float(cur)))
            while True:
                new = self._psi(K, a + t * step)[0]
                if new >= cur - slack or t < 1e-6:
                    break
                t /= 2
            if new < cur - slack:
                break
            a, cur = a + t * step, new
            if float((t * step).abs().max()) <= 1e-13 * (1 + float(a.abs().max())):
                break
        return a

    def evidence(self, var: Tensor, a: Tensor, temperature: float = 1.0) -> Tensor:
        """Laplace evidence at σ² = ``var``, differentiable in ``var`` (``a`` from :meth:`solve`).

        With a ``temperature`` ``T``, ``var`` is the MAP's prior variance ``σ²/T`` and the
        result is the tempered normaliser ``Ψ(a*)/T − ½ log det(I + Lᵀ K L)``
        (``Ψ/T = log p(y|δ*)/T − ½ (δ* − m)ᵀ D (δ* − m)`` at σ²).
        """
        K = self.kernel(var)
        a = self._newton(K, a.detach())
        psi, f = self._psi(K, a)
        L = self._root(f)
        A = torch.eye(len(a), dtype=a.dtype, device=a.device) + block_sandwich(L, K)
        return psi / temperature - torch.linalg.cholesky((A + A.T) / 2).diagonal().log().sum()

    def delta(self, var: Tensor, a: Tensor) -> Tensor:
        """δ* = m + S² Jᵀ a ``(P,)``."""
        return self.m + self.lin.space.expand_group_values(var) * self.vjp(a.detach())

    def cross_moments(self, X: Tensor, var: Tensor, full_cov: bool) -> CrossMoments:
        r"""The prior moments of ``f`` at test inputs ``X`` ``(M, ...)`` jointly with the data.

        At σ² = ``var`` (``S² = diag σ²``), with ``J_*`` the Jacobian at ``X``:
        ``f(X; θ*) + J_* m`` ``(M, O)``, the cross kernel ``K(X, X_data) = J_* S² Jᵀ``
        ``(M·O, N·O)`` and the prior variances ``diag J_* S² J_*ᵀ`` ``(M, O)`` (``full_cov``:
        the per-example blocks ``(M, O, O)``), all by the linearization's products (a JVP,
        the cross kernel block and the kernel diagonal), never a Jacobian; test inputs are
        taken at most ``N`` (and ``chunk_size``) at a time. Cost: those products, about the
        dense cross kernel's ``O(M·O·N·O)`` per parameter-sized contraction of the engine,
        at no σ² or temperature but ``var``.
        The last result is kept and returned again for the same ``X``, ``var`` and θ* (a
        cross-validation grid predicts the same held-out inputs at every temperature).

        Example:
            >>> from pyro_ntk.laplace.route import LaplaceProblem
            >>> from pyro_ntk.likelihoods import get_likelihood
            >>> from pyro_ntk.linearization import Linearization
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
            >>> lin = Linearization(net.double())
            >>> X, y = torch.randn(6, 2, dtype=torch.float64), torch.arange(6) % 3
            >>> m = torch.zeros(lin.num_params, dtype=torch.float64)
            >>> lik = get_likelihood("example", "categorical")
            >>> fs = FunctionSpaceMAP(LaplaceProblem(lin, lik, None, m, X, y))
            >>> c = fs.cross_moments(torch.randn(4, 2).double(), torch.tensor(1.0).double(), False)
            >>> tuple(c.mean.shape), tuple(c.kernel.shape), tuple(c.prior.shape)
            ((4, 3), (12, 18), (4, 3))
        """
        lin = self.lin
        key = (X.detach().clone(), var.detach().clone(), full_cov, lin.space.versions())
        if self._cross is not None and _same_key(self._cross[0], key):
            return self._cross[1]
        var = var.detach()
        O = self.shape[1]
        size = min(self.shape[0], lin.chunk_size or self.shape[0])
        shift, kernel, prior = [], [], []
        for Xb in X.split(size):
            b = Xb.shape[0]
            shift.append(lin.jvp(Xb, self.m))
            kernel.append(lin.ntk_dense(Xb, self.problem.X, variance=var))
            if full_cov:
                Kb = lin.ntk_dense(Xb, variance=var).reshape(b, O, b, O)
                prior.append(Kb.diagonal(dim1=0, dim2=2).permute(2, 0, 1))
            else:
                prior.append(lin.ntk_diag(Xb, variance=var).reshape(b, O))
        result = CrossMoments(lin(X) + torch.cat(shift), torch.cat(kernel), torch.cat(prior))
        self._cross = (key, result)
        return result
