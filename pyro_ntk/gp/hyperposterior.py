r"""The kernel variance and the noise integrated out on a grid: weights and predictive mixture.

With few targets the marginal likelihood does not pin down ``σ²`` and ``s²``; a point
estimate then over-fits (the noise collapses, the predictive is over-confident). Integrating
them out instead, under log-normal priors,

.. math::

    \log\sigma^2 \sim \mathcal N(\log c_\sigma, w^2),\quad
    \log s^2 \sim \mathcal N(\log c_s, w^2),\qquad
    w_g \propto \mathcal N\big(r;\,0,\,\sigma_g^2 K + (s_g^2 + \epsilon) I\big)\,
    p(\log\sigma_g^2)\,p(\log s_g^2),

on a product grid of ``points × points`` nodes uniform in ``(log σ², log s²)``, gives the
predictive mixture

.. math::

    p(f_* \mid y) = \sum_g w_g\,\mathcal N(\mu_g, v_g),\qquad
    \mu_g = \sigma_g^2 C\,\frac{\tilde r}{\sigma_g^2\lambda + d_g},\qquad
    v_g = \sigma_g^2 k_{**} - \sigma_g^4 \sum_i \frac{C_{\cdot i}^2}{\sigma_g^2\lambda_i + d_g},

with ``K = Q diag(λ) Qᵀ`` (:class:`~pyro_ntk.gp.KernelSpectrum`), ``r̃ = Qᵀ r``,
``C = K_{*X} Q`` and ``d_g = s_g² + ε``. The grid is laid twice: over ``± span·w`` about
the prior medians, then, with as many nodes, over the box that holds the posterior mass of
the first (so that a posterior narrower than the prior is resolved whatever ``N``). Nodes are
dropped from the smallest weight up while the dropped mass stays below
:data:`DROPPED_MASS` (recorded in :attr:`GridPosterior.dropped`, the bound on the relative
error of every mixture density), and a posterior with more than :data:`EDGE_MASS` of its
weight on the grid's border warns (widen ``span`` or ``width``).

Cost: the eigendecomposition (shared with the spectral log-density), ``O(points²·n)`` for
the weights, one ``(M·O, n) × (n, n)`` product for ``C`` and ``O(M·O·n)`` per kept node.

Example:
    >>> J = torch.randn(8, 3, dtype=torch.float64)
    >>> spec = KernelSpectrum.of(J @ J.T)
    >>> r = J @ torch.randn(3, dtype=torch.float64) + 0.1 * torch.randn(8, dtype=torch.float64)
    >>> post = grid_posterior(spec, r, center_variance=1.0, center_noise=0.1, width=2.0)
    >>> bool(torch.isclose(post.weights.sum(), torch.tensor(1.0, dtype=torch.float64)))
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from pyro_ntk.gp.spectral import KernelSpectrum, spectral_log_prob

__all__ = [
    "DROPPED_MASS",
    "EDGE_MASS",
    "GridPosterior",
    "drop_negligible",
    "grid_posterior",
    "mixture_moments",
]

DROPPED_MASS = 1e-9
"""Posterior mass that may be dropped with the smallest-weight nodes (relative error bound)."""

EDGE_MASS = 1e-3
"""Posterior mass on the grid's border above which :func:`grid_posterior` warns."""


@dataclass
class GridPosterior:
    r"""The posterior over ``(σ², s²)`` on the kept grid nodes.

    Attributes:
        variance: σ² of each kept node ``(g,)``.
        noise: s² of each kept node ``(g,)``.
        weights: normalized posterior weights ``(g,)`` (sum 1).
        log_evidence: ``log ∫∫ p(y | σ², s²) p(σ², s²)``, the quadrature of the marginal
            likelihood over the prior (a model-comparison score with the hyperparameters
            integrated out).
        dropped: the posterior mass of the nodes dropped (``≤`` :data:`DROPPED_MASS`).
        edge: the posterior mass on the grid's border (before dropping).
    """

    variance: Tensor
    noise: Tensor
    weights: Tensor
    log_evidence: Tensor
    dropped: float
    edge: float


