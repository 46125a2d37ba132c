"""integrate_hyperparameters: weights and predictive mixture against dense float64 formulas,
the grid's quadrature against a brute-force one, the narrow-prior limit, warnings and bad input."""

import math

import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import nn

from pyro_ntk import HyperparameterMixture, NTKGPRegression, integrate_hyperparameters
from pyro_ntk.testing import reference_ntk, reference_output


def mlp(d_out=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, d_out))


def data(n, d_out=1, noise=0.3):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 2, generator=gen)
    y = torch.sin(X[:, :1] * 2) + X[:, 1:] + noise * torch.randn(n, d_out, generator=gen)
    return X, (y.squeeze(-1) if d_out == 1 else y)


def log_joint(net, X, y, variance, noise, jitter, center_v, center_s, width):
    """log N(r; 0, σ²K + (s² + ε)I) + log prior, by a dense MultivariateNormal per node."""
    K = reference_ntk(net, X)
    r = y.reshape(-1) - reference_output(net, X).reshape(-1)
    eye = torch.eye(K.shape[0])
    A = variance[:, None, None] * K + (noise + jitter)[:, None, None] * eye
    lik = torch.distributions.MultivariateNormal(torch.zeros_like(r), A).log_prob(r)
    prior = -0.5 * (((variance.log() - math.log(center_v)) / width) ** 2)
    prior = prior - 0.5 * (((noise.log() - math.log(center_s)) / width) ** 2)
    return lik + prior - math.log(2 * math.pi * width**2)


def centres(net, X, y):
    r = y.reshape(-1) - reference_output(net, X).reshape(-1)
    v = float(r.square().mean())
    return v / float(reference_ntk(net, X).diagonal().mean()), v


