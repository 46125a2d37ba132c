r"""The GP posterior at test inputs: mean, marginal variances, full covariance, pathwise draws.

.. math::

    \mu_* = m(X_*) + \sigma^2 K_{*X} A^{-1} (y - m(X)),\qquad
    \Sigma_* = \sigma^2 K_{**} - \sigma^4 K_{*X} A^{-1} K_{X*},\qquad
    A = \sigma^2 K_{XX} + d\, I.

* :func:`cholesky_posterior`: exact, from the factor ``L L^\top = A``.
* :func:`pathwise_posterior`: matrix-free, the mean by one solve and the covariance from
  pathwise draws :math:`f_{\mathrm{post}} = f_{\mathrm{prior}} + \sigma^2 K_{\cdot X}
  A^{-1}(y - m - f_{\mathrm{prior}}(X) - \varepsilon)`, all solved together.
* :func:`explained_covariance` (also on row-sharded data, with an all-reduce),
  :func:`conditional_covariance` and :func:`add_noise` finish both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pyro_ntk.linearization import Linearization

__all__ = [
    "add_noise",
    "cholesky_posterior",
    "conditional_covariance",
    "explained_covariance",
    "pathwise_covariance",
    "pathwise_posterior",
]


def explained_covariance(
    left: Tensor,
    right: Tensor,
    *,
    full_cov: bool,
    reduce: Callable[[Tensor], Tensor] | None = None,
    rows: slice | None = None,
) -> Tensor:
    r"""``Lᵀ R`` (``full_cov``) or its diagonal: the part of the prior the data explain.

    .. math:: L^\top R = K_{*X} A^{-1} K_{X*}

    with ``L = R = L_A^{-1} K_{X*}`` (Cholesky) or ``L = K_{X*}``, ``R = A^{-1} K_{X*}``.

    Args:
        left: ``(n, M)`` (this rank's rows when sharded).
        right: ``(n, M)``, likewise.
        full_cov: the ``(M, M)`` matrix instead of its diagonal ``(M,)``.
        reduce: sums partial products over row shards (an all-reduce, so every rank calls
            it); ``None``: one process.
        rows: the block of the ``M`` columns to keep (``None``: all).

    Returns:
        ``(m, m)`` or ``(m,)``. Cost ``O(n M²)`` (full) or ``O(n M)``.
    """
    explained = left.mT @ right if full_cov else (left * right).sum(0)
    if reduce is not None:
        explained = reduce(explained)
    if rows is not None:
        explained = explained[rows, rows] if full_cov else explained[rows]
    return explained


def conditional_covariance(prior: Tensor, explained: Tensor, *, full_cov: bool) -> Tensor:
    r"""``Σ_* = K_** − K_*X A⁻¹ K_X*``, or the marginal variances clamped at 0.

    Args:
        prior: ``K_**`` ``(m, m)`` or its diagonal ``(m,)``.
        explained: :func:`explained_covariance` of the same shape.
        full_cov: whether these are full covariances.

    Example:
        >>> W = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> explained = explained_covariance(W, W, full_cov=False)
        >>> conditional_covariance(torch.tensor([2.0, 5.0]), explained, full_cov=False)
        tensor([1., 1.])
    """
    if full_cov:
        return prior - explained
    return (prior - explained).clamp_min(0.0)


def add_noise(cov: Tensor, noise: Tensor, *, full_cov: bool) -> Tensor:
    """``Σ + s² I`` (``full_cov``) or ``var + s²``: the predictive of a new observation."""
    if full_cov:
        return cov + noise * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return cov + noise


def cholesky_posterior(
    lin: Linearization,
    X: Tensor,
    Xnew: Tensor,
    residual: Tensor,
    L: Tensor,
    variance: Tensor,
    *,
    full_cov: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Exact posterior from the factor ``L Lᵀ = A``.

    .. math:: \alpha = A^{-1} r,\quad \mu_* - m_* = \sigma^2 K_{*X} \alpha,\quad
        W = L^{-1} \sigma^2 K_{X*},\quad \Sigma_* = \sigma^2 K_{**} - W^\top W

    Args:
        lin: the linearization.
        X: training inputs ``(N, ...)``.
        Xnew: test inputs ``(M, ...)``.
        residual: ``y − m(X)`` as ``(N·O, 1)``.
        L: lower factor of ``A`` ``(N·O, N·O)``.
        variance: σ², scalar or ``(G,)``.
        full_cov: the full ``(M·O, M·O)`` covariance instead of the variances.

    Returns:
        ``(mean shift (M·O,), covariance or variances, α (N·O, 1))``. Cost: one dense
        cross-kernel ``(N·O, M·O)``, a triangular solve ``O((N·O)² M·O)``.
    """
    Kxs = lin.ntk_dense(X, Xnew, variance=variance)  # (N·O, M·O)
    alpha = torch.cholesky_solve(residual, L)
    shift = (Kxs.T @ alpha).squeeze(-1)
    W = torch.linalg.solve_triangular(L, Kxs, upper=False)
    if full_cov:
        prior = lin.ntk_dense(Xnew, variance=variance)
    else:
        prior = lin.ntk_diag(Xnew, variance=variance)
    explained = explained_covariance(W, W, full_cov=full_cov)
    return shift, conditional_covariance(prior, explained, full_cov=full_cov), alpha


def pathwise_posterior(
    lin: Linearization,
    X: Tensor,
    Xnew: Tensor,
    residual: Tensor,
    variance: Tensor,
    layer: bool,
    diag: Tensor,
    solve: Callable[[Tensor], Tensor],
    num_samples: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    r"""Matrix-free posterior mean and ``S`` pathwise draws' deviations from it.

    .. math::

        f_{\mathrm{prior}} = J\,(\sigma \odot z),\ z \sim \mathcal N(0, I_P),\quad
        f_{\mathrm{post}}(X_*) - \mu_* = f_{\mathrm{prior}}(X_*) + \sigma^2 K_{*X}
        A^{-1}\big(-f_{\mathrm{prior}}(X) - \sqrt{d}\,\xi\big)

    Every draw is one JVP over ``[X; X_*]``; the mean's and the draws' right-hand sides
    are solved together (``solve``, ``1 + S`` columns). The draws use a private generator
    seeded by ``seed`` (deterministic).

    Args:
        lin: the linearization.
        X: training inputs ``(N, ...)``.
        Xnew: test inputs ``(M, ...)``.
        residual: ``y − m(X)`` as ``(N·O, 1)``.
        variance: σ², scalar or ``(G,)``.
        layer: whether ``variance`` holds one value per parameter group.
        diag: ``d = s² + ε``.
        solve: ``B ↦ A⁻¹ B`` on ``(N·O, 1 + S)``.
        num_samples: ``S``.
        seed: the draws' seed.

    Returns:
        ``(mean shift (M·O,), deviations (M·O, S))``; :func:`pathwise_covariance` turns
        the deviations into variances (relative standard deviation ``√(2/S)``) or a
        covariance.
    """
    N, M = X.shape[0], Xnew.shape[0]
    n = residual.shape[0]
    O = n // N
    S = num_samples
    gen = torch.Generator(device=lin.device).manual_seed(seed)
    opts = dict(dtype=lin.dtype, device=lin.device, generator=gen)
    sd = variance.sqrt()
    sd = sd[lin.space.group_index()] if layer else sd
    z = torch.randn(lin.num_params, S, **opts) * (sd if sd.dim() == 0 else sd[:, None])
    prior = lin.jvp(torch.cat([X, Xnew]), z).reshape((N + M) * O, S)
    eps = diag.sqrt() * torch.randn(n, S, **opts)
    rhs = torch.cat([residual, -(prior[:n] + eps)], dim=1)  # (N·O, 1 + S)
    sol = solve(rhs)
    KS = lin.ntk_mvm(Xnew, X, sol, variance=variance)  # (M·O, 1 + S)
    return KS[:, 0], prior[n:] + KS[:, 1:]


def pathwise_covariance(deviations: Tensor, *, full_cov: bool) -> Tensor:
    """``D Dᵀ / S`` (``full_cov``) or the mean squares of the rows of ``D`` ``(m, S)``."""
    if full_cov:
        return deviations @ deviations.T / deviations.shape[1]
    return deviations.square().mean(1)
