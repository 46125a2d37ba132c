"""NetworkMean: f(x; θ*) as a pyro.contrib.gp mean function."""

import pyro
import pyro.contrib.gp as gp
import pytest
import torch
from networks import CASE_IDS, CASES, assert_unchanged, snapshot
from torch import nn

from pyro_ntk import EmpiricalNTK, NetworkMean
from pyro_ntk.testing import reference_output

TOL = dict(rtol=1e-12, atol=1e-12)


def mlp(d_in=2, d_out=1):
    return nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, d_out))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_values_and_shapes(case):
    net, X = case.build(n=5)
    net.train()  # the mean must still use eval mode (BatchNorm running statistics)
    before = snapshot(net)
    ref = reference_output(net, X)
    O = ref.shape[1]
    mean = NetworkMean(net)
    out = mean(X)
    if O == 1:
        assert out.shape == (5,)
        torch.testing.assert_close(out, ref[:, 0], **TOL)
    else:
        assert out.shape == (O, 5)  # latent_shape + (N,), as Pyro's f_loc
        torch.testing.assert_close(out, ref.T, **TOL)
    torch.testing.assert_close(NetworkMean(net, output=O - 1)(X), ref[:, O - 1], **TOL)
    assert not out.requires_grad
    assert list(mean.parameters()) == []
    assert_unchanged(net, before)


def test_theta_star_is_copied_at_construction():
    net = mlp()
    X = torch.randn(4, 2)
    mean = NetworkMean(net)
    expected = reference_output(net, X)[:, 0]
    with torch.no_grad():
        net[2].bias.add_(1.0)
    torch.testing.assert_close(mean(X), expected, **TOL)


def test_frozen_network_and_one_dimensional_inputs():
    net = mlp(d_in=1)
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(6)
    torch.testing.assert_close(
        NetworkMean(net)(x), reference_output(net, x.unsqueeze(1))[:, 0], **TOL
    )


def test_in_gpregression_the_mean_is_the_network_where_there_is_no_data():
    pyro.clear_param_store()
    net = mlp()
    X = torch.randn(8, 2)
    y = torch.randn(8)
    gpr = gp.models.GPRegression(
        X, y, EmpiricalNTK(net, variance=1e-8), mean_function=NetworkMean(net)
    )
    assert sorted(n for n, _ in gpr.named_parameters()) == [
        "kernel.variance_unconstrained",
        "noise_unconstrained",
    ]
    # with a negligible prior variance the posterior mean is the prior mean f(x; θ*)
    Xs = torch.randn(5, 2)
    mean, _ = gpr(Xs)
    torch.testing.assert_close(mean.detach(), reference_output(net, Xs)[:, 0], rtol=1e-6, atol=1e-6)
    pyro.clear_param_store()


def test_bad_input():
    net = mlp(d_out=2)
    with pytest.raises(
        ValueError, match=r"NetworkMean: output=2 is out of range; the network has 2"
    ):
        NetworkMean(net, output=2)(torch.randn(3, 2))
    with pytest.raises(ValueError, match="NetworkMean: output must be None or a non-negative int"):
        NetworkMean(net, output=-1)
    X = torch.randn(3, 2)
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NetworkMean: X contains 1 NaN or infinite"):
        NetworkMean(net)(X)
    with pytest.raises(ValueError, match=r"NetworkMean: X has shape \(3, 4\)"):
        NetworkMean(net)(torch.randn(3, 4))
    with pytest.raises(TypeError, match="NetworkMean: network must be a torch.nn.Module"):
        NetworkMean(None)


def test_kernel_and_mean_built_from_one_linearization_share_theta():
    import pyro_ntk

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    ).double()
    lin = pyro_ntk.Linearization(net)
    kernel = pyro_ntk.EmpiricalNTK(lin, input_dim=2)
    mean = pyro_ntk.NetworkMean(lin)
    gk = pyro_ntk.NTKKernel(lin)
    assert kernel.linearization is lin and mean._lin is lin and gk.linearization is lin
    X = torch.randn(5, 2, dtype=torch.float64)
    ref_k = pyro_ntk.EmpiricalNTK(net, input_dim=2)(X)
    torch.testing.assert_close(kernel(X), ref_k, rtol=0, atol=0)
    torch.testing.assert_close(mean(X), net(X).squeeze(-1).detach())
    with pytest.raises(ValueError, match="output=0 needs the nn.Module"):
        pyro_ntk.EmpiricalNTK(lin, input_dim=2, output=0)
    with pytest.raises(TypeError, match="torch.nn.Module or a pyro_ntk.Linearization"):
        pyro_ntk.NetworkMean("net")
