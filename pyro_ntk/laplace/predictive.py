r"""The linearized Laplace predictive: function moments and the likelihood's mean.

.. math::

    f_*(x) \sim \mathcal N\big(\mu(x), J \Sigma J^\top\big), \qquad
    \mu = f(x;\theta^*) + J\delta^*, \qquad
    J \Sigma J^\top = J S^2 J^\top - (J S U)\,\mathrm{diag}\tfrac{\lambda}{1+\lambda}\,(J S U)^\top,

from one JVP of the ``r + 1`` columns ``[δ*, S U]`` and the exact NTK diagonal ``J S² Jᵀ``
(:meth:`~pyro_ntk.Linearization.ntk_diag`), or the per-example Jacobian for the full
``O × O`` blocks. The mean of ``y`` is the likelihood's probit approximation
(:meth:`~pyro_ntk.likelihoods.GLMLikelihood.probit_mean`), a Monte Carlo average over
posterior draws of δ (one JVP for all draws), or the likelihood's mean at μ alone.
Memory: the products' outputs, ``N·O·(r + 1)`` (``N·O·S`` for ``S`` draws); the
Linearization bounds the rest by its ``chunk_size``. The full blocks form the Jacobian one
chunk of inputs at a time (:meth:`~pyro_ntk.Linearization.chunks`): ``chunk_size·O·P``
(each chunk guarded by :meth:`~pyro_ntk.Linearization.check_dense_memory`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_ntk.likelihoods import GLMLikelihood
from pyro_ntk.linearization import Linearization

__all__ = ["PREDICTIONS", "function_moments", "posterior_moments", "predictive_mean"]

#: The predictive means of ``y`` that :func:`predictive_mean` offers.
PREDICTIONS = ("probit", "mc", "map")


def function_moments(
    lin: Linearization,
    X: Tensor,
    delta: Tensor,
    S: Tensor,
    U: Tensor,
    lam: Tensor,
    variance: Tensor,
    full_cov: bool,
) -> tuple[Tensor, Tensor]:
    r"""Mean ``(N, O)`` and variance ``(N, O)`` (or per-example covariance ``(N, O, O)``).

    ``S`` ``(P,)`` the prior standard deviations at σ² = ``variance``; ``(U, λ)`` the kept
    eigenpairs. With ``full_cov`` the prior blocks :math:`J_n S^2 J_n^\top` come from the
    per-example Jacobian of one chunk of inputs at a time (memory ``chunk_size·O·P``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> lin = Linearization(net.double(), chunk_size=3)
        >>> X, P = torch.randn(5, 2, dtype=torch.float64), lin.num_params
        >>> S, U = torch.ones(P, dtype=torch.float64), torch.eye(P, 2, dtype=torch.float64)
        >>> lam, delta = torch.ones(2, dtype=torch.float64), torch.zeros(P, dtype=torch.float64)
        >>> mean, cov = function_moments(lin, X, delta, S, U, lam, torch.tensor(1.0), True)
        >>> mean.shape, cov.shape
        (torch.Size([5, 2]), torch.Size([5, 2, 2]))
    """
    V = torch.cat([delta[:, None], S[:, None] * U], dim=1)  # (P, 1 + r)
    JV = lin.jvp(X, V)  # [δ*, S U] → [J δ*, J S U] in one JVP
    W = JV[..., 1:]  # (N, O, r)
    if full_cov:
        prior = _prior_blocks(lin, X, S.square())
    else:
        prior = lin.ntk_diag(X, variance).reshape(W.shape[:2])
    return lin(X) + JV[..., 0], posterior_moments(prior, W, lam)


def posterior_moments(prior: Tensor, W: Tensor, lam: Tensor) -> Tensor:
    r"""``prior − W diag(λ/(1+λ)) Wᵀ`` per example: the posterior's (co)variances of ``f``.

    ``prior`` ``(N, O)`` (variances, result clamped at 0) or ``(N, O, O)`` (blocks);
    ``W = J S U`` ``(N, O, r)``, however it was computed (one JVP, or the ``kernel`` route's
    cross kernels). Cost ``O(N·O·r)`` (``O(N·O²·r)`` for blocks).
    """
    w = lam / (1 + lam)
    if prior.dim() == 3:
        return prior - torch.einsum("nor,nqr->noq", W * w, W)
    return (prior - (W.square() * w).sum(-1)).clamp_min(0)


def _prior_blocks(lin: Linearization, X: Tensor, scale: Tensor) -> Tensor:
    """``J_n diag(scale) J_nᵀ`` per example, ``(N, O, O)``, one chunk of inputs at a time."""
    blocks = []
    for rows in lin.chunks(X.shape[0]):
        J = lin.jacobian(X[rows])  # (n, O, P): chunk_size·O·P at most
        blocks.append(torch.einsum("nop,nqp->noq", J * scale, J))
    return torch.cat(blocks)


def predictive_mean(
    likelihood: GLMLikelihood,
    lin: Linearization,
    X: Tensor,
    delta: Tensor,
    method: str,
    moments=None,
    draws: Tensor | None = None,
) -> Tensor:
    """``E[y]`` at ``X``: ``(N, O)`` (categorical), else ``(N,)`` for ``O = 1`` or ``(N, O)``.

    ``method="probit"`` needs ``moments`` ``(μ, v)`` from :func:`function_moments`;
    ``"mc"`` the draws of δ ``(P, S)``; ``"map"`` only δ*.
    """
    if method == "probit":
        mu, var = moments
        out = likelihood.probit_mean(mu, var)
    elif method == "map":
        out = likelihood.mean(lin(X) + lin.jvp(X, delta))
    else:
        f = lin(X).unsqueeze(-1) + lin.jvp(X, draws)  # (N, O, S)
        out = likelihood.mean(f, dim=1).mean(-1)
    if likelihood.kind == "categorical" or out.shape[-1] != 1:
        return out
    return out[..., 0]
