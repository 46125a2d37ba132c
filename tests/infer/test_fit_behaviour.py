"""``fit``'s behaviour: method choice, the unconverged warning, non-finite losses, bad input,
the progress bar, the Adam route with an autoguide, and Pyro's own ``gp.util.train``."""

from __future__ import annotations

import dataclasses

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from infer.references import negative_log_marginal, sine_net, target_task
from pyro_ntk import Linearization, LinearizedLaplace, LinearizedModel, NTKGPRegression
from pyro_ntk.infer import FitResult, fit


@pytest.fixture
def gpr():
    X, y = target_task(20)
    return NTKGPRegression(X, y, sine_net())


# ------------------------------------------------------------------ method and stopping
def test_auto_picks_lbfgs_for_an_exact_marginal_and_adam_for_an_elbo():
    X, y = target_task(15)
    exact = gp.models.GPRegression(X.squeeze(-1), y, gp.kernels.RBF(1))
    with pytest.warns(UserWarning, match="max_steps=3"):
        assert fit(exact, progress=False, max_steps=3).method == "lbfgs"
    pyro.clear_param_store()  # a second model with the same names (see test_isolation.py)
    variational = gp.models.VariationalGP(
        X.squeeze(-1), y, gp.kernels.RBF(1), likelihood=gp.likelihoods.Gaussian()
    )
    with pytest.warns(UserWarning, match="max_steps=3"):
        assert fit(variational, progress=False, max_steps=3).method == "adam"


def test_unconverged_fit_warns_with_figures_and_can_continue(gpr):
    with pytest.warns(UserWarning, match=r"max_steps=2, unconverged") as caught:
        first = fit(gpr, progress=False, max_steps=2)
    message = str(caught[0].message)
    for figure in ("relative loss change", "gradient norm", "loss", "fit(NTKGPRegression) again"):
        assert figure in message
    assert not first.converged and first.steps == len(first.losses) == 2
    second = fit(gpr, progress=False)  # continues from the values the first fit left
    assert second.converged, second.reason
    assert second.losses[0] == pytest.approx(first.losses[-1], rel=1e-12)
    assert second.losses[-1] < first.losses[-1]


def test_result_is_frozen_and_summarises(gpr):
    result = fit(gpr, progress=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.steps = 0
    assert isinstance(result, FitResult) and result.seconds > 0
    assert result.loss == result.losses[-1]
    assert "noise=" in repr(result) and "converged after" in result.summary()


def test_a_stalled_line_search_warns():
    # a kink at a = 1/3: L-BFGS cannot lower the loss there, and the gradient stays ±10
    def model():
        a = pyro.param("a", torch.tensor(0.0))
        pyro.factor("kink", -10 * (a - 1 / 3).abs())

    with pytest.warns(UserWarning, match=r"stalled after \d+ steps.*not smooth"):
        result = fit(model, guide=_no_guide, progress=False)
    assert not result.converged
    assert float(pyro.param("a").detach()) == pytest.approx(1 / 3, abs=1e-6)


# ------------------------------------------------------------------ non-finite losses
def _cliff(a):
    """Loss (a − 3)², undefined (NaN) for a > 2: the optimum lies beyond the cliff."""
    pyro.factor("pull", -(a - 3).square())
    pyro.factor("cliff", torch.sqrt(2 - a) * 0)


def _cliff_model():
    _cliff(pyro.param("a", torch.tensor(0.0)))


def _no_guide():
    pass


@pytest.mark.parametrize("method, lr", [("lbfgs", None), ("adam", 0.3)])
def test_a_loss_that_turns_nan_keeps_the_last_finite_values(method, lr):
    with pytest.warns(UserWarning, match=r"non-finite at step \d+.*restored.*a=") as caught:
        result = fit(_cliff_model, guide=_no_guide, method=method, lr=lr, progress=False)
    assert not result.converged and "non-finite" in result.reason
    a = float(pyro.param("a").detach())
    assert 0.0 < a <= 2.0  # moved towards 3, stopped at the cliff with a finite value
    assert all(map(torch.isfinite, map(torch.tensor, result.losses)))
    assert result.losses[-1] == pytest.approx(float((a - 3) ** 2), rel=1e-9)
    assert f"step {result.steps}" in str(caught[0].message)


def test_a_non_finite_start_names_the_site():
    def model():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("y", dist.Normal(loc, 1.0), obs=torch.tensor(float("inf")))

    with pytest.raises(ValueError, match=r"fit: the loss of .*model.* is .*site 'y'"):
        fit(model, guide=_no_guide, progress=False)


def test_nothing_to_fit_is_an_error_naming_the_model(gpr):
    def model():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    with pytest.raises(ValueError, match=r"fit: .*model has nothing to fit.*param sites.*none"):
        fit(model, guide=_no_guide, progress=False)
    for p in gpr.parameters():
        p.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"NTKGPRegression has nothing to fit.*'noise', 'variance'"
    ):
        fit(gpr, progress=False)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"method": "sgd"}, r"method must be one of \['auto', 'lbfgs', 'adam'\], got 'sgd'"),
        ({"lr": -1.0}, r"lr must be a finite number > 0, got -1.0"),
        ({"max_steps": 0}, r"max_steps must be an integer >= 1, got 0"),
        ({"rtol": -1e-3}, r"rtol must be a number >= 0, got -0.001"),
        ({"guide": _no_guide}, r"fits with its own guide"),
    ],
)
def test_bad_arguments_are_named(gpr, kwargs, error):
    with pytest.raises(ValueError, match=error):
        fit(gpr, progress=False, **kwargs)


