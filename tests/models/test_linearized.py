"""LinearizedModel: outputs against dense references, Pyro inference, subsampling, hygiene."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from networks import CASES, assert_unchanged, snapshot
from pyro import distributions as dist
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoNormal
from pyro.nn import PyroParam
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.models import LinearizedModel
from pyro_ntk.testing import reference_jacobian, reference_output


def _reference_linearized(net, X, delta, params=None):
    J = reference_jacobian(net, X, params)  # (N, O, P)
    return reference_output(net, X) + torch.einsum("nop,...p->...no", J, delta)


ZOO = [c for c in CASES if c.name in {"tanh_mlp", "cnn", "multi_output", "batchnorm", "last_layer"}]


@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_output_matches_dense_reference(case):
    net, X = case.build(n=5)
    before = snapshot(net)
    model = LinearizedModel(net, params=case.params)
    delta = torch.randn(3, model.num_params)
    out = model.linearized_output(X, delta)
    torch.testing.assert_close(out, _reference_linearized(net, X, delta, case.params))
    # the squeezed forward: (S, N) for one output, (S, N, O) otherwise
    fwd = model(X, delta)
    O = out.shape[-1]
    assert fwd.shape == ((3, 5) if O == 1 else (3, 5, O))
    assert_unchanged(net, before)


def test_gradient_flows_to_delta_through_the_jvp():
    net, X = CASES[3].build(n=4)  # multi-output
    model = LinearizedModel(net)
    delta = torch.randn(model.num_params, requires_grad=True)
    u = torch.randn(4, 3)
    (model(X, delta) * u).sum().backward()
    J = reference_jacobian(net, X)
    torch.testing.assert_close(delta.grad, torch.einsum("nop,no->p", J, u))


def test_no_network_weights_in_parameters_or_param_store():
    net, X = CASES[0].build(n=20)
    before = snapshot(net)
    model = LinearizedModel(net)
    assert list(model.parameters()) == []
    y = torch.randint(0, 2, (20,)).double()

    def pyro_model(X, y):
        logits = model(X)
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    guide = AutoNormal(pyro_model)
    svi = SVI(pyro_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(X, y)
    assert set(pyro.get_param_store().keys()) == {
        "AutoNormal.locs.delta",
        "AutoNormal.scales.delta",
    }
    assert_unchanged(net, before)


def test_sampling_delta_inside_a_data_plate_is_an_error():
    net, X = CASES[0].build(n=6)
    model = LinearizedModel(net)
    with pytest.raises(ValueError, match=r"inside pyro.plate \['data'\].*sample_delta"):
        with pyro.plate("data", 6):
            model(X)


def test_bad_arguments_are_named():
    net, X = CASES[0].build(n=6)
    with pytest.raises(ValueError, match="variance must be positive"):
        LinearizedModel(net, variance=-1.0)
    with pytest.raises(ValueError, match=r"variance has shape \(2,\); expected a scalar"):
        LinearizedModel(net, variance=torch.ones(2))
    with pytest.raises(TypeError, match="variance must be None, a number or a tensor, got str"):
        LinearizedModel(net, variance="big")
    model = LinearizedModel(net)
    with pytest.raises(ValueError, match=r"delta has shape \(3,\); expected \(\*batch, 113\)"):
        model(X, torch.zeros(3))


def test_layer_variances_expand_per_group():
    net, X = CASES[0].build(n=6)
    lin = Linearization(net)
    var = torch.tensor([0.5, 2.0, 3.0])
    model = LinearizedModel(lin, variance=var, layer_variances=True)
    expected = lin.space.expand_group_values(var).sqrt()
    torch.testing.assert_close(model.prior_scale(), expected)
    tr = pyro.poutine.trace(model).get_trace(X)
    site = tr.nodes["delta"]
    ref = torch.distributions.Normal(0.0, expected).log_prob(site["value"]).sum()
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), ref)


@pytest.mark.parametrize(
    "likelihood, guide_cls",
    [
        ("categorical", AutoLowRankMultivariateNormal),
        ("poisson", AutoDelta),
        ("student_t", AutoNormal),
    ],
    ids=["categorical-lowrank", "poisson-delta", "student_t-normal"],
)
def test_any_likelihood_with_autoguides(likelihood, guide_cls):
    torch.manual_seed(1)
    O = 3 if likelihood == "categorical" else 1
    net = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, O))
    X = torch.randn(30, 2)
    model = LinearizedModel(net, variance=0.5)

    def likelihood_fn(f):
        if likelihood == "categorical":
            return dist.Categorical(logits=f)
        if likelihood == "poisson":
            return dist.Poisson(rate=f.exp())
        return dist.StudentT(4.0, f, 0.3)

    y = likelihood_fn(reference_output(net, X).squeeze(-1)).sample()

    def pyro_model(X, y):
        f = model(X)
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", likelihood_fn(f), obs=y)

    # the model's log joint is the dense reference's
    tr = pyro.poutine.trace(pyro_model).get_trace(X, y)
    delta = tr.nodes["delta"]["value"]
    f_ref = _reference_linearized(net, X, delta).squeeze(-1)
    ref = likelihood_fn(f_ref).log_prob(y).sum() + dist.Normal(0, 0.5**0.5).log_prob(delta).sum()
    torch.testing.assert_close(tr.log_prob_sum(), ref)

    guide = guide_cls(pyro_model)
    svi = SVI(pyro_model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(X, y) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])


def _logistic_problem(n, seed=0):
    """Last-layer linearization of a net with well-separated tanh features, labels from δ*."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3))
        net[0].bias.zero_()
    lin = Linearization(net, params=["2.weight", "2.bias"])
    X = 1.5 * torch.randn(n, 3)
    delta_true = torch.tensor([1.5, -2.0, 1.0, 0.5])
    logits = reference_output(net, X)[:, 0] + reference_jacobian(net, X, lin.space.names)[:, 0] @ (
        delta_true
    )
    y = torch.distributions.Bernoulli(logits=logits).sample()
    return net, lin, X, y, delta_true


