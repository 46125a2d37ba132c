"""``fit`` reaches the exact optimum of independent dense float64 references."""

from __future__ import annotations

import pyro.contrib.gp as gp
import pytest
import torch

from infer.references import (
    layer_kernels,
    maximise_marginal,
    negative_log_marginal,
    sine_net,
    target_task,
)
from pyro_ntk import Linearization, LinearizedLaplace, NTKGPRegression
from pyro_ntk.infer import fit
from pyro_ntk.options import SolverOptions


def _residual(net, X, y):
    return (y - net(X).squeeze(-1)).detach()


def test_ntk_gp_regression_reaches_the_dense_optimum():
    net = sine_net()
    X, y = target_task(40)
    gpr = NTKGPRegression(X, y, net)
    result = fit(gpr, progress=False)
    assert result.method == "lbfgs" and result.converged, result.reason
    assert result.steps == len(result.losses) and result.losses[-1] < result.losses[0]
    K = Linearization(net).ntk_dense(X).detach()
    loss, noise, variance = maximise_marginal(_residual(net, X, y), [K], jitter=gpr.jitter)
    assert result.losses[-1] == pytest.approx(loss, rel=1e-3)
    assert float(result.hyperparameters["noise"]) == pytest.approx(noise, rel=0.02)
    assert float(result.hyperparameters["variance"]) == pytest.approx(float(variance), rel=0.02)
    # the model holds the fitted values, and its loss at them is the last recorded loss
    assert float(gpr.noise.detach()) == pytest.approx(noise, rel=0.02)


def test_per_layer_variances_reach_the_dense_optimum():
    net = sine_net(hidden=8, inputs=2)
    g = torch.Generator().manual_seed(3)
    X = (4 * torch.rand(30, 2, generator=g) - 2).double()
    y = torch.sin(X[:, 0] + 0.3) * torch.cos(X[:, 1]) + 0.1 * torch.randn(30, generator=g).double()
    gpr = NTKGPRegression(X, y, net, layer_variances=True)
    result = fit(gpr, progress=False)
    assert result.converged, result.reason
    kernels = layer_kernels(net, X)
    loss, noise, variances = maximise_marginal(_residual(net, X, y), kernels, jitter=gpr.jitter)
    assert result.losses[-1] == pytest.approx(loss, rel=1e-3)
    assert float(result.hyperparameters["noise"]) == pytest.approx(noise, rel=0.02)
    fitted = result.hyperparameters["variance"]
    # a layer the data do not need goes to ~0 in both; compare on the kernel's scale
    torch.testing.assert_close(fitted, variances, rtol=0.02, atol=1e-3 * float(variances.max()))


def test_pyro_gp_regression_with_rbf_reaches_the_dense_optimum():
    X, y = target_task(40)
    model = gp.models.GPRegression(X.squeeze(-1), y, gp.kernels.RBF(1), noise=torch.tensor(0.5))
    result = fit(model, progress=False)
    assert result.method == "lbfgs" and result.converged, result.reason
    fitted = {k: float(v) for k, v in result.hyperparameters.items()}

    x = X.squeeze(-1)
    log_params = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # s², σ², ℓ
    opt = torch.optim.LBFGS(
        [log_params], max_iter=1000, tolerance_grad=1e-12, tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        s2, v, ell = log_params.exp()
        K = torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / ell**2)
        loss = negative_log_marginal(y, [K], v.reshape(1), s2 + model.jitter)
        loss.backward()
        return loss

    opt.step(closure)
    s2, v, ell = log_params.detach().exp().tolist()
    assert result.losses[-1] == pytest.approx(float(closure().detach()), rel=1e-3)
    assert fitted["noise"] == pytest.approx(s2, rel=0.02)
    assert fitted["kernel.variance"] == pytest.approx(v, rel=0.02)
    assert fitted["kernel.lengthscale"] == pytest.approx(ell, rel=0.02)


def test_known_noise_is_recovered():
    # 200 points drawn from the linearized network itself, true s² = 0.04
    net = sine_net()
    g = torch.Generator().manual_seed(5)
    X = (6 * torch.rand(200, 1, generator=g) - 3).double()
    lin = Linearization(net)
    delta = 0.3 * torch.randn(lin.num_params, 1, generator=g).double()
    with torch.no_grad():
        f = lin(X).squeeze(-1) + lin.jvp(X, delta).reshape(-1)
    y = f + 0.2 * torch.randn(200, generator=g).double()
    gpr = NTKGPRegression(X, y, net)
    result = fit(gpr, progress=False)
    assert result.converged, result.reason
    noise = float(result.hyperparameters["noise"])
    K = lin.ntk_dense(X).detach()
    _, reference, _ = maximise_marginal(_residual(net, X, y), [K], jitter=gpr.jitter)
    assert noise == pytest.approx(reference, rel=0.02)
    assert noise == pytest.approx(0.04, rel=0.3)  # the ML estimate's spread is ~10 % at N = 200


def test_laplace_evidence_matches_the_exact_gaussian_marginal():
    # a Gaussian likelihood makes the Laplace evidence exact: the GP marginal with fixed noise
    net = sine_net(hidden=6)
    X, y = target_task(25)
    la = LinearizedLaplace(net, "gaussian", noise=0.01, method="dense")
    result = fit(la, X, y, progress=False)
    assert result.converged, result.reason
    assert result.method == "adam" and result.losses[-1] < result.losses[0]
    K = Linearization(net).ntk_dense(X).detach()
    r = _residual(net, X, y)
    log_v = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_v], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = negative_log_marginal(r, [K], log_v.exp(), torch.tensor(0.01))
        loss.backward()
        return loss

    opt.step(closure)
    assert result.losses[-1] == pytest.approx(float(closure().detach()), rel=1e-3)
    assert float(result.hyperparameters["variance"]) == pytest.approx(
        float(log_v.detach().exp()), rel=0.02
    )
    assert float(la.variance) == pytest.approx(float(result.hyperparameters["variance"]))


def test_the_cg_route_settles_at_the_dense_optimum():
    # the CG route's log-determinant gradient is a stochastic estimate: fit stops when the
    # loss settles, and still lands on the exact optimum
    net = sine_net()
    X, y = target_task(50)
    gpr = NTKGPRegression(X, y, net, options=SolverOptions(solver="cg"))
    result = fit(gpr, progress=False)
    assert result.converged and "settled" in result.reason, result.reason
    K = Linearization(net).ntk_dense(X).detach()
    loss, noise, variance = maximise_marginal(_residual(net, X, y), [K], jitter=gpr.jitter)
    assert result.losses[-1] == pytest.approx(loss, rel=1e-3)
    assert float(result.hyperparameters["noise"]) == pytest.approx(noise, rel=0.02)
    assert float(result.hyperparameters["variance"]) == pytest.approx(float(variance), rel=0.02)