def grid_posterior(
    spectrum: KernelSpectrum,
    residual: Tensor,
    *,
    center_variance: float,
    center_noise: float,
    width: float,
    span: float = 4.0,
    points: int = 61,
    jitter: float = 0.0,
    where: str = "grid_posterior",
) -> GridPosterior:
    r"""Posterior weights of ``(σ², s²)`` on the log grid, given ``residual = y − m(X)`` ``(n,)``.

    Args:
        spectrum: ``K(X, X)`` at σ² = 1, decomposed.
        residual: ``r`` ``(n,)`` (``n = N·O``, rows ``n·O + o``).
        center_variance: the prior median ``c_σ`` of σ² (> 0).
        center_noise: the prior median ``c_s`` of s² (> 0).
        width: ``w``, the prior standard deviation of ``log σ²`` and ``log s²`` (> 0).
        span: the grid reaches ``± span·w`` about the medians.
        points: nodes per axis (``points²`` in all).
        jitter: ε added to s² on the diagonal.
        where: the caller, first in the warning.

    Returns:
        :class:`GridPosterior`. Cost ``O(n²)`` for ``r̃`` then ``O(points²·n)``.
    """
    lam = spectrum.lam
    proj_sq = spectrum.project_sq(residual.detach().reshape(1, -1))[0]
    center = (math.log(center_variance), math.log(center_noise))

    def evaluate(lv: Tensor, ls: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        LV, LS = torch.meshgrid(lv, ls, indexing="ij")  # (points, points)
        log_lik = spectral_log_prob(proj_sq, lam, LV.exp(), LS.exp() + jitter)
        log_prior = -0.5 * (((LV - center[0]) / width) ** 2 + ((LS - center[1]) / width) ** 2)
        log_joint = log_lik + log_prior - math.log(2 * math.pi * width**2)
        return LV, LS, log_joint, torch.softmax(log_joint.reshape(-1), 0).reshape(LV.shape)

    axis = torch.linspace(-span * width, span * width, points, dtype=lam.dtype, device=lam.device)
    LV, LS, log_joint, weights = evaluate(center[0] + axis, center[1] + axis)
    border = torch.ones_like(weights, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    edge = float(weights[border].sum())
    if edge > EDGE_MASS:
        warnings.warn(
            f"{where}: {edge:.2%} of the posterior weight of (σ², s²) lies on the border of "
            f"the grid (σ² in [{float(LV.min().exp()):.3g}, {float(LV.max().exp()):.3g}], s² in "
            f"[{float(LS.min().exp()):.3g}, {float(LS.max().exp()):.3g}]): the prior is too "
            "narrow for these data or the grid too short. Give a larger width or span.",
            NumericalWarning,
            stacklevel=3,
        )
    # second pass: the same number of nodes over the box holding the mass, one node beyond it
    held = weights > DROPPED_MASS * 1e-3
    lv, ls = [], []
    for dim, values in ((1, LV[:, 0]), (0, LS[0, :])):
        idx = torch.nonzero(held.any(dim)).reshape(-1)
        lo, hi = max(int(idx.min()) - 1, 0), min(int(idx.max()) + 1, points - 1)
        (lv if dim == 1 else ls).append(torch.linspace(
            float(values[lo]), float(values[hi]), points, dtype=lam.dtype, device=lam.device
        ))  # fmt: skip
    LV, LS, log_joint, weights = evaluate(lv[0], ls[0])
    cell = float((lv[0][1] - lv[0][0]) * (ls[0][1] - ls[0][0]))
    log_evidence = torch.logsumexp(log_joint.reshape(-1), 0) + math.log(cell)
    variance, noise = LV.exp(), LS.exp()
    keep, w, mass = drop_negligible(weights.reshape(-1))
    return GridPosterior(
        variance.reshape(-1)[keep], noise.reshape(-1)[keep], w, log_evidence, mass, edge
    )


def drop_negligible(weights: Tensor) -> tuple[Tensor, Tensor, float]:
    """Drop the smallest normalized ``weights (g,)`` while their sum stays ``≤`` :data:`DROPPED_MASS`.

    Returns ``(keep, w, mass)``: the kept indices, their weights renormalized to sum 1, and
    the mass dropped (the bound on the relative error of every mixture density). Cost: one
    sort of ``g`` weights.

    Example:
        >>> keep, w, mass = drop_negligible(torch.tensor([0.5, 1e-12, 0.5], dtype=torch.float64))
        >>> sorted(keep.tolist()), w.tolist(), mass
        ([0, 2], [0.5, 0.5], 1e-12)
    """
    order = torch.argsort(weights)
    dropped = torch.cumsum(weights[order], 0) <= DROPPED_MASS
    keep = order[~dropped]
    return keep, weights[keep] / weights[keep].sum(), float(weights[order[dropped]].sum())


def mixture_moments(
    spectrum: KernelSpectrum,
    residual: Tensor,
    cross: Tensor,
    prior_diag: Tensor,
    post: GridPosterior,
    *,
    noiseless: bool,
    jitter: float = 0.0,
) -> tuple[Tensor, Tensor]:
    r"""Each kept node's posterior mean shift and variance at the test rows.

    Args:
        spectrum: ``K(X, X)`` at σ² = 1, decomposed (``n × n``).
        residual: ``r = y − m(X)`` ``(n,)``.
        cross: ``K(X_*, X)`` at σ² = 1, ``(m, n)``.
        prior_diag: ``diag K(X_*, X_*)`` at σ² = 1, ``(m,)``.
        post: the grid posterior.
        noiseless: ``False`` adds each node's s² (the predictive of a new observation).
        jitter: ε on the diagonal of the training kernel.

    Returns:
        ``(shift, var)``, both ``(g, m)``: ``μ_g − m_*`` and ``v_g`` for the kept nodes.
        Cost ``O(m·n²)`` for ``C = K_{*X} Q``, then ``O(g·m·n)``.
    """
    C = cross @ spectrum.Q  # (m, n)
    proj = residual.detach().reshape(-1) @ spectrum.Q  # r̃ (n,)
    v = post.variance[:, None]  # (g, 1)
    den = v * spectrum.lam + (post.noise + jitter)[:, None]  # (g, n)
    shift = v * ((proj / den) @ C.T)  # (g, m)
    explained = (v**2) * ((1.0 / den) @ C.square().T)  # (g, m)
    var = (v * prior_diag - explained).clamp_min(0.0)
    if not noiseless:
        var = var + post.noise[:, None]
    return shift, var
