"""Saved state: kernels and fitted models round-trip and give identical predictions.

Two routes are supported and tested for each stateful object:

* ``state_dict()`` → ``load_state_dict()`` into a freshly built object (same network and
  data): the learned hyperparameters (σ², noise) or guide parameters travel, θ* is
  re-read from the network. The state dict holds tensors only (``weights_only=True``
  loads it).
* ``torch.save(obj)`` → ``torch.load(..., weights_only=False)``: the whole object,
  including its own copy of the network and θ*; engine caches are dropped on pickling
  and rebuilt on first use.

:class:`~pyro_ntk.LinearizedLaplace` is a plain object (no ``state_dict``): its supported
route is ``torch.save`` / ``torch.load``. Fitting twice under the same seed gives bitwise
identical results.

Pyro's ``PyroParam`` values live in the global param store, keyed by name: a *freshly
built* Pyro kernel or model picks up a value already in the store (Pyro's semantics), so the
``state_dict`` route is tested in a new session (``pyro.clear_param_store()``) and a loaded
object keeps its own values.
"""

from __future__ import annotations

import gpytorch
import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_ntk


def _net(d_out: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, d_out))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _data(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g)
    return X, torch.sin(X.sum(-1)) + 0.1 * torch.randn(n, generator=g)


def _roundtrip(obj, tmp_path, name: str):
    path = tmp_path / f"{name}.pt"
    torch.save(obj, path)
    return torch.load(path, weights_only=False)


def _state_roundtrip(module, tmp_path, name: str) -> dict:
    path = tmp_path / f"{name}_state.pt"
    torch.save(module.state_dict(), path)
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------- kernels
def test_empirical_ntk_round_trips(tmp_path):
    net = _net()
    X, _ = _data()
    kernel = pyro_ntk.EmpiricalNTK(net, layer_variances=True)
    kernel.variance = torch.tensor([0.3, 0.7, 1.9])
    K = kernel(X).detach()

    # a new session: Pyro keeps PyroParams in its global param store, keyed by name
    pyro.clear_param_store()
    fresh = pyro_ntk.EmpiricalNTK(net, layer_variances=True)
    assert not torch.equal(fresh(X).detach(), K)  # the test can fail
    fresh.load_state_dict(_state_roundtrip(kernel, tmp_path, "emp"))
    assert torch.equal(fresh(X).detach(), K)

    loaded = _roundtrip(kernel, tmp_path, "emp")
    assert torch.equal(loaded(X).detach(), K)
    assert torch.equal(loaded(X, diag=True).detach(), kernel(X, diag=True).detach())


def test_ntk_kernel_round_trips(tmp_path):
    net = _net(d_out=2)
    X, _ = _data()
    kernel = pyro_ntk.NTKKernel(net, variance=0.4)
    kernel.variance = 2.5
    K = kernel(X).to_dense().detach()

    fresh = pyro_ntk.NTKKernel(net, variance=0.4)
    assert not torch.equal(fresh(X).to_dense().detach(), K)
    fresh.load_state_dict(_state_roundtrip(kernel, tmp_path, "ntkk"))
    assert torch.equal(fresh(X).to_dense().detach(), K)

    loaded = _roundtrip(kernel, tmp_path, "ntkk")
    assert torch.equal(loaded(X).to_dense().detach(), K)


def test_ntk_kernel_in_exact_gp_round_trips(tmp_path):
    net = _net()
    X, y = _data()

    class ExactGP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(X, y, gpytorch.likelihoods.GaussianLikelihood())
            self.covar_module = pyro_ntk.NTKKernel(net)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                torch.zeros(x.shape[0]), self.covar_module(x)
            )

    model = ExactGP()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (-mll(model(X), y)).backward()
        opt.step()
    model.eval()
    Xs = _data(4, seed=5)[0]
    with torch.no_grad(), gpytorch.settings.fast_computations(False, False, False):
        mean = model(Xs).mean
        fresh = ExactGP()
        fresh.load_state_dict(_state_roundtrip(model, tmp_path, "exact"))
        fresh.eval()
        assert torch.equal(fresh(Xs).mean, mean)


# ---------------------------------------------------------------------- models
def _fit_regression(net, X, y, seed: int = 0, steps: int = 3):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    model = pyro_ntk.NTKGPRegression(X, y, net, noise=torch.tensor(0.5), layer_variances=True)
    gp.util.train(model, num_steps=steps)
    return model


