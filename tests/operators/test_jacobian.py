"""JacobianLinearOperator against dense float64 references and linear_operator's mixin."""

from __future__ import annotations

import unittest

import pytest
import torch
from linear_operator.operators import DenseLinearOperator
from linear_operator.test.linear_operator_test_case import RectangularLinearOperatorTestCase
from networks import CASE_IDS, CASES, assert_unchanged, snapshot
from torch import nn

from pyro_ntk import JacobianLinearOperator, Linearization
from pyro_ntk.testing import reference_jacobian

RTOL = 1e-8


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype
    err = float((actual - expected).norm())
    assert err <= rtol * float(expected.norm()), (err, float(expected.norm()))


def dense_jacobian(op: JacobianLinearOperator) -> torch.Tensor:
    lin = op.linearization
    with torch.enable_grad():  # the reference differentiates (mixins may call us in no_grad)
        J = reference_jacobian(lin.network, op.X, params=list(lin.space.names))
    J = J.reshape(-1, J.shape[-1])
    return J.expand(*op.batch_shape, *J.shape)


class TestJacobianLinearOperator(RectangularLinearOperatorTestCase, unittest.TestCase):
    seed = 0

    def create_linear_op(self):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        X = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
        return JacobianLinearOperator(X, network=Linearization(net, implementation="functorch"))

    def evaluate_linear_op(self, linear_op):
        return dense_jacobian(linear_op)

    # J has no differentiable tensor (X is data, detached), so the mixin's backward pass would
    # have nothing to differentiate: let the right/left-hand side carry the graph. The values
    # are checked as in the mixin; the gradient that then flows (to the rhs, through J's
    # transpose) is compared with the dense one by test_gradient_flows_to_rhs below.
    def _test_matmul(self, rhs):
        return super()._test_matmul(rhs.requires_grad_(True))

    def _test_rmatmul(self, lhs):
        return super()._test_rmatmul(lhs.requires_grad_(True))


class TestJacobianTransposeLinearOperator(TestJacobianLinearOperator):
    """The same mixin on Jᵀ (the operator that J's transpose and rmatmul go through)."""

    def create_linear_op(self):
        return super().create_linear_op().mT

    def evaluate_linear_op(self, linear_op):
        return dense_jacobian(linear_op.mT).mT


# ----------------------------------------------------------------------------- the zoo
@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    net, X = request.param.build(n=4)
    before = snapshot(net)
    lin = Linearization(net, request.param.params, implementation="functorch")
    J = JacobianLinearOperator(X, network=lin)
    ref = reference_jacobian(net, X, request.param.params)
    yield J, ref.reshape(-1, ref.shape[-1]), net
    assert_unchanged(net, before)


def test_shape_and_to_dense(case):
    J, ref, _ = case
    assert J.shape == ref.shape
    assert_rel(J.to_dense(), ref)


def test_matmul(case):
    J, ref, _ = case
    V = torch.randn(2, ref.shape[1], 3)  # batch dims fold into columns
    assert_rel(J @ V, ref @ V)
    v = torch.randn(ref.shape[1])
    assert_rel(J @ v, ref @ v)


def test_transpose_matmul(case):
    J, ref, _ = case
    U = torch.randn(ref.shape[0], 3)
    assert_rel(J._t_matmul(U), ref.T @ U)
    assert_rel(J.mT @ U, ref.T @ U)
    assert_rel(U.T @ J, U.T @ ref)


def test_adjoint(case):
    J, ref, _ = case
    v, u = torch.randn(ref.shape[1]), torch.randn(ref.shape[0])
    lhs, rhs = torch.dot(J @ v, u), torch.dot(v, J.mT @ u)
    assert abs(float(lhs - rhs)) <= RTOL * (float(lhs.abs()) + 1e-12)


def test_rows_columns_and_entries(case):
    J, ref, _ = case
    rows = torch.tensor([ref.shape[0] - 1, 0, 1, 1])
    assert_rel(J[rows].to_dense(), ref[rows])
    cols = torch.tensor([0, ref.shape[1] - 1, 2])
    assert_rel(J[:, cols].to_dense(), ref[:, cols])
    assert_rel(J[rows, cols[:1].expand(4)], ref[rows, cols[:1].expand(4)])
    assert_rel(J[1:3].to_dense(), ref[1:3])


def test_gradient_flows_to_rhs(case):
    J, ref, _ = case
    V = torch.randn(ref.shape[1], 2, requires_grad=True)
    G = torch.randn(ref.shape[0], 2)
    (grad,) = torch.autograd.grad(((J @ V) * G).sum(), V)
    assert_rel(grad, ref.T @ G)


# ----------------------------------------------------------------------------- specifics
def _small():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    return net, torch.randn(4, 3)


def test_whole_example_slices_stay_lazy():
    net, X = _small()
    J = JacobianLinearOperator(X, network=Linearization(net))
    sub = J[2:6]  # examples 1 and 2 (O = 2)
    assert isinstance(sub, JacobianLinearOperator)
    assert torch.equal(sub.X, X[1:3])
    assert isinstance(J[1:5], DenseLinearOperator)  # not aligned to examples


def test_dtype_conversion_copies_the_network():
    net, X = _small()
    before = snapshot(net)
    lin = Linearization(net)
    J = JacobianLinearOperator(X, network=lin)
    Jf = J.float()
    assert Jf.dtype == torch.float32 and Jf.linearization.dtype == torch.float32
    assert Jf.linearization.network is not net
    torch.testing.assert_close(Jf.to_dense(), J.to_dense().float(), rtol=1e-5, atol=1e-6)
    assert Jf.double().linearization is lin  # back to the original, no precision lost
    assert J.to(torch.float32).linearization is Jf.linearization  # cached conversion
    assert J.to(torch.float64).linearization is lin
    assert_unchanged(net, before)


def test_conversion_uses_theta_star_not_the_current_weights():
    net, X = _small()
    lin = Linearization(net)
    expected = lin.jacobian(X)
    with torch.no_grad():
        net[0].weight.add_(1.0)  # the user keeps training after linearizing
    converted = lin.to(torch.float32)
    torch.testing.assert_close(
        converted.jacobian(X.float()), expected.float(), rtol=1e-5, atol=1e-6
    )


def test_bad_input():
    net, X = _small()
    lin = Linearization(net)
    with pytest.raises(
        TypeError,
        match="JacobianLinearOperator: network must be a torch.nn.Module or a pyro_ntk.Linearization, got Tensor",
    ):
        JacobianLinearOperator(X, network=X)
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        JacobianLinearOperator(X.tolist(), network=lin)
    with pytest.raises(TypeError, match="dtype"):
        JacobianLinearOperator(X.float(), network=lin)
    with pytest.raises(ValueError, match="feature shape"):
        JacobianLinearOperator(torch.randn(4, 7), network=lin)
    J = JacobianLinearOperator(X, network=lin)
    with pytest.raises((ValueError, RuntimeError)):
        J @ torch.randn(J.shape[1] + 1, 2)
    with pytest.raises(TypeError, match="floating-point"):
        lin.to(torch.int64)


def test_converted_copies_are_released_with_the_original():
    import gc
    import weakref

    net, X = _small()
    lin = Linearization(net)
    converted = weakref.ref(lin.to(torch.float32))
    assert converted() is not None  # cached while the original lives
    del lin
    gc.collect()
    assert converted() is None
