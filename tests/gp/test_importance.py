"""Importance sampling of (σ_g², s²): per-sample moments against dense formulas, the estimate
against a brute-force grid quadrature (G = 2) and against the one-σ² grid (G = 1)."""

import math

import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning

from pyro_ntk.gp import KernelSpectrum, grid_posterior, importance, mixture_moments
from pyro_ntk.gp.importance import sample_moments, sample_posterior

WIDTH = 1.5


def problem(G=2, n=8, m=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Js = [torch.randn(n + m, 3 + g, generator=gen, dtype=torch.float64) for g in range(G)]
    full = torch.stack([J @ J.T for J in Js])  # (G, n + m, n + m)
    delta = [torch.randn(J.shape[1], generator=gen, dtype=torch.float64) for J in Js]
    f = sum(J[:n] @ d * s for J, d, s in zip(Js, delta, (1.0, 0.3, 0.5)))
    r = f + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    return full[:, :n, :n], full[:, n:, :n], full[:, n:, n:].diagonal(dim1=-2, dim2=-1), r


def dense_log_joint(K_groups, r, theta, center, jitter=0.0):
    """log N(r; 0, Σ e^θ_g K_g + (e^θ_s + ε) I) + log prior, by MultivariateNormal per node."""
    n, d = r.shape[0], theta.shape[-1]
    A = torch.einsum("bg,gij->bij", theta[:, :-1].exp(), K_groups)
    A = A + (theta[:, -1].exp() + jitter)[:, None, None] * torch.eye(n, dtype=r.dtype)
    lik = torch.distributions.MultivariateNormal(torch.zeros_like(r), A).log_prob(r)
    prior = -0.5 * ((theta - center) / WIDTH).square().sum(-1)
    return lik + prior - 0.5 * d * math.log(2 * math.pi * WIDTH**2)


def test_sample_moments_equal_dense_formulas():
    K, Kx, kss, r = problem()
    post = sample_posterior(K, r, center_variance=1.0, center_noise=0.1, width=WIDTH, samples=300)
    for noiseless in (True, False):
        shift, var = sample_moments(K, r, Kx, kss, post, noiseless=noiseless, jitter=1e-6)
        for s in (0, 7, len(post.weights) - 1):
            v, s2 = post.variance[s], post.noise[s]
            A = torch.einsum("g,gij->ij", v, K) + (s2 + 1e-6) * torch.eye(8, dtype=torch.float64)
            C = torch.einsum("g,gmi->mi", v, Kx)
            torch.testing.assert_close(
                shift[s], C @ torch.linalg.solve(A, r), rtol=1e-10, atol=1e-12
            )
            expect = (
                v @ kss - (C @ torch.linalg.solve(A, C.T)).diagonal() + (0 if noiseless else s2)
            )
            torch.testing.assert_close(var[s], expect, rtol=1e-10, atol=1e-12)


def test_estimate_matches_brute_force_grid():
    """G = 2: log evidence and posterior means against a 45³ grid of dense densities."""
    K, Kx, kss, r = problem()
    cv, cs = 0.5, 0.2
    center = torch.tensor([math.log(cv)] * 2 + [math.log(cs)], dtype=torch.float64)
    post = sample_posterior(K, r, center_variance=cv, center_noise=cs, width=WIDTH, samples=20000)
    axis = torch.linspace(-4.5 * WIDTH, 4.5 * WIDTH, 45, dtype=torch.float64)
    theta = torch.cartesian_prod(axis, axis, axis) + center
    lj = torch.cat([dense_log_joint(K, r, t, center) for t in theta.split(20000)])
    cell = float(axis[1] - axis[0]) ** 3
    log_z = torch.logsumexp(lj, 0) + math.log(cell)
    assert abs(float(post.log_evidence - log_z)) < 0.02
    w = torch.softmax(lj, 0)
    for col, got in ((0, post.variance[:, 0]), (1, post.variance[:, 1]), (2, post.noise)):
        exact = float((w * theta[:, col]).sum())  # E log σ_g², E log s²
        estimate = float((post.weights * got.log()).sum())
        assert abs(estimate - exact) < 0.03, (col, estimate, exact)
    assert post.ess > 2000


def test_one_layer_agrees_with_the_grid():
    """G = 1: the importance-sampled mixture is the one-σ² grid mixture, up to Monte Carlo error."""
    K, Kx, kss, r = problem(G=1)
    kw = dict(center_variance=0.5, center_noise=0.2, width=WIDTH)
    post = sample_posterior(K, r, samples=20000, **kw)
    spec = KernelSpectrum.of(K[0])
    grid = grid_posterior(spec, r, points=81, **kw)
    assert abs(float(post.log_evidence - grid.log_evidence)) < 0.02
    mix = []
    for p, (shift, var) in (
        (post, sample_moments(K, r, Kx, kss, post, noiseless=False)),
        (grid, mixture_moments(spec, r, Kx[0], kss[0], grid, noiseless=False)),
    ):
        w = p.weights[:, None]
        mean = (w * shift).sum(0)
        mix.append((mean, (w * (var + (shift - mean).square())).sum(0)))
    torch.testing.assert_close(mix[0][0], mix[1][0], rtol=0.02, atol=0.02)
    torch.testing.assert_close(mix[0][1], mix[1][1], rtol=0.02, atol=0.0)


def test_deterministic_and_seeded():
    K, _, _, r = problem()
    kw = dict(center_variance=1.0, center_noise=0.1, width=WIDTH, samples=500)
    a, b = sample_posterior(K, r, seed=3, **kw), sample_posterior(K, r, seed=3, **kw)
    c = sample_posterior(K, r, seed=4, **kw)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.variance, b.variance)
    assert not torch.equal(a.variance, c.variance)


