"""The dense references themselves, against closed forms; and the package's doctests.

The references in :mod:`pyro_ntk.testing` are what every other test trusts, so they are
checked here against Jacobians known in closed form (a linear layer, and a one-hidden-layer
tanh network), with no engine code involved.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch
from networks import assert_unchanged, snapshot
from torch import nn

import pyro_ntk
from pyro_ntk.testing import reference_jacobian, reference_ntk, reference_output


def test_reference_jacobian_of_linear_layer():
    """f(x) = W x + b: ∂f_o/∂W_ij = δ_oi x_j and ∂f_o/∂b_i = δ_oi."""
    net = nn.Linear(3, 2)
    X = torch.randn(4, 3)
    J = reference_jacobian(net, X)
    eye = torch.eye(2)
    expected = torch.cat(
        [torch.einsum("oi,nj->noij", eye, X).reshape(4, 2, 6), eye.expand(4, 2, 2)], dim=-1
    )
    assert torch.equal(J, expected)
    # K(x, x') = (xᵀx' + 1) I in the sample-major layout
    K = reference_ntk(net, X)
    assert torch.allclose(K, torch.kron(X @ X.T + 1, eye), rtol=1e-14, atol=1e-14)


def test_reference_jacobian_of_tanh_network_and_params_selection():
    """f(x) = a·tanh(W x + c) + d, differentiated by hand, all and selected parameters."""
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    W, c = net[0].weight.detach(), net[0].bias.detach()
    a = net[2].weight.detach().reshape(-1)
    X = torch.randn(4, 3)
    h = torch.tanh(X @ W.T + c)  # (N, 5)
    s = a * (1 - h**2)  # ∂f/∂(W x + c)
    dW = torch.einsum("nh,nd->nhd", s, X).reshape(4, 15)
    expected = torch.cat([dW, s, h, torch.ones(4, 1)], dim=-1).unsqueeze(1)
    J = reference_jacobian(net, X)
    assert J.shape == (4, 1, 26)
    assert torch.allclose(J, expected, rtol=1e-13, atol=1e-14)
    J_last = reference_jacobian(net, X, ["2.weight", "2.bias"])
    assert torch.equal(J_last, J[..., 15 + 5 :])  # a (5) and d (1)
    J_pred = reference_jacobian(net, X, lambda name, p: name.endswith("bias"))
    assert torch.equal(J_pred, torch.cat([J[..., 15:20], J[..., 25:]], dim=-1))
    scale = torch.rand(26)
    K = reference_ntk(net, X, X[:2], scale=scale)
    assert torch.allclose(K, (expected[:, 0] * scale) @ expected[:2, 0].T, rtol=1e-13, atol=0)


def test_references_use_eval_mode_and_leave_network_alone():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    with torch.no_grad():
        net[1].running_mean.fill_(0.3)
    net.train()
    before = snapshot(net)
    X = torch.randn(5, 3)
    out = reference_output(net, X)
    assert torch.allclose(out, net.eval()(X).detach(), rtol=1e-14, atol=0)
    net.train()
    reference_jacobian(net, X)
    assert_unchanged(net, before)


# ---------------------------------------------------------------------- doctests
def _modules() -> list[str]:
    names = [pyro_ntk.__name__]
    for info in pkgutil.walk_packages(pyro_ntk.__path__, prefix="pyro_ntk."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # the command line entry point: importing it is harmless, but no doctests
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module", _modules())
def test_doctests(module):
    """Every ``>>>`` example in the package runs and prints what it claims.

    Examples run in their module's namespace with ``torch`` available (as pytest's
    ``doctest_namespace`` would provide it), after ``torch.manual_seed(0)``.
    """
    mod = importlib.import_module(module)
    torch.manual_seed(0)
    result = doctest.testmod(
        mod,
        extraglobs={"torch": torch},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} doctest(s) failed in {module}"
    )
