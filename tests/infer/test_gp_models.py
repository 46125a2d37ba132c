"""Pyro GP models with an NTK kernel under ``fit``: fixed inducing points, data-aware σ²."""

from __future__ import annotations

import warnings

import pyro.contrib.gp as gp
import pytest
import torch

from infer.references import sine_net, target_task
from pyro_ntk import EmpiricalNTK, Linearization, NetworkMean
from pyro_ntk.gp import initial_hyperparameters
from pyro_ntk.infer import fit


def _sparse(cls, net, X, y):
    Xu = X[::4].clone()
    kernel = EmpiricalNTK(net)
    if cls is gp.models.SparseGPRegression:
        return cls(X, y, kernel, Xu, noise=torch.tensor(0.1), mean_function=NetworkMean(net))
    return cls(X, y, kernel, Xu, gp.likelihoods.Gaussian(), mean_function=NetworkMean(net))


@pytest.mark.parametrize(
    "cls, steps", [(gp.models.SparseGPRegression, None), (gp.models.VariationalSparseGP, 20)]
)
def test_sparse_models_warn_once_that_inducing_points_stay_fixed(cls, steps):
    net = sine_net()
    X, y = target_task(24)
    model = _sparse(cls, net, X, y)
    Xu = model.Xu.detach().clone()
    with pytest.warns(UserWarning) as caught:
        result = fit(model, max_steps=steps, progress=False)
    sparse = [w for w in caught if "inducing points Xu (shape (6, 1)) stay fixed" in str(w.message)]
    assert len(sparse) == 1 and cls.__name__ in str(sparse[0].message)
    assert result.method == ("lbfgs" if steps is None else "adam")
    assert result.losses[-1] < result.losses[0]
    torch.testing.assert_close(model.Xu.detach(), Xu, rtol=0, atol=0)
    assert model.Xu.requires_grad  # restored after the fit
    with warnings.catch_warnings(record=True) as again:  # once per model
        warnings.simplefilter("always")
        fit(model, max_steps=steps, progress=False)
    assert not [w for w in again if "inducing points" in str(w.message)]


def test_an_ntk_kernel_without_a_variance_starts_from_the_data():
    net = sine_net()
    X, y = target_task(30)
    kernel = EmpiricalNTK(net)
    kernel.variance_given = False  # as built with variance=None
    model = gp.models.GPRegression(X, y, kernel, mean_function=NetworkMean(net))
    noise = model.noise.detach().clone()
    with pytest.warns(UserWarning, match="max_steps=1"):
        fit(model, max_steps=1, progress=False)  # one evaluation, no update
    r = y - net(X).squeeze(-1).detach()
    diag = Linearization(net).ntk_diag(X).reshape(-1)
    _, expected = initial_hyperparameters(r, diag)
    assert float(kernel.variance.detach()) == pytest.approx(expected, rel=1e-10)
    assert kernel.variance_given  # a second fit continues from the fitted value
    torch.testing.assert_close(model.noise.detach(), noise)  # Pyro's noise is left alone
    result = fit(model, progress=False)
    assert result.converged, result.reason


def test_a_given_variance_is_kept():
    net = sine_net()
    X, y = target_task(30)
    kernel = EmpiricalNTK(net, variance=3.0)
    model = gp.models.GPRegression(X, y, kernel, mean_function=NetworkMean(net))
    with pytest.warns(UserWarning, match="max_steps=1"):
        fit(model, max_steps=1, progress=False)
    assert float(kernel.variance.detach()) == pytest.approx(3.0)
