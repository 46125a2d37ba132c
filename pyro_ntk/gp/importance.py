r"""Per-layer variances and the noise integrated out by importance sampling.

With one kernel variance a product grid over ``(log σ², log s²)`` is exact enough
(:mod:`pyro_ntk.gp.hyperposterior`); with one ``σ_g²`` per layer the grid would need
``points^{G+1}`` nodes. The posterior over ``θ = (log σ_1², …, log σ_G², log s²)``

.. math::

    p(\theta \mid r) \propto \mathcal N\Big(r;\ 0,\ \sum_g e^{\theta_g} K_g
    + (e^{\theta_s} + \epsilon) I\Big)\ \prod_i \mathcal N(\theta_i;\ c_i,\ w^2)

is sampled instead from the defensive mixture (Hesterberg, 1995)

.. math::

    q(\theta) = \alpha\, p(\theta) + (1 - \alpha)\, t_\nu\big(\theta;\ \hat\theta,\ H^{-1}\big),

a Student-t (``ν`` = :data:`T_DOF`) about the posterior mode ``θ̂`` (L-BFGS) with the inverse
Hessian of ``−log p(θ, r)`` as its scale, and ``α`` = :data:`DEFENSIVE` of the prior itself,
so that every importance weight ``p(θ | r)/q(θ) ≤ p(r | θ)/α`` is bounded whatever the shape
of the posterior. Where the posterior is far from Gaussian in ``θ`` (a layer switched off, two
layers trading variance along a curved ridge) the mode's t misses most of the mass: while the
effective sample size ``(Σ w)² / Σ w²`` is below :data:`ADAPT_ESS` of the samples, the t is
refitted to the weighted mean and covariance of the last samples and ``S`` new ones are drawn
(population Monte Carlo, Cappé et al., 2004; at most :data:`ADAPT_ROUNDS` rounds, the round
with the largest effective sample size kept). The self-normalised weights give the predictive
mixture over the samples, each sample its own exact Gaussian posterior
(:func:`sample_moments`); the effective sample size is recorded, and one below
:data:`MIN_ESS` warns.

Cost: ``O(n³)`` per sample (batched Cholesky factorizations of ``n × n``, ``n = N·O``, in
chunks of bounded memory), ``S`` samples (default 4096) per round; at ``n = 50`` about 0.1–1 s
per round on a 2-core CPU.
Meant for the few-label regime (``n`` up to a few hundred), where a point estimate of ``G + 1``
hyperparameters over-fits.

Example:
    >>> J1, J2 = torch.randn(2, 8, 3, dtype=torch.float64)
    >>> K = torch.stack([J1 @ J1.T, J2 @ J2.T])
    >>> r = J1 @ torch.randn(3, dtype=torch.float64) + 0.1 * torch.randn(8, dtype=torch.float64)
    >>> post = sample_posterior(K, r, center_variance=1.0, center_noise=0.1, width=2.0)
    >>> post.variance.shape[1], bool(torch.isclose(post.weights.sum(), torch.tensor(1.0).double()))
    (2, True)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from pyro_ntk.gp.hyperposterior import drop_negligible

__all__ = [
    "ADAPT_ESS",
    "ADAPT_ROUNDS",
    "DEFENSIVE",
    "MIN_ESS",
    "T_DOF",
    "SamplePosterior",
    "sample_moments",
    "sample_posterior",
]

DEFENSIVE = 0.2
"""Share ``α`` of the proposal drawn from the prior itself (bounds every importance weight)."""

T_DOF = 4
"""Degrees of freedom ``ν`` of the Student-t part of the proposal (heavier tails than the mode's
Laplace approximation)."""

MIN_ESS = 100.0
"""Effective sample size below which :func:`sample_posterior` warns."""

ADAPT_ESS = 0.1
"""Share of the samples below which the effective sample size makes the proposal adapt."""

ADAPT_ROUNDS = 3
"""Adaptation rounds at most: each refits the t to the previous round's weighted mean and
covariance and draws ``S`` new samples; the round with the largest effective sample size is
kept."""

CHUNK_ELEMENTS = 1 << 22
"""Elements of one chunk of batched ``n × n`` (or ``m × n``) matrices (32 MiB in float64)."""


@dataclass
class SamplePosterior:
    r"""Importance samples of ``(σ_g², s²)`` and their normalised weights.

    Attributes:
        variance: ``σ_g²`` of each kept sample ``(S, G)``.
        noise: ``s²`` of each kept sample ``(S,)``.
        weights: normalised importance weights ``(S,)`` (sum 1).
        log_evidence: ``log p(r)``, the importance-sampling estimate of the marginal
            likelihood integrated over the prior.
        dropped: the weight of the samples dropped (``≤``
            :data:`~pyro_ntk.gp.hyperposterior.DROPPED_MASS`).
        ess: the effective sample size ``(Σ w)² / Σ w²`` of the kept round's samples.
        mode: ``θ̂``, the posterior mode in log space ``(G + 1,)`` (last: ``log s²``).
    """

    variance: Tensor
    noise: Tensor
    weights: Tensor
    log_evidence: Tensor
    dropped: float
    ess: float
    mode: Tensor


def _log_likelihood(K_groups: Tensor, r: Tensor, theta: Tensor, jitter: float) -> Tensor:
    """``log N(r; 0, Σ_g e^θ_g K_g + (e^θ_s + ε) I)`` for ``theta (B, G+1)``; −inf where not PD."""
    n = r.shape[0]
    out = []
    step = max(1, CHUNK_ELEMENTS // (n * n))
    eye = torch.eye(n, dtype=r.dtype, device=r.device)
    for t in theta.split(step):
        A = torch.einsum("bg,gij->bij", t[:, :-1].exp(), K_groups)
        A = A + (t[:, -1].exp() + jitter)[:, None, None] * eye
        L, info = torch.linalg.cholesky_ex(A)
        alpha = torch.linalg.solve_triangular(L, r.expand(len(t), n).unsqueeze(-1), upper=False)
        logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        value = -0.5 * (alpha.squeeze(-1).square().sum(-1) + logdet + n * math.log(2 * math.pi))
        out.append(torch.where(info == 0, value, torch.full_like(value, -math.inf)))
    return torch.cat(out)


def _log_prior(theta: Tensor, center: Tensor, width: float) -> Tensor:
    d = theta.shape[-1]
    z = (theta - center) / width
    return -0.5 * z.square().sum(-1) - 0.5 * d * math.log(2 * math.pi * width**2)


def _mode(log_joint, start: Tensor) -> Tensor:
    """The posterior mode by L-BFGS (strong Wolfe) from ``start``."""
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = -log_joint(theta.unsqueeze(0))[0]
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def _t_log_density(x: Tensor, loc: Tensor, L: Tensor, dof: float) -> Tensor:
    """Log-density of the multivariate Student-t with scale ``L Lᵀ`` at ``x (S, d)``."""
    d = loc.shape[0]
    z = torch.linalg.solve_triangular(L, (x - loc).T, upper=False)  # (d, S)
    maha = z.square().sum(0)
    return (
        math.lgamma((dof + d) / 2) - math.lgamma(dof / 2) - 0.5 * d * math.log(dof * math.pi)
        - L.diagonal().log().sum() - 0.5 * (dof + d) * torch.log1p(maha / dof)
    )  # fmt: skip


def sample_posterior(
    K_groups: Tensor,
    residual: Tensor,
    *,
    center_variance: float,
    center_noise: float,
    width: float,
    samples: int = 4096,
    seed: int = 0,
    jitter: float = 0.0,
    where: str = "sample_posterior",
) -> SamplePosterior:
    r"""Importance samples of the posterior of ``(σ_g², s²)`` given ``residual = y − m(X)``.

    Args:
        K_groups: the per-layer kernels ``K_g(X, X)`` at ``σ_g² = 1``, ``(G, n, n)``.
        residual: ``r`` ``(n,)`` (``n = N·O``, rows ``n·O + o``).
        center_variance: the prior median ``c_σ`` of every ``σ_g²`` (> 0).
        center_noise: the prior median ``c_s`` of ``s²`` (> 0).
        width: ``w``, the prior standard deviation of every log-hyperparameter (> 0).
        samples: ``S``, the samples drawn.
        seed: seed of a private generator (the result is deterministic).
        jitter: ε added to s² on the diagonal.
        where: the caller, first in the warnings.

    Returns:
        :class:`SamplePosterior`. Cost ``O(S·n³)`` per round (one, or up to
        ``1 +`` :data:`ADAPT_ROUNDS`) plus the mode (a few hundred log-densities and gradients).
    """
    G = K_groups.shape[0]
    dtype, device = residual.dtype, residual.device
    K_groups, r = K_groups.detach(), residual.detach().reshape(-1)
    center = torch.tensor([math.log(center_variance)] * G + [math.log(center_noise)],
                          dtype=dtype, device=device)  # fmt: skip
    d = G + 1

    def log_joint(theta: Tensor) -> Tensor:
        return _log_likelihood(K_groups, r, theta, jitter) + _log_prior(theta, center, width)

    mode = _mode(log_joint, center)
    hessian = torch.autograd.functional.hessian(lambda t: -log_joint(t.unsqueeze(0))[0], mode)
    # at the mode H = H_lik + I/w² with H_lik ⪰ 0: the scale is never wider than the prior
    lam, Q = torch.linalg.eigh(0.5 * (hessian + hessian.T))
    lam = lam.clamp_min(1.0 / width**2)
    L = torch.linalg.cholesky((Q / lam) @ Q.T)

    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(loc: Tensor, L: Tensor) -> tuple[Tensor, Tensor]:
        n_prior = int(round(DEFENSIVE * samples))
        z = torch.randn(samples, d, generator=gen, dtype=dtype, device=device)
        chi2 = torch.randn(samples - n_prior, T_DOF, generator=gen, dtype=dtype, device=device)
        chi2 = chi2.square().sum(-1)  # χ² with ν degrees of freedom
        t_draws = loc + (z[n_prior:] @ L.T) / (chi2 / T_DOF).sqrt()[:, None]
        theta = torch.cat([center + width * z[:n_prior], t_draws])
        log_q = torch.logaddexp(
            math.log(DEFENSIVE) + _log_prior(theta, center, width),
            math.log(1 - DEFENSIVE) + _t_log_density(theta, loc, L, T_DOF),
        )
        with torch.no_grad():
            log_w = log_joint(theta) - log_q
        return theta, log_w

    best, loc = None, mode
    for _ in range(1 + ADAPT_ROUNDS):
        theta, log_w = draw(loc, L)
        if not bool(torch.isfinite(log_w).any()):
            raise ValueError(
                f"{where}: no sample of (σ_g², s²) gave a positive-definite kernel "
                f"Σ σ_g² K_g + (s² + {jitter:g}) I; check K_groups for non-finite entries."
            )
        weights = torch.softmax(log_w, 0)
        ess = float(1.0 / weights.square().sum())
        if best is None or ess > best[2]:
            best = (theta, log_w, ess)
        if ess >= ADAPT_ESS * samples:
            break
        # the next proposal: the t with the weighted mean and covariance of these samples
        loc = weights @ theta
        cov = ((theta - loc).T * weights) @ (theta - loc)
        lam, Q = torch.linalg.eigh(0.5 * (cov + cov.T))
        L = torch.linalg.cholesky((Q * lam.clamp_min(1e-6 * width**2)) @ Q.T)  # kept PD
    theta, log_w, ess = best
    weights = torch.softmax(log_w, 0)
    log_evidence = torch.logsumexp(log_w, 0) - math.log(samples)
    if not ess >= MIN_ESS:
        warnings.warn(
            f"{where}: the importance sampling of the per-layer variances has an effective "
            f"sample size of {ess:.1f} out of {samples} samples (below {MIN_ESS:.0f}): the "
            "predictive mixture rests on a few samples. Give more samples or a narrower width.",
            NumericalWarning,
            stacklevel=3,
        )
    keep, w, mass = drop_negligible(weights)
    return SamplePosterior(
        theta[keep, :G].exp(), theta[keep, G].exp(), w, log_evidence, mass, ess, mode
    )


def sample_moments(
    K_groups: Tensor,
    residual: Tensor,
    cross_groups: Tensor,
    prior_groups: Tensor,
    post: SamplePosterior,
    *,
    noiseless: bool,
    jitter: float = 0.0,
) -> tuple[Tensor, Tensor]:
    r"""Each kept sample's posterior mean shift and variance at the test rows.

    .. math::

        A_s = \sum_g \sigma_{gs}^2 K_g + (s_s^2 + \epsilon) I,\quad
        C_s = \sum_g \sigma_{gs}^2 K_g(X_*, X),\quad
        \mu_s - m_* = C_s A_s^{-1} r,\quad
        v_s = \sum_g \sigma_{gs}^2\, k_{g,**} - \operatorname{diag}(C_s A_s^{-1} C_s^\top)

    Args:
        K_groups: ``K_g(X, X)`` ``(G, n, n)``.
        residual: ``r`` ``(n,)``.
        cross_groups: ``K_g(X_*, X)`` ``(G, m, n)``.
        prior_groups: ``diag K_g(X_*, X_*)`` ``(G, m)``.
        post: the samples.
        noiseless: ``False`` adds each sample's s².
        jitter: ε on the diagonal of the training kernel.

    Returns:
        ``(shift, var)``, both ``(S, m)``. Cost ``O(S·(n³ + m·n²))``, in chunks of bounded memory.
    """
    m, n = cross_groups.shape[1:]
    r = residual.detach().reshape(-1, 1)
    eye = torch.eye(n, dtype=r.dtype, device=r.device)
    step = max(1, CHUNK_ELEMENTS // (n * max(n, m)))
    shifts, variances = [], []
    for v, s in zip(post.variance.split(step), post.noise.split(step)):
        A = torch.einsum("bg,gij->bij", v, K_groups) + (s + jitter)[:, None, None] * eye
        L = torch.linalg.cholesky(A)
        C = torch.einsum("bg,gmi->bmi", v, cross_groups)  # (b, m, n)
        shifts.append((C @ torch.cholesky_solve(r.expand(len(v), n, 1), L)).squeeze(-1))
        W = torch.linalg.solve_triangular(L, C.transpose(-1, -2), upper=False)  # (b, n, m)
        var = (v @ prior_groups - W.square().sum(-2)).clamp_min(0.0)
        variances.append(var if noiseless else var + s[:, None])
    return torch.cat(shifts), torch.cat(variances)