def test_svi_recovers_known_delta_with_subsampling():
    net, lin, X, y, delta_true = _logistic_problem(1200)
    model = LinearizedModel(lin, variance=10.0)

    def pyro_model(X, y):
        delta = model.sample_delta()
        with pyro.plate("data", X.shape[0], subsample_size=300) as idx:
            pyro.sample("y", dist.Bernoulli(logits=model(X[idx], delta)), obs=y[idx])

    guide = AutoNormal(pyro_model)
    svi = SVI(pyro_model, guide, pyro.optim.ClippedAdam({"lr": 0.08, "lrd": 0.995}), Trace_ELBO())
    for _ in range(300):
        svi.step(X, y)
    loc = guide.median()["delta"].detach()
    # posterior sd ≈ 0.08-0.12 per coordinate at N = 1200: allow ~4 sd
    assert (loc - delta_true).abs().max() < 0.45, (loc, delta_true)


def test_minibatch_and_full_batch_elbo_agree_in_expectation():
    net, lin, X, y, _ = _logistic_problem(200, seed=3)
    model = LinearizedModel(lin, variance=1.0)

    def make(subsample_size):
        def pyro_model(X, y):
            delta = model.sample_delta()
            with pyro.plate("data", X.shape[0], subsample_size=subsample_size) as idx:
                pyro.sample("y", dist.Bernoulli(logits=model(X[idx], delta)), obs=y[idx])

        return pyro_model

    full, mini = make(None), make(20)

    def guide(X, y):
        loc = torch.tensor([0.3, -0.5, 0.2, 0.1])
        pyro.sample("delta", dist.Normal(loc, 0.2).to_event(1))

    elbo = Trace_ELBO(num_particles=20, vectorize_particles=True, max_plate_nesting=1)
    a = torch.tensor([elbo.loss(full, guide, X, y) for _ in range(80)])
    b = torch.tensor([elbo.loss(mini, guide, X, y) for _ in range(80)])
    se = (a.var() / len(a) + b.var() / len(b)).sqrt()
    assert b.var() > a.var()  # subsampling adds variance, not bias
    assert (a.mean() - b.mean()).abs() < 4 * se, (a.mean(), b.mean(), se)


def test_vectorised_predictive_matches_per_sample_reference():
    net, X = CASES[3].build(n=5)
    model = LinearizedModel(net, variance=0.3)

    def pyro_model(X):
        f = model(X)
        pyro.deterministic("f", f)

    pred = Predictive(pyro_model, num_samples=4, parallel=True)(X)
    delta = pred["delta"]  # (4, P)
    assert pred["f"].shape == (4, 5, 3)
    torch.testing.assert_close(pred["f"], _reference_linearized(net, X, delta))


def test_variance_can_be_learned_as_a_pyro_param():
    net, X = CASES[0].build(n=10)
    model = LinearizedModel(net)
    model.variance = PyroParam(torch.tensor(0.7), dist.constraints.positive)
    y = torch.randint(0, 2, (10,)).double()

    def pyro_model(X, y):
        f = model(X)
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=f), obs=y)

    guide = AutoNormal(pyro_model)
    svi = SVI(pyro_model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    svi.step(X, y)
    assert "variance" in pyro.get_param_store().keys()
    assert float(model.variance.detach()) != pytest.approx(0.7)