@pytest.mark.parametrize("d_out", [1, 2])
def test_mixture_equals_dense_reference(d_out):
    net = mlp(d_out)
    X, y = data(9, d_out)
    Xs = torch.randn(4, 2)
    ys = torch.randn(4, d_out).squeeze(-1) if d_out == 1 else torch.randn(4, d_out)
    model = NTKGPRegression(X, y, net)
    mix = integrate_hyperparameters(model, width=2.0, points=15)
    post = mix.posterior
    cv, cs = centres(net, X, y)
    lj = log_joint(net, X, y, post.variance, post.noise, model.jitter, cv, cs, 2.0)
    torch.testing.assert_close(post.weights, torch.softmax(lj, 0), rtol=1e-8, atol=1e-12)

    # each node's posterior by the textbook formulas, then the mixture
    K = reference_ntk(net, X)
    Ksx, Kss = reference_ntk(net, Xs, X), reference_ntk(net, Xs).diagonal()
    r = y.reshape(-1) - reference_output(net, X).reshape(-1)
    ms = reference_output(net, Xs).reshape(-1)
    means, vars_ = [], []
    for v, s in zip(post.variance, post.noise):
        A = v * K + (s + model.jitter) * torch.eye(K.shape[0])
        means.append(ms + v * Ksx @ torch.linalg.solve(A, r))
        vars_.append(v * Kss - v**2 * (Ksx * torch.linalg.solve(A, Ksx.T).T).sum(-1) + s)
    means, vars_ = torch.stack(means), torch.stack(vars_)
    w = post.weights[:, None]
    mean_ref = (w * means).sum(0)
    var_ref = (w * (vars_ + (means - mean_ref) ** 2)).sum(0)
    yr = ys.reshape(-1)
    log_n = torch.distributions.Normal(means, vars_.sqrt()).log_prob(yr)
    lp_ref = torch.logsumexp(log_n + w.log(), 0)
    cdf_ref = (w * torch.distributions.Normal(means, vars_.sqrt()).cdf(yr)).sum(0)

    mean, var = mix(Xs)
    assert mean.shape == ys.shape and var.shape == ys.shape
    torch.testing.assert_close(mean.reshape(-1), mean_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var.reshape(-1), var_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(mix.log_prob(Xs, ys).reshape(-1), lp_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(mix.cdf(Xs, ys).reshape(-1), cdf_ref, rtol=1e-8, atol=1e-10)
    f_mean, f_var = mix(Xs, noiseless=True)
    torch.testing.assert_close(f_mean, mean)
    assert bool((f_var < var).all())
    assert post.dropped <= 1e-9


def test_quadrature_against_brute_force_grid():
    """log p(y) and the mixture mean against a fine uniform grid of dense densities."""
    net = mlp()
    X, y = data(6)
    Xs = torch.randn(3, 2)
    model = NTKGPRegression(X, y, net)
    mix = integrate_hyperparameters(model, width=2.0)
    cv, cs = centres(net, X, y)
    axis = torch.linspace(-8.0, 8.0, 321)  # ± 4 prior standard deviations, step 0.05
    LV, LS = torch.meshgrid(math.log(cv) + axis, math.log(cs) + axis, indexing="ij")
    V, S = LV.exp().reshape(-1), LS.exp().reshape(-1)
    lj = log_joint(net, X, y, V, S, model.jitter, cv, cs, 2.0)
    evidence = torch.logsumexp(lj, 0) + 2 * math.log(0.05)
    assert abs(float(mix.log_evidence - evidence)) < 1e-3
    # the brute-force mixture mean on the nodes that carry weight
    w = torch.softmax(lj, 0)
    keep = w > 1e-12
    K, Ksx = reference_ntk(net, X), reference_ntk(net, Xs, X)
    r = y - reference_output(net, X).reshape(-1)
    A = V[keep, None, None] * K + (S[keep] + model.jitter)[:, None, None] * torch.eye(6)
    shift = V[keep, None] * (Ksx @ torch.linalg.solve(A, r.expand(int(keep.sum()), 6)).T).T
    mean_ref = (
        reference_output(net, Xs).reshape(-1) + (w[keep, None] * shift).sum(0) / w[keep].sum()
    )
    torch.testing.assert_close(mix(Xs)[0], mean_ref, rtol=1e-4, atol=1e-6)


def test_more_points_converge():
    net = mlp()
    X, y = data(30)
    Xs = torch.randn(5, 2)
    model = NTKGPRegression(X, y, net)
    coarse, fine = integrate_hyperparameters(model, points=31), integrate_hyperparameters(model)
    assert abs(float(coarse.log_evidence - fine.log_evidence)) < 1e-4
    torch.testing.assert_close(coarse(Xs)[0], fine(Xs)[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(coarse(Xs)[1], fine(Xs)[1], rtol=1e-4, atol=1e-7)


def test_narrow_prior_is_the_fixed_hyperparameter_gp():
    net = mlp()
    X, y = data(10)
    Xs = torch.randn(4, 2)
    model = NTKGPRegression(X, y, net)
    mix = integrate_hyperparameters(model, width=1e-7, prior_variance=0.3, prior_noise=0.05)
    fixed = NTKGPRegression(X, y, net, noise=0.05, variance=0.3)
    with torch.no_grad():
        mean, var = fixed(Xs, noiseless=False)
    torch.testing.assert_close(mix(Xs)[0], mean, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(mix(Xs)[1], var, rtol=1e-5, atol=1e-8)
    assert abs(float(mix.noise) - 0.05) < 1e-6 and abs(float(mix.variance) - 0.3) < 1e-5


def test_many_points_concentrate_near_the_fitted_values():
    """With 80 noisy targets the posterior mean of s² is near the marginal-likelihood optimum."""
    from pyro_ntk import fit

    net = mlp()
    X, y = data(80, noise=0.3)
    model = NTKGPRegression(X, y, net)
    mix = integrate_hyperparameters(model)
    fit(model, progress=False)
    assert abs(math.log(float(mix.noise) / float(model.noise.detach()))) < 0.3
    assert abs(math.log(float(mix.noise) / 0.09)) < 0.5  # the noise the data were drawn with


def test_border_mass_warns():
    net = mlp()
    X, y = data(20, noise=0.3)
    model = NTKGPRegression(X, y, net)
    with pytest.warns(NumericalWarning, match="border of the grid"):
        integrate_hyperparameters(model, width=0.1, prior_noise=1e-6)


def test_bad_input():
    net = mlp()
    X, y = data(8)
    model = NTKGPRegression(X, y, net)
    with pytest.raises(TypeError, match="model must be an NTKGPRegression"):
        integrate_hyperparameters(net)
    for kwargs, match in [
        ({"width": 0.0}, "width must be a float > 0, got 0.0"),
        ({"span": -1.0}, "span must be a float > 0"),
        ({"points": 2}, "points must be an int >= 3, got 2"),
        ({"prior_noise": -1.0}, "prior_noise must be a float > 0, got -1.0"),
        ({"prior_variance": float("inf")}, "prior_variance must be a float > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            integrate_hyperparameters(model, **kwargs)
    with pytest.raises(ValueError, match="samples must be an int >= 100, got 50"):
        integrate_hyperparameters(model, samples=50)
    with pytest.raises(ValueError, match="no targets"):
        integrate_hyperparameters(NTKGPRegression(X, None, net))
    exact = NTKGPRegression(X, reference_output(net, X).reshape(-1), net, noise=0.1)
    with pytest.raises(ValueError, match="targets equal the network's outputs"):
        integrate_hyperparameters(exact)
    mix = integrate_hyperparameters(model)
    assert isinstance(mix, HyperparameterMixture)
    with pytest.raises(ValueError, match=r"ynew has shape \(3,\); expected \(2,\)"):
        mix.log_prob(torch.randn(2, 2), torch.randn(3))
    model.set_data(X, y + 1.0)
    with pytest.raises(ValueError, match="data changed"):
        mix(torch.randn(2, 2))


@pytest.mark.parametrize("d_out", [1, 2])
def test_layer_variances_mixture_equals_dense_reference(d_out):
    """Per-layer σ_g² sampled: each sample's predictive by dense per-layer jacrev kernels."""
    net = mlp(d_out)
    X, y = data(9, d_out)
    Xs = torch.randn(4, 2)
    model = NTKGPRegression(X, y, net, layer_variances=True)
    mix = integrate_hyperparameters(model, samples=300)
    post = mix.posterior
    assert post.variance.shape[1] == 2 and mix.variance.shape == (2,)
    weights, means, var = mix.components(Xs)
    names = [[n for n, _ in net.named_parameters() if n.startswith(p)] for p in ("0.", "2.")]
    P = [sum(dict(net.named_parameters())[n].numel() for n in g) for g in names]
    ones = [torch.cat([torch.full((p,), float(g == h)) for h, p in enumerate(P)]) for g in range(2)]
    K = torch.stack([reference_ntk(net, X, scale=s) for s in ones])
    Ksx = torch.stack([reference_ntk(net, Xs, X, scale=s) for s in ones])
    Kss = torch.stack([reference_ntk(net, Xs, scale=s).diagonal() for s in ones])
    r = y.reshape(-1) - reference_output(net, X).reshape(-1)
    m_star = reference_output(net, Xs).reshape(-1)
    n = r.shape[0]
    for s in (0, len(weights) // 2, len(weights) - 1):
        v, s2 = post.variance[s], post.noise[s]
        A = torch.einsum("g,gij->ij", v, K) + (s2 + model.jitter) * torch.eye(n)
        C = torch.einsum("g,gij->ij", v, Ksx)
        mean = m_star + C @ torch.linalg.solve(A, r)
        vs = v @ Kss - (C @ torch.linalg.solve(A, C.T)).diagonal() + s2
        torch.testing.assert_close(means[s].reshape(-1), mean, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(var[s].reshape(-1), vs, rtol=1e-8, atol=1e-10)


def test_layer_variances_narrow_prior_is_the_fixed_hyperparameter_gp():
    net = mlp()
    X, y = data(10)
    Xs = torch.randn(4, 2)
    model = NTKGPRegression(X, y, net, layer_variances=True)
    mix = integrate_hyperparameters(
        model, width=1e-7, prior_variance=0.3, prior_noise=0.05, samples=200
    )
    fixed = NTKGPRegression(X, y, net, noise=0.05, variance=0.3, layer_variances=True)
    with torch.no_grad():
        mean, var = fixed(Xs, noiseless=False)
    torch.testing.assert_close(mix(Xs)[0], mean, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(mix(Xs)[1], var, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(mix.variance, torch.full((2,), 0.3), rtol=1e-5, atol=0.0)


def test_components_of_the_same_inputs_are_computed_once(monkeypatch):
    net = mlp()
    X, y = data(9)
    Xs = torch.randn(4, 2)
    mix = integrate_hyperparameters(NTKGPRegression(X, y, net))
    calls = []
    lin = mix.model.linearization
    original = lin.ntk_dense
    monkeypatch.setattr(lin, "ntk_dense", lambda *a, **k: calls.append(1) or original(*a, **k))
    mean, var = mix(Xs)
    ys = torch.randn(4)
    mix.log_prob(Xs, ys), mix.cdf(Xs, ys)
    assert len(calls) == 1
    mix(Xs.clone())  # another tensor: computed again, the same numbers
    assert len(calls) == 2
    torch.testing.assert_close(mix(Xs.clone())[1], var, rtol=0, atol=0)
    Xs.mul_(2.0)  # modified in place: not answered from the cache
    torch.testing.assert_close(mix(Xs)[0], mix(Xs.clone())[0], rtol=0, atol=0)
    assert not torch.equal(mix(Xs)[0], mean)
