"""Pyro's global param store never hands one model's values to another through ``fit``."""

from __future__ import annotations

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from infer.references import sine_net, target_task
from pyro_ntk import LinearizedModel, NTKGPRegression
from pyro_ntk.infer import fit

STALE = "param store held 'noise' = .*'variance' = .* under the parameter names of NTKGPRegression"


def _second_task():
    X, y = target_task(25, seed=7)
    return X, 0.3 * y  # another scale: another optimum


def test_pyro_shares_parameters_by_name():
    # the mechanism fit guards against: the second model's first Pyro call replaces its own
    # parameter with the store's tensor of the same name (pyro.nn.PyroModule.__getattr__)
    X, y = target_task(15)
    m1 = gp.models.GPRegression(X.squeeze(-1), y, gp.kernels.RBF(1), noise=torch.tensor(0.5))
    gp.util.train(m1, num_steps=5)
    m2 = gp.models.GPRegression(X.squeeze(-1), y, gp.kernels.RBF(1), noise=torch.tensor(2.0))
    gp.util.train(m2, num_steps=1)
    assert m2.noise_unconstrained is m1.noise_unconstrained


def test_a_second_model_fits_its_own_values():
    net = sine_net()
    X1, y1 = target_task(25)
    m1 = NTKGPRegression(X1, y1, net)
    fit(m1, progress=False)
    mean1, _ = m1(X1)  # a Pyro call: the store now holds m1's tensors under "noise", "variance"
    noise1 = float(m1.noise.detach())
    tensor1 = m1.noise_unconstrained

    X2, y2 = _second_task()
    m2 = NTKGPRegression(X2, y2, net)
    with pytest.warns(UserWarning, match=STALE):
        result = fit(m2, progress=False)

    # the first model is untouched: same tensor, same value, same predictions
    assert m1.noise_unconstrained is tensor1 and m2.noise_unconstrained is not tensor1
    torch.testing.assert_close(m2.noise_unconstrained.new_tensor(noise1), m1.noise.detach())
    # the second model reached what it reaches alone, in an empty store
    pyro.clear_param_store()
    alone = NTKGPRegression(X2, y2, net)
    expected = fit(alone, progress=False)
    assert result.losses == pytest.approx(expected.losses, rel=1e-10)
    for name, value in expected.hyperparameters.items():
        torch.testing.assert_close(result.hyperparameters[name], value)
    assert abs(float(m2.noise.detach()) - noise1) > 1e-3 * noise1  # distinct optima


def test_the_fitted_model_predicts_with_its_own_values():
    net = sine_net()
    X1, y1 = target_task(25)
    m1 = NTKGPRegression(X1, y1, net)
    fit(m1, progress=False)
    m1(X1)
    X2, y2 = _second_task()
    m2 = NTKGPRegression(X2, y2, net)
    with pytest.warns(UserWarning, match=STALE):
        fit(m2, progress=False)
    mean2, var2 = m2(X2)  # reads the store: it must hold m2's values now
    pyro.clear_param_store()
    alone = NTKGPRegression(X2, y2, net)
    fit(alone, progress=False)
    mean, var = alone(X2)
    torch.testing.assert_close(mean2, mean)
    torch.testing.assert_close(var2, var)


def test_a_model_called_before_fit_gets_its_own_copy():
    net = sine_net()
    X1, y1 = target_task(25)
    m1 = NTKGPRegression(X1, y1, net)
    fit(m1, progress=False)
    m1(X1)
    noise1 = m1.noise.detach().clone()
    X2, y2 = _second_task()
    m2 = NTKGPRegression(X2, y2, net)
    m2(X2)  # Pyro hands m2 the tensors of m1 here
    assert m2.noise_unconstrained is m1.noise_unconstrained
    with pytest.warns(UserWarning, match=r"holds the same parameter tensors as another module"):
        fit(m2, progress=False)
    assert m2.noise_unconstrained is not m1.noise_unconstrained
    torch.testing.assert_close(m1.noise.detach(), noise1)  # the fit of m2 did not move m1


def test_a_second_autoguide_starts_from_its_own_values():
    net = sine_net(hidden=4)
    X, y = target_task(12)

    def fitted_guide(scale):
        lin = LinearizedModel(net, variance=0.5)

        def model(X, y):
            f = lin(X)
            with pyro.plate("data", X.shape[0]):
                pyro.sample("y", dist.Normal(f, 0.1), obs=scale * y)

        guide = AutoNormal(model)
        return model, guide

    model1, guide1 = fitted_guide(1.0)
    with pytest.warns(UserWarning, match="max_steps=30"):
        fit(model1, X, y, guide=guide1, max_steps=30, progress=False)
    locs1 = guide1.locs.delta_unconstrained.detach().clone()
    model2, guide2 = fitted_guide(-1.0)
    with pytest.warns(UserWarning) as caught:
        fit(model2, X, y, guide=guide2, max_steps=30, progress=False)
    assert any("AutoNormal.locs.delta" in str(w.message) for w in caught)
    torch.testing.assert_close(guide1.locs.delta_unconstrained.detach(), locs1)
    assert guide2.locs.delta_unconstrained is not guide1.locs.delta_unconstrained


def test_module_local_params_need_no_isolation():
    net = sine_net()
    with pyro.settings.context(module_local_params=True):
        m1 = NTKGPRegression(*target_task(25), net)
        m2 = NTKGPRegression(*_second_task(), net)
        r1 = fit(m1, progress=False)  # no warning: Pyro keeps the parameters local
        r2 = fit(m2, progress=False)
    assert r1.converged and r2.converged
    assert m1.noise_unconstrained is not m2.noise_unconstrained
    assert float(r1.hyperparameters["noise"]) != pytest.approx(float(r2.hyperparameters["noise"]))
