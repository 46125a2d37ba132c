"""Every operator takes ``network: nn.Module | Linearization``: a module gives the same operator.

Built from the module (with ``params`` and ``chunk_size``) or from a ``Linearization`` of it,
each operator has the same products, and both equal the dense float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import DiagLinearOperator
from networks import assert_unchanged, snapshot
from torch import nn

from pyro_ntk import (
    FisherLinearOperator,
    JacobianLinearOperator,
    Linearization,
    NTKLinearOperator,
)
from pyro_ntk.testing import reference_jacobian, reference_ntk

LAST = ["2.weight", "2.bias"]


def _problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    return net, torch.randn(7, 3), torch.randn(5, 3)


def test_ntk_operator_from_a_module_equals_the_one_from_its_linearization():
    net, X1, X2 = _problem()
    before = snapshot(net)
    variance = torch.tensor([0.5, 2.0])
    A = NTKLinearOperator(X1, X2, variance, network=net, chunk_size=3)
    B = NTKLinearOperator(X1, X2, variance, network=Linearization(net, chunk_size=3))
    assert isinstance(A.linearization, Linearization) and A.linearization.chunk_size == 3
    V = torch.randn(10, 4)
    torch.testing.assert_close(A @ V, B @ V, rtol=1e-12, atol=1e-12)
    scale = torch.cat([torch.full((24,), 0.5), torch.full((14,), 2.0)])
    dense = reference_ntk(net, X1, X2, scale=scale)
    torch.testing.assert_close(A.to_dense(), dense, rtol=1e-10, atol=1e-12)
    # linear_operator rebuilds the operator from its arguments: the module is not kept
    sym = NTKLinearOperator(X1, variance=1.5, network=net)
    K = (sym + DiagLinearOperator(torch.full((14,), 0.1))).clone()
    b = torch.randn(14)
    ref = 1.5 * reference_ntk(net, X1) + 0.1 * torch.eye(14)
    torch.testing.assert_close(K.solve(b), torch.linalg.solve(ref, b), rtol=1e-8, atol=1e-10)
    assert_unchanged(net, before)


def test_jacobian_operator_from_a_module_takes_params():
    net, X, _ = _problem()
    J = JacobianLinearOperator(X, network=net, params=LAST)
    Jl = JacobianLinearOperator(X, network=Linearization(net, params=LAST))
    assert J.shape == Jl.shape == (14, 14)
    v = torch.randn(14, 3)
    torch.testing.assert_close(J @ v, Jl @ v, rtol=1e-12, atol=1e-12)
    ref = reference_jacobian(net, X, LAST).reshape(14, -1)
    torch.testing.assert_close(J.to_dense(), ref, rtol=1e-10, atol=1e-12)
    u = torch.randn(14)
    torch.testing.assert_close(J.mT @ u, ref.T @ u, rtol=1e-10, atol=1e-12)


def test_fisher_operator_from_a_module_equals_the_one_from_its_linearization():
    net, X, _ = _problem()
    F = FisherLinearOperator(X, network=net, likelihood="categorical", chunk_size=2)
    Fl = FisherLinearOperator(X, network=Linearization(net), likelihood="categorical")
    v = torch.randn(F.shape[-1], 2)
    torch.testing.assert_close(F @ v, Fl @ v, rtol=1e-10, atol=1e-12)
    J = reference_jacobian(net, X)
    p = torch.softmax(net(X), -1).detach()
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    dense = torch.einsum("nop,noq,nqr->pr", J, Lam, J)
    torch.testing.assert_close(F.to_dense(), dense, rtol=1e-10, atol=1e-12)


BUILDERS = {
    "NTKLinearOperator": lambda X, **kw: NTKLinearOperator(X, **kw),
    "JacobianLinearOperator": lambda X, **kw: JacobianLinearOperator(X, **kw),
    "FisherLinearOperator": lambda X, **kw: FisherLinearOperator(X, **kw),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_wrong_network_is_named(name):
    net, X, _ = _problem()
    with pytest.raises(
        TypeError,
        match=f"{name}: network must be a torch.nn.Module or a pyro_ntk.Linearization, got str",
    ):
        BUILDERS[name](X, network="net")
    with pytest.raises(ValueError, match=f"{name}: params and chunk_size must be None"):
        BUILDERS[name](X, network=Linearization(net), params=LAST)