def test_ntk_gp_regression_round_trips(tmp_path):
    net = _net()
    X, y = _data()
    model = _fit_regression(net, X, y)
    Xs = _data(4, seed=5)[0]
    with torch.no_grad():
        mean, cov = model(Xs, full_cov=True)

    pyro.clear_param_store()  # a new session (Pyro's param store is global, keyed by name)
    fresh = pyro_ntk.NTKGPRegression(X, y, net, noise=torch.tensor(0.5), layer_variances=True)
    with torch.no_grad():
        assert not torch.equal(fresh(Xs)[0], mean)
    fresh.load_state_dict(_state_roundtrip(model, tmp_path, "reg"))
    with torch.no_grad():
        m2, c2 = fresh(Xs, full_cov=True)
    assert torch.equal(m2, mean) and torch.equal(c2, cov)

    loaded = _roundtrip(model, tmp_path, "reg")
    with torch.no_grad():
        m3, c3 = loaded(Xs, full_cov=True)
    assert torch.equal(m3, mean) and torch.equal(c3, cov)


def test_ntk_gp_regression_fit_is_reproducible():
    net = _net()
    X, y = _data()
    a = _fit_regression(net, X, y, seed=3)
    b = _fit_regression(net, X, y, seed=3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    assert not torch.equal(a.variance, torch.ones(3))  # it did move


def _svi(net, X, y, seed: int):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    lm = pyro_ntk.LinearizedModel(net, variance=0.5)

    def model(X, y=None):
        f = lm(X)
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal(f, 0.3), obs=y)

    guide = pyro.infer.autoguide.AutoNormal(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(5):
        svi.step(X, y)
    return lm, model, guide


def test_linearized_model_guide_round_trips(tmp_path):
    net = _net()
    X, y = _data()
    _, model, guide = _svi(net, X, y, seed=0)
    median = {k: v.detach() for k, v in guide.median(X).items()}
    state = _state_roundtrip(guide, tmp_path, "guide")

    pyro.clear_param_store()
    fresh = pyro.infer.autoguide.AutoNormal(model)
    fresh(X, y)  # autoguides build their parameters on the first call
    fresh.load_state_dict(state)
    assert torch.equal(fresh.median(X)["delta"], median["delta"])

    loaded = _roundtrip(guide, tmp_path, "guide")
    assert torch.equal(loaded.median(X)["delta"], median["delta"])
    pyro.set_rng_seed(7)
    a = pyro.infer.Predictive(model, guide=guide, num_samples=3)(X)["y"]
    pyro.set_rng_seed(7)
    b = pyro.infer.Predictive(model, guide=loaded, num_samples=3)(X)["y"]
    assert torch.equal(a, b)
    pyro.clear_param_store()


def test_linearized_model_svi_is_reproducible():
    net = _net()
    X, y = _data()
    _, _, g1 = _svi(net, X, y, seed=4)
    s1 = {k: v.detach().clone() for k, v in g1.state_dict().items()}
    _, _, g2 = _svi(net, X, y, seed=4)
    s2 = g2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    pyro.clear_param_store()


def test_linearized_model_state_dict_round_trips(tmp_path):
    net = _net()
    lm = pyro_ntk.LinearizedModel(net, variance=torch.tensor([0.2, 0.4, 0.8]), layer_variances=True)
    fresh = pyro_ntk.LinearizedModel(net, variance=1.0, layer_variances=True)
    fresh.load_state_dict(_state_roundtrip(lm, tmp_path, "lm"))
    assert torch.equal(fresh.prior_scale(), lm.prior_scale())


@pytest.fixture(scope="module")
def laplace_data():
    torch.manual_seed(0)
    X = torch.randn(12, 3)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


def test_linearized_laplace_round_trips(tmp_path, laplace_data):
    X, y = laplace_data
    net = _net(d_out=3)
    la = pyro_ntk.LinearizedLaplace(net, "categorical").fit(X, y, num_steps=5)
    Xs = _data(4, seed=5)[0]
    probs = la.predict(Xs)
    loaded = _roundtrip(la, tmp_path, "la")
    assert torch.equal(loaded.predict(Xs), probs)
    assert torch.equal(loaded.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_linearized_laplace_fit_is_reproducible(laplace_data):
    X, y = laplace_data
    net = _net(d_out=3)
    a = pyro_ntk.LinearizedLaplace(net, "categorical").fit(X, y, num_steps=5, seed=2)
    b = pyro_ntk.LinearizedLaplace(net, "categorical").fit(X, y, num_steps=5, seed=2)
    assert torch.equal(a.delta, b.delta)
    assert torch.equal(a.predict(X), b.predict(X))


def test_linearization_pickles_after_use(tmp_path):
    # engine caches (weak references, closures) are dropped on pickling, rebuilt on use
    net = _net(d_out=2)
    X, _ = _data()
    for impl in ("functorch", "cached", "structured"):
        lin = pyro_ntk.Linearization(net, implementation=impl)
        V = torch.randn(X.shape[0] * 2, 3)
        out = lin.ntk_mvm(X, None, V)
        loaded = _roundtrip(lin, tmp_path, impl)
        assert torch.allclose(loaded.ntk_mvm(X, None, V), out, rtol=1e-12, atol=1e-12)
        assert loaded.network is not net  # its own copy: later changes to net don't leak in
