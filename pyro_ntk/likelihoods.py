r"""The GLM likelihoods of a linearized network, in closed form in the network's output ``f``.

For a likelihood :math:`p(y \mid f)` with natural parameter ``f`` (one row ``f_n`` of
``O`` outputs per example), every method works on a chunk of ``n`` examples:

.. math::

    \sum_n \log p(y_n \mid f_n), \qquad
    \nabla_f \log p(y \mid f), \qquad
    \Lambda_n = -\nabla_{f_n}^2 \log p(y_n \mid f_n) = L_n L_n^\top, \qquad
    \mathrm{KL}\big(p(\cdot \mid f^*) \,\|\, p(\cdot \mid f)\big),

=============== ===================== ==========================================
likelihood      ``f`` is              ``Λ_n`` (``O × O``)
=============== ===================== ==========================================
``gaussian``    the mean              ``I / s²`` (``s²`` the ``noise``)
``bernoulli``   logits (per output)   ``diag(p (1 − p))``, ``p = sigmoid(f)``
``categorical`` logits over ``O``     ``diag(p) − p pᵀ``, ``p = softmax(f)``
``poisson``     log-rates             ``diag(exp f)``
=============== ===================== ==========================================

For these exponential families ``Λ`` does not depend on ``y``, so the Fisher and the
generalized Gauss-Newton matrix coincide, and the KL's Hessian in ``f`` at ``f = f*`` is
``Λ(f*)``. One object per likelihood (:func:`get_likelihood`), shared by the Fisher
products (:class:`~pyro_ntk.FisherLinearOperator`) and the linearized Laplace
(:class:`~pyro_ntk.LinearizedLaplace`). The Gaussian's ``noise`` is a keyword of each
method (a positive tensor broadcastable to ``f``); the other likelihoods ignore it.

Example:
    >>> lik = get_likelihood("example", "categorical")
    >>> f = torch.tensor([[0.0, 1.0, -1.0]])
    >>> Lam = torch.einsum("nab,ncb->nac", lik.hessian_root(f), lik.hessian_root(f))
    >>> U = torch.eye(3).expand(1, 3, 3)
    >>> torch.allclose(Lam, lik.hessian_product(f, U))
    True
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor, nn

from pyro_ntk._checks import check_choice, check_tensor

__all__ = [
    "Bernoulli",
    "Categorical",
    "GLMLikelihood",
    "Gaussian",
    "Likelihood",
    "Poisson",
    "check_targets",
    "get_likelihood",
]


class Likelihood(str, enum.Enum):
    """The observation model ``p(y | f)`` of a network's outputs ``f``."""

    GAUSSIAN = "gaussian"
    """``f`` the mean, ``y`` real, variance ``noise``."""

    BERNOULLI = "bernoulli"
    """``f`` a logit per output, ``y`` in ``[0, 1]`` (labels or probabilities)."""

    CATEGORICAL = "categorical"
    """``f`` the ``O ≥ 2`` logits of one class label ``y`` in ``[0, O)``."""

    POISSON = "poisson"
    """``f`` a log-rate per output, ``y`` a non-negative integer count."""


