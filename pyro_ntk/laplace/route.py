r"""The routes of the linearized Laplace: how the posterior's eigen-form is computed.

Every route computes the top eigenpairs of the prior-whitened Fisher at the MAP,

.. math:: S_T F S_T = U \operatorname{diag}(\lambda) U^\top, \qquad
    F = \sum_n J_n^\top \Lambda_n(f_{\mathrm{lin}}(x_n; \delta^*)) J_n, \qquad S_T = S/\sqrt{T},

and the evidence's ``log det(I + S F S / T)``; they differ in what they form:

=========== ============================================ ===================================
route       forms                                        exact when
=========== ============================================ ===================================
``dense``   ``F`` ``(P, P)``                             always (small ``P``)
``kernel``  the Gram ``Lᵀ J S² Jᵀ L`` ``(N·O, N·O)``      always (small ``N·O``, any ``P``)
``lanczos`` ``r`` Fisher products (matrix-free)          ``r`` covers the Fisher's rank
=========== ============================================ ===================================

:class:`LaplaceMethod` picks one, as :class:`~pyro_ntk.NTKImplementation` picks an engine.
"""

from __future__ import annotations

import enum
import math
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from pyro_ntk.laplace.predictive import function_moments
from pyro_ntk.likelihoods import GLMLikelihood
from pyro_ntk.linearization import Linearization
from pyro_ntk.operators import FisherLinearOperator

__all__ = ["LaplaceMethod", "LaplaceProblem", "LaplaceRoute", "choose_method", "map_fisher"]

#: ``auto`` takes the dense route up to this many parameters, then the kernel route up to
#: this many function values ``N·O``, then Lanczos.
AUTO_LIMIT = 2000


class LaplaceMethod(str, enum.Enum):
    """How :class:`~pyro_ntk.LinearizedLaplace` computes its posterior (the routes above)."""

    AUTO = "auto"
    """``dense`` if ``P ≤ 2000``, else ``kernel`` if ``N·O ≤ 2000``, else ``lanczos``."""

    DENSE = "dense"
    """The ``P × P`` Fisher and its eigendecomposition: O(N·O·P² + P³) time, O(P²) memory."""

    KERNEL = "kernel"
    """The ``N·O × N·O`` Gram in function space (exact for any ``P``) and an exact Newton MAP:
    O(P·(N·O)²) for the Jacobian Grams once, O((N·O)³) per Newton step."""

    LANCZOS = "lanczos"
    """``rank`` Lanczos steps on the matrix-free ``S F S``; stochastic Lanczos quadrature for
    the log-determinant: O(P·rank) memory."""


def choose_method(method: LaplaceMethod, P: int, N: int, O: int) -> LaplaceMethod:
    """Resolve ``auto`` for ``P`` parameters and ``N`` examples of ``O`` outputs."""
    if method != LaplaceMethod.AUTO:
        return method
    if P <= AUTO_LIMIT:
        return LaplaceMethod.DENSE
    return LaplaceMethod.KERNEL if N * O <= AUTO_LIMIT else LaplaceMethod.LANCZOS


class LaplaceProblem(NamedTuple):
    """The data of one fit: the linearization, the likelihood and the targets."""

    lin: Linearization
    likelihood: GLMLikelihood
    noise: Tensor | None
    """The Gaussian observation variance (``None`` for the other likelihoods)."""
    prior_mean: Tensor
    """``m``, the prior mean of δ, ``(P,)``."""
    X: Tensor
    y: Tensor


def map_fisher(problem: LaplaceProblem, f_map: Tensor) -> FisherLinearOperator:
    """``F`` with ``Λ`` at the MAP outputs (the linear model's exact Hessian of −log p(y|δ))."""
    return FisherLinearOperator(
        problem.X, network=problem.lin, likelihood=problem.likelihood.kind,
        noise=1.0 if problem.noise is None else problem.noise,
        outputs=f_map,  # Λ(f_lin(X; δ*)), not Λ(f(X; θ*))
    )  # fmt: skip


class LaplaceRoute:
    """One route: the eigen-form of ``S_T F S_T`` and the evidence's log-determinant.

    Built per fit for a :class:`LaplaceProblem`; :meth:`fit_posterior` runs first and keeps
    what :meth:`log_det` and :meth:`function_moments` need.
    """

    method: ClassVar[LaplaceMethod]
    truncated: ClassVar[bool] = False
    """Whether the eigen-form may miss directions of ``F`` (then exact solves take CG)."""

    def __init__(self, problem: LaplaceProblem):
        self.problem = problem

    def fit_posterior(
        self, f_map: Tensor, variance: Tensor, temperature: float, seed: int
    ) -> Tensor:
        """The kept eigenvalues λ ``(r,)`` of ``S_T F S_T``; their directions are :attr:`U`.

        At σ² = ``variance`` (scalar or ``(G,)``) and the outputs ``f_map`` (Λ's point);
        eigenvalues at rounding level (relative ``10·eps``) are dropped.
        """
        U, lam = self._eigenpairs(f_map, variance, temperature, seed)
        self.keep = lam > lam.max().clamp_min(0) * torch.finfo(lam.dtype).eps * 10
        self.lam, self._U = lam[self.keep], None if U is None else U[:, self.keep]
        return self.lam

    @property
    def U(self) -> Tensor:
        """The kept eigenvectors ``(P, r)`` of ``S_T F S_T`` (orthonormal columns).

        A route whose predictive needs no ``P × r`` matrix (``kernel``) forms them here, on
        first use (draws, solves, the dense Σ).
        """
        if self._U is None:
            self._U = self._directions()[:, self.keep]
        return self._U

    def _directions(self) -> Tensor:
        raise NotImplementedError

    def function_moments(
        self, X: Tensor, delta: Tensor, variance: Tensor, temperature: float, full_cov: bool
    ) -> tuple[Tensor, Tensor]:
        """Predictive mean and (co)variance of ``f`` at ``X``: :func:`.function_moments`."""
        S = self.prior_std(variance)
        return function_moments(self.problem.lin, X, delta, S, self.U, self.lam, variance, full_cov)

    def _eigenpairs(
        self, f_map: Tensor, variance: Tensor, temperature: float, seed: int
    ) -> tuple[Tensor | None, Tensor]:
        """``(U, λ)``, or ``(None, λ)`` with ``U`` left to :meth:`_directions`."""
        raise NotImplementedError

    def log_det(self, variance: Tensor, temperature: float, where: str) -> Tensor:
        """``log det(I + S F S / T)`` at σ² = ``variance`` (differentiable in it).

        ``where`` names the public entry in errors (a failed Cholesky).
        """
        raise NotImplementedError

    def prior_std(self, variance: Tensor, temperature: float = 1.0) -> Tensor:
        """``S_T = σ/√T`` per parameter, ``(P,)``."""
        return self.problem.lin.space.expand_group_values(variance).sqrt() / math.sqrt(temperature)
