"""The posterior of :mod:`pyro_ntk.gp.posterior` against the dense float64 textbook GP."""

from __future__ import annotations

import torch
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.gp import (
    add_noise,
    cholesky_posterior,
    conditional_covariance,
    explained_covariance,
    pathwise_covariance,
    pathwise_posterior,
)
from pyro_ntk.testing import reference_ntk


def _case():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    X = torch.randn(10, 2, dtype=torch.float64)
    Xs = torch.randn(4, 2, dtype=torch.float64)
    r = torch.randn(20, 1, dtype=torch.float64)
    return net, X, Xs, r


def _textbook(net, X, Xs, r, v, d):
    K = v * reference_ntk(net, torch.cat([X, Xs]))
    n = 2 * X.shape[0]
    A = K[:n, :n] + d * torch.eye(n, dtype=K.dtype)
    Ksx = K[n:, :n]
    return (
        Ksx @ torch.linalg.solve(A, r).squeeze(-1),
        K[n:, n:] - Ksx @ torch.linalg.solve(A, Ksx.T),
        A,
    )


def test_cholesky_posterior_is_the_textbook_gp():
    net, X, Xs, r = _case()
    lin = Linearization(net)
    v, d = torch.tensor(0.7, dtype=torch.float64), 0.05
    mean_ref, cov_ref, A = _textbook(net, X, Xs, r, v, d)
    L = torch.linalg.cholesky(A)
    shift, cov, alpha = cholesky_posterior(lin, X, Xs, r, L, v, full_cov=True)
    torch.testing.assert_close(shift, mean_ref)
    torch.testing.assert_close(cov, cov_ref)
    torch.testing.assert_close(alpha, torch.linalg.solve(A, r))
    _, var, _ = cholesky_posterior(lin, X, Xs, r, L, v, full_cov=False)
    torch.testing.assert_close(var, cov_ref.diagonal().clamp_min(0))
    noisy = add_noise(cov, torch.tensor(0.1, dtype=torch.float64), full_cov=True)
    torch.testing.assert_close(noisy - cov, 0.1 * torch.eye(8, dtype=torch.float64))


def test_pathwise_posterior_mean_is_exact_and_draws_replay_densely():
    net, X, Xs, r = _case()
    lin = Linearization(net)
    v, d = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    mean_ref, _, A = _textbook(net, X, Xs, r, v, d)
    shift, dev = pathwise_posterior(
        lin, X, Xs, r, v, False, d, lambda B: torch.linalg.solve(A, B), 64, 3
    )
    torch.testing.assert_close(shift, mean_ref)
    # the same seed gives the same draws
    _, dev2 = pathwise_posterior(
        lin, X, Xs, r, v, False, d, lambda B: torch.linalg.solve(A, B), 64, 3
    )
    assert torch.equal(dev, dev2)
    assert dev.shape == (8, 64)
    torch.testing.assert_close(pathwise_covariance(dev, full_cov=False), dev.square().mean(1))
    torch.testing.assert_close(pathwise_covariance(dev, full_cov=True), dev @ dev.T / 64)


def test_pathwise_variances_converge_to_the_exact_ones():
    net, X, Xs, r = _case()
    lin = Linearization(net)
    v, d = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    _, cov_ref, A = _textbook(net, X, Xs, r, v, d)
    S = 20000
    _, dev = pathwise_posterior(
        lin, X, Xs, r, v, False, d, lambda B: torch.linalg.solve(A, B), S, 0
    )
    var = pathwise_covariance(dev, full_cov=False)
    # relative sd of the estimate is sqrt(2/S) = 1 %; 5 sd
    torch.testing.assert_close(var, cov_ref.diagonal(), rtol=0.05, atol=1e-12)


def test_explained_covariance_rows_and_reduce():
    left, right = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    full = explained_covariance(
        left, right, full_cov=True, reduce=lambda t: 2 * t, rows=slice(1, 3)
    )
    torch.testing.assert_close(full, 2 * (left.T @ right)[1:3, 1:3])
    diag = explained_covariance(left, right, full_cov=False, rows=slice(1, 3))
    torch.testing.assert_close(diag, (left * right).sum(0)[1:3])
    prior = torch.zeros(2, dtype=torch.float64)
    assert bool((conditional_covariance(prior, diag.abs(), full_cov=False) == 0).all())