def test_small_effective_sample_size_warns(monkeypatch):
    K, _, _, r = problem()
    monkeypatch.setattr(importance, "MIN_ESS", 1e9)
    with pytest.warns(NumericalWarning, match="effective sample size"):
        sample_posterior(K, r, center_variance=1.0, center_noise=0.1, width=WIDTH, samples=200)


def test_adapted_proposals_agree_with_the_brute_force_grid(monkeypatch):
    """A first proposal far from the mass (the mode search replaced by a point 2.5 prior
    widths away): the adapted rounds recover, and the kept estimate agrees with the grid."""
    K, _, _, r = problem()
    cv, cs = 0.5, 0.2
    center = torch.tensor([math.log(cv)] * 2 + [math.log(cs)], dtype=torch.float64)
    monkeypatch.setattr(importance, "_mode", lambda log_joint, start: start + 2.5 * WIDTH)
    rounds = []
    original = importance._t_log_density
    monkeypatch.setattr(importance, "_t_log_density", lambda *a: rounds.append(1) or original(*a))
    post = sample_posterior(K, r, center_variance=cv, center_noise=cs, width=WIDTH, samples=20000)
    assert len(rounds) > 1 and post.ess > importance.ADAPT_ESS * 20000
    axis = torch.linspace(-4.5 * WIDTH, 4.5 * WIDTH, 45, dtype=torch.float64)
    theta = torch.cartesian_prod(axis, axis, axis) + center
    lj = torch.cat([dense_log_joint(K, r, t, center) for t in theta.split(20000)])
    log_z = torch.logsumexp(lj, 0) + math.log(float(axis[1] - axis[0]) ** 3)
    assert abs(float(post.log_evidence - log_z)) < 0.02
    w = torch.softmax(lj, 0)
    for col, got in ((0, post.variance[:, 0]), (1, post.variance[:, 1]), (2, post.noise)):
        exact = float((w * theta[:, col]).sum())
        assert abs(float((post.weights * got.log()).sum()) - exact) < 0.03, col
