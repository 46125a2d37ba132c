"""FisherLinearOperator: exact and finite-difference products against the dense JᵀΛJ."""

import unittest

import pytest
import torch
from linear_operator.operators import LinearOperator
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase
from networks import assert_unchanged, snapshot
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.operators.fisher import FisherLinearOperator, default_epsilon
from pyro_ntk.testing import reference_jacobian, reference_output

LIKELIHOODS = ["gaussian", "bernoulli", "categorical", "poisson"]


def _net(out: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, out)
    ).to(dtype)


def _dense_fisher(net, X, likelihood, noise=None):
    """Independent reference: per-example Jacobian loop, then Σ_n J_nᵀ Λ_n J_n with Λ built densely."""
    return _dense_fisher_at(reference_jacobian(net, X), reference_output(net, X), likelihood, noise)


def _setup(likelihood, n=12):
    O = 3 if likelihood == "categorical" else 2
    net = _net(O)
    X = torch.randn(n, 3)
    kwargs, noise = {}, None
    if likelihood == "gaussian":
        noise = 0.1 + torch.rand(n, O)  # heteroscedastic
        kwargs["noise"] = noise
    return net, X, kwargs, noise


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_exact_product_matches_dense(likelihood):
    net, X, kwargs, noise = _setup(likelihood)
    before = snapshot(net)
    lin = Linearization(net, implementation="functorch")
    F = FisherLinearOperator(X, network=lin, likelihood=likelihood, **kwargs)
    dense = _dense_fisher(net, X, likelihood, noise)
    V = torch.randn(lin.num_params, 5)
    torch.testing.assert_close(F @ V, dense @ V, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(F @ V[:, 0], dense @ V[:, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(F.to_dense(), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(F.diagonal(), dense.diagonal(), rtol=1e-10, atol=1e-10)
    assert isinstance(F, LinearOperator) and F.shape == (lin.num_params, lin.num_params)
    assert_unchanged(net, before)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_finite_difference_product_matches_dense(likelihood):
    net, X, kwargs, noise = _setup(likelihood)
    before = snapshot(net)
    lin = Linearization(net, implementation="functorch")
    F = FisherLinearOperator(
        X, network=lin, likelihood=likelihood, method="finite_difference", **kwargs
    )
    assert F.epsilon == default_epsilon(torch.float64)
    dense = _dense_fisher(net, X, likelihood, noise)
    V = torch.randn(lin.num_params, 6)
    V[:, 2] = 0.0  # a zero column stays exactly zero
    got, want = F @ V, dense @ V
    assert torch.equal(got[:, 2], torch.zeros_like(got[:, 2]))
    keep = [0, 1, 3, 4, 5]
    rel = (got[:, keep] - want[:, keep]).norm(dim=0) / want[:, keep].norm(dim=0)
    assert float(rel.max()) < 1e-5  # documented float64 tolerance (measured ≈ 1e-7)
    # the FD product is genuinely approximate: a huge step gives a visibly wrong answer
    coarse = FisherLinearOperator(
        X,
        network=lin,
        likelihood=likelihood,
        method="finite_difference",
        epsilon=1.0,
        **kwargs,
    )
    rel_coarse = (coarse @ V[:, :2] - want[:, :2]).norm(dim=0) / want[:, :2].norm(dim=0)
    assert float(rel_coarse.max()) > 1e-3
    assert_unchanged(net, before)


def test_finite_difference_float32_default_epsilon():
    net64 = _net(1)
    net32 = _net(1, torch.float32)
    X = torch.randn(20, 3)
    lin32 = Linearization(net32, implementation="functorch")
    F32 = FisherLinearOperator(X.float(), network=lin32, noise=0.5, method="finite_difference")
    assert F32.epsilon == pytest.approx(torch.finfo(torch.float32).eps ** 0.5)
    dense = _dense_fisher(net64, X, "gaussian", torch.full((20, 1), 0.5))
    V = torch.randn(lin32.num_params, 4)
    rel = (F32 @ V.float()).double().sub(dense @ V).norm(dim=0) / (dense @ V).norm(dim=0)
    assert float(rel.max()) < 1e-2  # documented float32 error ≈ 3e-3


def test_batchnorm_network_unchanged_in_train_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
    net.train()
    before = snapshot(net)
    X = torch.randn(8, 3)
    lin = Linearization(net, implementation="functorch")
    F = FisherLinearOperator(X, network=lin, method="finite_difference")
    E = FisherLinearOperator(X, network=lin)
    V = torch.randn(lin.num_params, 3)
    rel = (F @ V - E @ V).norm() / (E @ V).norm()
    assert float(rel) < 1e-5
    assert_unchanged(net, before)


def test_invalid_arguments():
    net = _net(1)
    lin = Linearization(net, implementation="functorch")
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="FisherLinearOperator: likelihood"):
        FisherLinearOperator(X, network=lin, likelihood="student")
    with pytest.raises(ValueError, match="FisherLinearOperator: method"):
        FisherLinearOperator(X, network=lin, method="lanczos")
    with pytest.raises(ValueError, match="noise applies to the gaussian"):
        FisherLinearOperator(X, network=lin, likelihood="poisson", noise=0.3)
    with pytest.raises(ValueError, match="categorical likelihood needs O >= 2"):
        FisherLinearOperator(X, network=lin, likelihood="categorical")
    with pytest.raises(ValueError, match="noise must be positive"):
        FisherLinearOperator(X, network=lin, noise=-1.0)
    with pytest.raises(ValueError, match="not broadcastable"):
        FisherLinearOperator(X, network=lin, noise=torch.ones(5))
    with pytest.raises(
        TypeError,
        match="FisherLinearOperator: network must be a torch.nn.Module or a pyro_ntk.Linearization, got Tensor",
    ):
        FisherLinearOperator(X, network=X)
    with pytest.raises(ValueError, match="epsilon"):
        FisherLinearOperator(X, network=lin, epsilon=0.0)


def _dense_fisher_at(J, f, likelihood, noise=None):
    """Σ_n J_nᵀ Λ(f_n) J_n with Λ written out densely at the given outputs f (N, O)."""
    F = torch.zeros(J.shape[-1], J.shape[-1], dtype=J.dtype)
    for n in range(J.shape[0]):
        if likelihood == "gaussian":
            Lam = torch.diag(1.0 / noise[n])
        elif likelihood == "bernoulli":
            p = 1 / (1 + torch.exp(-f[n]))
            Lam = torch.diag(p * (1 - p))
        elif likelihood == "poisson":
            Lam = torch.diag(torch.exp(f[n]))
        else:
            p = torch.exp(f[n]) / torch.exp(f[n]).sum()
            Lam = torch.diag(p) - torch.outer(p, p)
        F += J[n].T @ Lam @ J[n]
    return F


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical", "poisson"])
def test_outputs_keyword_evaluates_lambda_at_the_given_outputs(likelihood):
    net, X, kwargs, _ = _setup(likelihood)
    lin = Linearization(net, implementation="functorch")
    J = reference_jacobian(net, X)
    f = reference_output(net, X) + 0.7 * torch.randn(X.shape[0], J.shape[1])
    F = FisherLinearOperator(X, network=lin, likelihood=likelihood, outputs=f)
    dense = _dense_fisher_at(J, f, likelihood)
    assert not torch.allclose(dense, _dense_fisher(net, X, likelihood), atol=1e-6)
    V = torch.randn(lin.num_params, 4)
    torch.testing.assert_close(F.to_dense(), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(F._matmul(V), dense @ V, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(F._diagonal(), dense.diagonal(), rtol=1e-10, atol=1e-10)


def test_outputs_keyword_bad_input_is_named():
    net, X, _, _ = _setup("categorical")
    lin = Linearization(net)
    with pytest.raises(ValueError, match=r"outputs must be finite with shape \(N, O\)"):
        FisherLinearOperator(X, network=lin, likelihood="categorical", outputs=X[:, :2])
    with pytest.raises(TypeError, match="outputs must be a tensor"):
        FisherLinearOperator(X, network=lin, likelihood="categorical", outputs=[1.0])
    with pytest.raises(ValueError, match="outputs= needs method='exact'"):
        FisherLinearOperator(
            X, network=lin, likelihood="categorical", method="finite_difference",
            outputs=torch.zeros(X.shape[0], 3),
        )  # fmt: skip


# ----------------------------------------------------------------------------- mixins
class _FisherMixin:
    # Well conditioned (see test_mixin_cases_are_well_conditioned): N·O = 80 > P = 12 and a
    # full-rank F (condition number ≈ 150), so solves, SLQ log-determinants and
    # eigendecompositions are sound. The Gaussian noise is F's one differentiable tensor, so
    # the mixins' backward passes check ∂F/∂s² against the dense reference.
    seed = 0
    method = "exact"

    def create_linear_op(self):
        torch.manual_seed(5)
        net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).double()
        X = 2 * torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        return FisherLinearOperator(
            X,
            network=Linearization(net, implementation="functorch"),
            noise=0.5,
            method=self.method,
        )

    def evaluate_linear_op(self, linear_op):
        net = linear_op.linearization.network
        with torch.enable_grad():  # the reference differentiates the network (mixins: no_grad)
            dense = _dense_fisher(net, linear_op.X, "gaussian", linear_op.noise)
        return dense.expand(*linear_op.batch_shape, *dense.shape)


class TestFisherLinearOperator(_FisherMixin, LinearOperatorTestCase, unittest.TestCase):
    pass


class TestFisherLinearOperatorFiniteDifference(
    _FisherMixin, LinearOperatorTestCase, unittest.TestCase
):
    method = "finite_difference"


def test_mixin_cases_are_well_conditioned():
    for mixin in (TestFisherLinearOperator, TestFisherLinearOperatorFiniteDifference):
        op = mixin.create_linear_op(mixin())
        eig = torch.linalg.eigvalsh(op.to_dense())
        assert float(eig.min()) > 0.1 and float(eig.max() / eig.min()) < 1e3


def test_batched_right_hand_sides_fold_into_columns():
    net, X, kwargs, noise = _setup("bernoulli")
    lin = Linearization(net, implementation="functorch")
    for method in ("exact", "finite_difference"):
        F = FisherLinearOperator(X, network=lin, likelihood="bernoulli", method=method)
        V = torch.randn(2, 3, lin.num_params, 4)
        flat = F @ V.permute(2, 0, 1, 3).reshape(lin.num_params, -1)
        torch.testing.assert_close(F @ V, flat.reshape(lin.num_params, 2, 3, 4).permute(1, 2, 0, 3))
        rows = torch.tensor([3, 0, 7])
        dense = F.to_dense()
        torch.testing.assert_close(F[rows].to_dense(), (F @ torch.eye(lin.num_params))[rows])
        torch.testing.assert_close(F[rows, rows], dense[rows, rows], rtol=1e-5, atol=1e-8)