class GLMLikelihood:
    """One GLM likelihood: log-density, gradient, Hessian root and product, KL, targets.

    Shapes: outputs ``f`` ``(n, O)``; targets ``y`` as returned by :meth:`check_targets`;
    ``noise`` (Gaussian only) broadcastable to ``(n, O)``. Cost: ``O(n·O)`` per call
    (``O(n·O²)`` for the categorical Hessian root and product).
    """

    kind: Likelihood

    def log_prob(self, f: Tensor, y: Tensor, noise: Tensor | None = None) -> Tensor:
        """``Σ_n log p(y_n | f_n)``, a scalar (differentiable in ``f``)."""
        raise NotImplementedError

    def grad(self, f: Tensor, y: Tensor, noise: Tensor | None = None) -> Tensor:
        """``∂ Σ_n log p(y_n | f_n) / ∂f``, shape ``(n, O)``."""
        raise NotImplementedError

    def hessian_root(self, f: Tensor, noise: Tensor | None = None) -> Tensor:
        """``L_n`` with ``Λ_n = L_n L_nᵀ``, shape ``(n, O, O)``."""
        raise NotImplementedError

    def hessian_product(self, f: Tensor, U: Tensor, noise: Tensor | None = None) -> Tensor:
        """``Λ_n U_n`` for ``U`` ``(n, O, k)``, shape ``(n, O, k)``."""
        raise NotImplementedError

    def kl(self, f_star: Tensor, f: Tensor, noise: Tensor | None = None) -> Tensor:
        """``Σ_n KL(p(·|f*_n) ‖ p(·|f_n))``, a scalar; ``f*`` fixed, differentiable in ``f``."""
        raise NotImplementedError

    def mean(self, f: Tensor, dim: int = -1) -> Tensor:
        """``E[y | f]`` (``dim``: the output dimension of ``f``)."""
        raise NotImplementedError

    def probit_mean(self, mu: Tensor, var: Tensor) -> Tensor:
        """``E[y]`` for ``f ~ N(mu, diag var)``: exact where closed, else the probit approximation."""
        raise NotImplementedError

    def check_outputs(self, where: str, O: int) -> None:
        """Refuse a number of outputs per example that the likelihood cannot use."""

    def check_targets(self, where: str, y: object, N: int, O: int, dtype: torch.dtype) -> Tensor:
        """Validate targets for ``N`` examples of ``O`` outputs; return them as the methods use them.

        Categorical: integer labels ``(N,)`` in ``[0, O)``. Bernoulli: values in ``[0, 1]``
        (labels or probabilities), ``(N,)`` for ``O = 1`` or ``(N, O)``. Poisson:
        non-negative integer counts. Gaussian: finite reals. Errors name what was given.
        """
        y = check_tensor(where, "y", y)
        shapes = [(N,), (N, 1)] if O == 1 else [(N, O)]
        self._check_shape(where, y, shapes, N, O)
        y = y.to(dtype)
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{where}: y contains NaN or infinite values.")
        self._check_range(where, y)
        return y

    def _check_shape(self, where: str, y: Tensor, shapes: list, N: int, O: int) -> None:
        if tuple(y.shape) not in shapes:
            raise ValueError(
                f"{where}: y has shape {tuple(y.shape)}; expected one of {shapes} for N = {N} "
                f"inputs and O = {O} outputs with the {self.kind.value} likelihood."
            )

    def _check_range(self, where: str, y: Tensor) -> None:
        """Further checks of finite floating targets."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_PROBIT = math.pi / 8


class Gaussian(GLMLikelihood):
    r"""``y ~ N(f, s²)``: ``Λ = I/s²``, ``KL = (f − f*)² / (2 s²)``."""

    kind = Likelihood.GAUSSIAN

    def log_prob(self, f, y, noise=None):
        """Σ −(y − f)²/(2s²) − ½ log(2π s²)."""
        y = y.reshape(f.shape)
        return (-0.5 * ((y - f).square() / noise + torch.log(2 * math.pi * noise))).sum()

    def grad(self, f, y, noise=None):
        """(y − f) / s²."""
        return (y.reshape(f.shape) - f) / noise

    def hessian_root(self, f, noise=None):
        """diag(1/s)."""
        return torch.diag_embed((1 / noise).expand(f.shape).sqrt())

    def hessian_product(self, f, U, noise=None):
        """U / s²."""
        return U / noise.unsqueeze(-1)

    def kl(self, f_star, f, noise=None):
        """Σ (f − f*)² / (2 s²)."""
        return ((f - f_star).square() / (2 * noise)).sum()

    def mean(self, f, dim=-1):
        """F."""
        return f

    def probit_mean(self, mu, var):
        """μ (exact)."""
        return mu


class Bernoulli(GLMLikelihood):
    r"""``y ~ Bernoulli(sigmoid f)`` per output: ``Λ = diag(p (1 − p))``."""

    kind = Likelihood.BERNOULLI

    def log_prob(self, f, y, noise=None):
        """Σ y log σ(f) + (1 − y) log σ(−f)."""
        y = y.reshape(f.shape)
        return -nn.functional.binary_cross_entropy_with_logits(f, y, reduction="sum")

    def grad(self, f, y, noise=None):
        """Y − σ(f)."""
        return y.reshape(f.shape) - torch.sigmoid(f)

    def hessian_root(self, f, noise=None):
        """diag(√(σ(f) σ(−f)))."""
        return torch.diag_embed((torch.sigmoid(f) * torch.sigmoid(-f)).sqrt())

    def hessian_product(self, f, U, noise=None):
        """P (1 − p) U, p = σ(f)."""
        p = torch.sigmoid(f)
        return (p * (1 - p)).unsqueeze(-1) * U

    def kl(self, f_star, f, noise=None):
        """Σ p* (log σ(f*) − log σ(f)) + (1 − p*) (log σ(−f*) − log σ(−f))."""
        p, ls = torch.sigmoid(f_star), nn.functional.logsigmoid
        return (p * (ls(f_star) - ls(f)) + (1 - p) * (ls(-f_star) - ls(-f))).sum()

    def mean(self, f, dim=-1):
        """σ(f)."""
        return torch.sigmoid(f)

    def probit_mean(self, mu, var):
        """The probit approximation σ(μ / √(1 + π v / 8))."""
        return torch.sigmoid(mu / (1 + _PROBIT * var).sqrt())

    def _check_range(self, where, y):
        lo, hi = float(y.min()), float(y.max())
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{where}: Bernoulli targets y must be labels or probabilities in [0, 1], got "
                f"values in [{lo:.4g}, {hi:.4g}]."
            )


class Categorical(GLMLikelihood):
    r"""``y ~ Categorical(softmax f)``: ``Λ = diag p − p pᵀ``, ``L = diag √p − p √pᵀ``."""

    kind = Likelihood.CATEGORICAL

    def log_prob(self, f, y, noise=None):
        """Σ_n log softmax(f_n)[y_n]."""
        return torch.log_softmax(f, -1).gather(-1, y.unsqueeze(-1)).sum()

    def grad(self, f, y, noise=None):
        """onehot(y) − softmax(f)."""
        onehot = nn.functional.one_hot(y, f.shape[-1]).to(f.dtype)
        return onehot - torch.softmax(f, -1)

    def hessian_root(self, f, noise=None):
        """Diag √p − p √pᵀ, p = softmax(f)."""
        p = torch.softmax(f, -1)
        # (diag √p − p √pᵀ)(diag √p − √p pᵀ) = diag p − p pᵀ since Σ p = 1
        return torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)

    def hessian_product(self, f, U, noise=None):
        """(diag p − p pᵀ) U, p = softmax(f)."""
        p = torch.softmax(f, dim=-1).unsqueeze(-1)
        return p * U - p * (p * U).sum(1, keepdim=True)

    def kl(self, f_star, f, noise=None):
        """Σ_n Σ_k p*_k (log p*_k − log p_k)."""
        logp = torch.log_softmax(f_star, dim=-1)
        return (logp.exp() * (logp - torch.log_softmax(f, dim=-1))).sum()

    def mean(self, f, dim=-1):
        """softmax(f) along ``dim``."""
        return torch.softmax(f, dim)

    def probit_mean(self, mu, var):
        """The extended probit ``softmax_k(μ_k / √(1 + π v_k / 8))``."""
        return torch.softmax(mu / (1 + _PROBIT * var).sqrt(), -1)

    def check_outputs(self, where, O):
        """Refuse ``O < 2`` logits."""
        if O < 2:
            raise ValueError(
                f"{where}: the categorical likelihood needs O >= 2 logits, got O = {O}."
            )

    def check_targets(self, where, y, N, O, dtype):
        """Integer class labels ``(N,)`` in ``[0, O)``, as ``torch.long``."""
        y = check_tensor(where, "y", y)
        self._check_shape(where, y, [(N,)], N, O)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(
                f"{where}: categorical labels y have dtype {y.dtype}; expected integer class "
                f"labels in [0, {O}) (e.g. torch.long)."
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= O:
            raise ValueError(
                f"{where}: class labels y range over [{lo}, {hi}], outside [0, {O - 1}] for "
                f"a network with O = {O} logits."
            )
        return y.long()


class Poisson(GLMLikelihood):
    r"""``y ~ Poisson(exp f)``: ``Λ = diag(exp f)``; the predictive mean ``exp(μ + v/2)`` is exact."""

    kind = Likelihood.POISSON

    def log_prob(self, f, y, noise=None):
        """Σ y f − exp f − log y!."""
        y = y.reshape(f.shape)
        return (y * f - f.exp() - torch.lgamma(y + 1)).sum()

    def grad(self, f, y, noise=None):
        """Y − exp f."""
        return y.reshape(f.shape) - f.exp()

    def hessian_root(self, f, noise=None):
        """diag(exp(f/2))."""
        return torch.diag_embed(f.exp().sqrt())

    def hessian_product(self, f, U, noise=None):
        """exp(f) U."""
        return torch.exp(f).unsqueeze(-1) * U

    def kl(self, f_star, f, noise=None):
        """Σ exp(f*) (f* − f) − exp(f*) + exp(f)."""
        rate = torch.exp(f_star)
        return (rate * (f_star - f) - rate + torch.exp(f)).sum()

    def mean(self, f, dim=-1):
        """Exp f."""
        return f.exp()

    def probit_mean(self, mu, var):
        """exp(μ + v/2) (exact)."""
        return (mu + var / 2).exp()

    def _check_range(self, where, y):
        lo = float(y.min())
        if lo < 0:
            raise ValueError(
                f"{where}: Poisson counts y must be non-negative, got minimum {lo:.4g}."
            )
        if not bool((y == y.round()).all()):
            raise ValueError(f"{where}: Poisson counts y must be integers, got fractional values.")


_LIKELIHOODS: dict[Likelihood, GLMLikelihood] = {
    Likelihood.GAUSSIAN: Gaussian(),
    Likelihood.BERNOULLI: Bernoulli(),
    Likelihood.CATEGORICAL: Categorical(),
    Likelihood.POISSON: Poisson(),
}


def get_likelihood(where: str, likelihood: str | Likelihood) -> GLMLikelihood:
    """The likelihood object of a :class:`Likelihood` or its string value.

    Raises ``ValueError`` naming ``where`` and the valid choices otherwise.

    Example:
        >>> get_likelihood("example", "poisson")
        Poisson()
    """
    check_choice(where, "likelihood", likelihood, [k.value for k in Likelihood])
    return _LIKELIHOODS[Likelihood(likelihood)]


def check_targets(
    where: str, likelihood: str | Likelihood, y: object, N: int, O: int, dtype: torch.dtype
) -> Tensor:
    """Targets ``y`` of ``N`` examples with ``O`` outputs, validated for ``likelihood``.

    See :meth:`GLMLikelihood.check_targets`.
    """
    return get_likelihood(where, likelihood).check_targets(where, y, N, O, dtype)