def test_bad_model_arguments_are_named(gpr):
    with pytest.raises(ValueError, match=r"take no arguments.*1 positional"):
        fit(gpr, gpr.X, progress=False)
    with pytest.raises(ValueError, match=r"plain Pyro model: pass its guide"):
        fit(_cliff_model, progress=False)
    with pytest.raises(TypeError, match=r"model must be .* got int"):
        fit(3, guide=_no_guide, progress=False)
    la = LinearizedLaplace(sine_net(hidden=4), "gaussian", noise=0.1)
    X, y = target_task(10)
    with pytest.raises(ValueError, match=r"fit\(la, X, y\); got 1 positional"):
        fit(la, X, progress=False)
    with pytest.raises(ValueError, match=r"gtol does not apply to a LinearizedLaplace"):
        fit(la, X, y, gtol=1e-3, progress=False)


# ------------------------------------------------------------------ progress bar
def test_progress_false_writes_nothing_and_true_draws_a_bar(gpr, capfd):
    fit(gpr, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    fit(gpr, progress=True, desc="my fit")
    out, err = capfd.readouterr()
    assert out == "" and "my fit" in err and "loss=" in err


# ------------------------------------------------------------------ the Adam route
def test_linearized_model_with_an_autoguide_fits_by_adam():
    # y ~ N(f(X; θ*) + J δ, s²) over the last layer; with a full-rank Gaussian guide the ELBO's
    # optimum in s² is the exact marginal likelihood's (a dense reference)
    net = sine_net(hidden=4)
    X, y = target_task(40)
    params = ["2.weight", "2.bias"]
    lin = LinearizedModel(net, variance=1.0, params=params)

    def model(X, y):
        f = lin(X)
        s = pyro.param("s", torch.tensor(0.3), constraint=constraints.positive)
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(f, s), obs=y)

    guide = AutoMultivariateNormal(model, init_scale=0.01)
    result = fit(model, X, y, guide=guide, lr=0.05, progress=False)  # lr 0.05: a faster test
    assert result.method == "adam" and result.converged, result.reason
    window = 50
    assert sum(result.losses[-window:]) < sum(result.losses[:window])
    assert set(result.hyperparameters) >= {"s", "AutoMultivariateNormal.loc"}
    J = Linearization(net, params=params).jacobian(X).reshape(len(y), -1).detach()
    r = (y - net(X).squeeze(-1)).detach()
    log_s2 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_s2], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = negative_log_marginal(r, [J @ J.T], torch.ones(1), log_s2.exp())
        loss.backward()
        return loss

    opt.step(closure)
    s2, reference = float(pyro.param("s").detach()) ** 2, float(log_s2.detach().exp())
    assert reference / 1.5 < s2 < reference * 1.5, (s2, reference)


def test_autoguide_is_set_up_by_fit():
    net = sine_net(hidden=4)
    X, y = target_task(12)
    lin = LinearizedModel(net, variance=0.5)

    def model(X, y):
        f = lin(X)
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(f, 0.1), obs=y)

    guide = AutoNormal(model)
    with pytest.warns(UserWarning, match="max_steps=5"):
        result = fit(model, X, y, guide=guide, max_steps=5, progress=False)
    assert guide.prototype_trace is not None and result.steps == 5


# ------------------------------------------------------------------ Pyro's own training
def test_gp_util_train_still_works_before_and_after_fit(gpr):
    losses = gp.util.train(gpr, num_steps=20)
    assert losses[-1] < losses[0]
    fit(gpr, progress=False)
    losses = gp.util.train(gpr, num_steps=3)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
