"""NTKLinearOperator against dense float64 references and linear_operator's test mixins."""

from __future__ import annotations

import unittest

import linear_operator
import pytest
import torch
from linear_operator.operators import (
    AddedDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    RootLinearOperator,
)
from linear_operator.test.linear_operator_test_case import (
    LinearOperatorTestCase,
    RectangularLinearOperatorTestCase,
)
from networks import CASE_IDS, CASES, assert_unchanged, snapshot
from torch import nn

from pyro_ntk import Linearization, NTKImplementation, NTKLinearOperator
from pyro_ntk.testing import reference_ntk


def reference_scale(net: nn.Module, variance: torch.Tensor, params=None) -> torch.Tensor:
    """σ² per parameter (P,), grouped by owning module, built independently of the engine."""
    named = [
        (n, p)
        for n, p in net.named_parameters()
        if (p.requires_grad if params is None else n in params)
    ]
    groups: list[str] = []
    pieces = []
    for n, p in named:
        g = n.rsplit(".", 1)[0] if "." in n else ""
        if g not in groups:
            groups.append(g)
        v = variance if variance.dim() == 0 else variance[groups.index(g)]
        pieces.append(v.expand(p.numel()))
    return torch.cat(pieces)


def reference_for(op: NTKLinearOperator) -> torch.Tensor:
    lin = op.linearization
    with (
        torch.enable_grad()
    ):  # the reference differentiates the network (mixins call us in no_grad)
        scale = reference_scale(lin.network, op.variance, set(lin.space.names))
        K = reference_ntk(lin.network, op.X1, op.X2, params=list(lin.space.names), scale=scale)
    return K.expand(*op.batch_shape, *K.shape)


def _mlp(d_out: int, width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, d_out)
    )


class _NTKMixin:
    # Well conditioned (see test_mixin_cases_are_well_conditioned): N·O ≪ P = 1217 and a
    # full-rank Jacobian, so solves, SLQ log-determinants and eigendecompositions are sound.
    seed = 0
    d_out = 1
    n = 6
    variance = (1.0, 2.0, 4.0)

    def create_linear_op(self):
        net = _mlp(self.d_out)
        X = torch.randn(self.n, 3, generator=torch.Generator().manual_seed(1))
        return NTKLinearOperator(
            X,
            variance=torch.tensor(self.variance),
            network=Linearization(net, implementation="functorch"),
        )

    def evaluate_linear_op(self, linear_op):
        return reference_for(linear_op)


class TestNTKLinearOperator(_NTKMixin, LinearOperatorTestCase, unittest.TestCase):
    pass


class TestNTKLinearOperatorMultiOutput(_NTKMixin, LinearOperatorTestCase, unittest.TestCase):
    d_out = 2
    n = 3


class TestNTKCrossLinearOperator(RectangularLinearOperatorTestCase, unittest.TestCase):
    seed = 0

    def create_linear_op(self):
        net = _mlp(2)
        g = torch.Generator().manual_seed(1)
        X1, X2 = torch.randn(3, 3, generator=g), torch.randn(5, 3, generator=g)
        return NTKLinearOperator(
            X1,
            X2,
            torch.tensor([0.5, 1.0, 2.0]),
            network=Linearization(net, implementation="functorch"),
        )

    def evaluate_linear_op(self, linear_op):
        return reference_for(linear_op)


def test_mixin_cases_are_well_conditioned():
    # The mixins solve, take log-determinants and eigendecompose: their K must be far from
    # singular (an NTK Gram matrix has rank ≤ P and is often ill-conditioned).
    for mixin in (TestNTKLinearOperator, TestNTKLinearOperatorMultiOutput):
        op = mixin.create_linear_op(mixin())
        K = reference_for(op)
        assert K.shape[0] < op.linearization.num_params
        eig = torch.linalg.eigvalsh(K)
        assert float(eig.min()) > 0.1 and float(eig.max() / eig.min()) < 1e3


# ----------------------------------------------------------------------------- the zoo
RTOL = 1e-8


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype
    err = float((actual - expected).norm())
    assert err <= rtol * float(expected.norm()), (err, float(expected.norm()))


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    """(K(X1, X1), K(X1, X2), dense references, σ², network); the network is checked after."""
    c = request.param
    net, X1 = c.build(n=4)
    X2 = c.make_inputs(3)
    before = snapshot(net)
    lin = Linearization(net, c.params, implementation="functorch")
    variance = torch.rand(len(lin.groups)) + 0.5
    scale = reference_scale(net, variance, set(lin.space.names))
    names = list(lin.space.names)
    K = NTKLinearOperator(X1, variance=variance, network=lin)
    Kx = NTKLinearOperator(X1, X2, variance, network=lin)
    ref = reference_ntk(net, X1, params=names, scale=scale)
    ref_x = reference_ntk(net, X1, X2, params=names, scale=scale)
    yield K, Kx, ref, ref_x, net
    assert_unchanged(net, before)


def test_to_dense(case):
    K, Kx, ref, ref_x, _ = case
    assert K.shape == ref.shape and Kx.shape == ref_x.shape
    assert_rel(K.to_dense(), ref)
    assert_rel(Kx.to_dense(), ref_x)
    torch.testing.assert_close(ref, ref.T)
    assert float(torch.linalg.eigvalsh(ref).min()) >= -1e-10 * float(ref.diagonal().max())


def test_matmul(case):
    K, Kx, ref, ref_x, _ = case
    V = torch.randn(2, 3, ref.shape[1], 4)  # batch dims fold into columns
    assert_rel(K @ V, ref @ V)
    v = torch.randn(ref_x.shape[1])
    assert_rel(Kx @ v, ref_x @ v)


def test_transpose_and_symmetry(case):
    K, Kx, ref, ref_x, _ = case
    U = torch.randn(ref_x.shape[0], 3)
    assert_rel(Kx._t_matmul(U), ref_x.T @ U)
    assert_rel(Kx.mT @ U, ref_x.T @ U)
    assert_rel(U.T @ Kx, U.T @ ref_x)
    swapped = NTKLinearOperator(Kx.X2, Kx.X1, Kx.variance, network=Kx.linearization)
    assert_rel(swapped.to_dense(), Kx.to_dense().T)  # K(X2, X1) = K(X1, X2)ᵀ
    assert K.mT is K and K.symmetric and not Kx.symmetric


def test_diagonal(case):
    K, Kx, ref, ref_x, net = case
    assert_rel(K.diagonal(), ref.diagonal())
    assert_rel(K._approx_diagonal(), ref.diagonal())
    # square but X1 ≠ X2: the diagonal of J1 Σ J2ᵀ, not of K(X1, X1)
    X2 = Kx.X2[torch.tensor([0, 1, 2, 0])]
    square = NTKLinearOperator(K.X1, X2, K.variance, network=K.linearization)
    scale = reference_scale(net, K.variance, set(K.linearization.space.names))
    expected = reference_ntk(
        net, K.X1, X2, params=list(K.linearization.space.names), scale=scale
    ).diagonal()
    assert_rel(square.diagonal(), expected)


def test_rows_and_entries(case):
    K, Kx, ref, ref_x, _ = case
    rows = torch.tensor([ref.shape[0] - 1, 0, 1, 1])
    assert_rel(K[rows].to_dense(), ref[rows])
    assert_rel(Kx[rows].to_dense(), ref_x[rows])
    cols = torch.tensor([2, 0, ref_x.shape[1] - 1])
    assert_rel(Kx[:, cols].to_dense(), ref_x[:, cols])
    assert_rel(Kx[rows[:3], cols], ref_x[rows[:3], cols])  # entries (pivoted Cholesky's path)
    assert_rel(K[rows.unsqueeze(-1), cols.unsqueeze(0)], ref[rows.unsqueeze(-1), cols.unsqueeze(0)])
    O = K.num_outputs
    sub = K[O : 3 * O, : 2 * O]  # whole examples: stays lazy
    assert isinstance(sub, NTKLinearOperator)
    assert_rel(sub.to_dense(), ref[O : 3 * O, : 2 * O])


def test_variance_gradient_of_bilinear_form(case):
    K, Kx, ref, ref_x, net = case
    for op in (K, Kx):
        variance = op.variance.detach().clone().requires_grad_(True)
        op = NTKLinearOperator(op.X1, op.X2, variance, network=op.linearization)
        U, V = torch.randn(op.shape[0], 2), torch.randn(op.shape[1], 2)
        (custom,) = [g for g in op._bilinear_derivative(U, V) if g is not None]
        names = set(op.linearization.space.names)
        dense = reference_ntk(
            net, op.X1, op.X2, params=list(names), scale=reference_scale(net, variance, names)
        )
        (auto,) = torch.autograd.grad((U * (dense @ V)).sum(), variance)
        assert_rel(custom, auto)


# ----------------------------------------------------------------------------- specifics
def _small(d_out: int = 1, n: int = 5, width: int = 16, **lin_kwargs):
    net = _mlp(d_out, width)
    X = torch.randn(n, 3, generator=torch.Generator().manual_seed(2))
    return net, X, Linearization(net, implementation="functorch", **lin_kwargs)


def _dense(net, X1, X2=None, variance=None):
    lin = Linearization(net, implementation="functorch")
    variance = torch.ones(()) if variance is None else variance
    names = set(lin.space.names)
    return reference_ntk(net, X1, X2, scale=reference_scale(net, variance, names))


def test_variance_gradient_through_solves_and_logdet():
    net, X, lin = _small(d_out=2, n=4)
    y = torch.randn(8)
    noise = 0.1

    def loss(K, variance):
        Kn = K.add_diagonal(torch.full((8,), noise))
        inv_quad, logdet = Kn.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
        return inv_quad, logdet

    v_dense = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    dense = _dense(net, X, variance=v_dense) + noise * torch.eye(8)
    iq_ref = y @ torch.linalg.solve(dense, y)
    ld_ref = torch.logdet(dense)
    g_iq_ref, g_ld_ref = (
        torch.autograd.grad(t, v_dense, retain_graph=True)[0] for t in (iq_ref, ld_ref)
    )

    # Cholesky path (to_dense through the engine): exact.
    v = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    with linear_operator.settings.max_cholesky_size(10_000):
        iq, ld = loss(NTKLinearOperator(X, variance=v, network=lin), v)
    assert_rel(torch.autograd.grad(iq, v, retain_graph=True)[0], g_iq_ref, 1e-8)
    assert_rel(torch.autograd.grad(ld, v)[0], g_ld_ref, 1e-8)

    # CG path (matrix-free, _bilinear_derivative): the inverse quadratic form is exact up to
    # the CG tolerance (the log-determinant is stochastic there, see the mixins).
    v = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    with (
        linear_operator.settings.max_cholesky_size(0),
        linear_operator.settings.cg_tolerance(1e-6),
    ):
        Kn = NTKLinearOperator(X, variance=v, network=lin).add_diagonal(torch.full((8,), noise))
        iq = Kn.inv_quad(y.unsqueeze(-1)).sum()
    assert_rel(iq.detach(), iq_ref.detach(), 1e-5)
    assert_rel(torch.autograd.grad(iq, v)[0], g_iq_ref, 1e-5)


def test_pivoted_cholesky_preconditioner_uses_rows_not_dense():
    net, X, lin = _small(n=12)
    K = NTKLinearOperator(X, variance=torch.tensor(2.0), network=lin)
    Kd = _dense(net, X, variance=torch.tensor(2.0))
    noise = DiagLinearOperator(torch.full((12,), 0.05))
    y = torch.randn(12, 1)
    ours, ref = (
        AddedDiagLinearOperator(K, noise),
        AddedDiagLinearOperator(DenseLinearOperator(Kd), noise),
    )
    with (
        linear_operator.settings.min_preconditioning_size(0),  # force it on at N = 12
        linear_operator.settings.max_preconditioner_size(4),
        linear_operator.settings.max_cholesky_size(0),  # CG, not Cholesky
    ):
        closure, precond, logdet = ours._preconditioner()
        ref_closure, ref_precond, ref_logdet = ref._preconditioner()
        solve, ref_solve = ours.solve(y), ref.solve(y)
    assert precond is not None and ours._piv_chol_self.shape == (12, 4)
    assert_rel(precond.to_dense(), ref_precond.to_dense())  # same pivots, same rank-4 factor
    assert_rel(logdet, ref_logdet)
    assert_rel(closure(y), ref_closure(y))
    assert_rel(solve, ref_solve)  # the same preconditioned CG as on the dense matrix
    exact = torch.linalg.solve(Kd + 0.05 * torch.eye(12), y)
    assert float((solve - exact).norm()) <= 1e-3 * float(exact.norm())  # CG tolerance 1e-4
    # Pivoted Cholesky read 4 rows of K (one VJP + one JVP each), never the dense matrix.
    assert not any("to_dense" in str(key) for key in getattr(K, "_memoize_cache", {}))


def test_exact_root_and_samples():
    net, X, lin = _small(d_out=2, n=3)
    variance = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    K = NTKLinearOperator(X, variance=variance, network=lin)
    R = K.root_decomposition(method="exact")
    assert isinstance(R, RootLinearOperator)
    assert R.root.shape == (6, lin.num_params)  # σ·J
    Kd = _dense(net, X, variance=variance.detach())
    assert_rel(R.to_dense().detach(), Kd)
    sigma_J = (
        _jacobian(net, X) * reference_scale(net, variance.detach(), set(lin.space.names)).sqrt()
    )
    torch.manual_seed(3)
    samples = K.zero_mean_mvn_samples(5)
    torch.manual_seed(3)
    z = torch.randn(lin.num_params, 5)
    assert samples.shape == (5, 6)
    assert_rel(samples.detach(), (sigma_J @ z).T)  # exactly σ·J z: one JVP, no Lanczos
    (grad,) = torch.autograd.grad(samples.sum(), variance)  # and differentiable in σ²
    assert grad.shape == (3,) and bool(torch.isfinite(grad).all())
    # the default root stays square (gpytorch's rsample(base_samples=...) expects N·O)
    with linear_operator.settings.max_cholesky_size(10_000):
        default = K.root_decomposition()
        assert default.root.shape[-1] == 6
        assert_rel(default.to_dense().detach(), Kd, 1e-7)
    with pytest.raises(RuntimeError, match="only defined when X2 is X1"):
        NTKLinearOperator(X, X[:2], network=lin).jacobian_root()


def _jacobian(net, X):
    from pyro_ntk.testing import reference_jacobian

    J = reference_jacobian(net, X)
    return J.reshape(-1, J.shape[-1])


def test_batch_broadcasting():
    net, X, lin = _small(n=4)
    K = NTKLinearOperator(X, variance=1.5, network=lin)
    Kd = _dense(net, X, variance=torch.tensor(1.5))
    E = K.expand(3, 4, 4)
    assert E.shape == (3, 4, 4)
    assert_rel(E.to_dense(), Kd.expand(3, 4, 4))
    rhs = torch.randn(2, 3, 4, 2)
    assert_rel(E @ rhs, Kd @ rhs)
    assert_rel(E[1, 0:2, 1:3].to_dense(), Kd[0:2, 1:3])
    assert_rel(E.diagonal(dim1=-2, dim2=-1), Kd.diagonal().expand(3, 4))
    assert_rel(K.unsqueeze(0).squeeze(0).to_dense(), Kd)
    assert_rel(E.sum(0).to_dense(), 3 * Kd)
    assert_rel(K.repeat(2, 1, 1).to_dense(), Kd.expand(2, 4, 4))


def test_chunked_equals_unchunked():
    net, X, lin = _small(d_out=2, n=5)
    chunked = Linearization(net, implementation="functorch", chunk_size=2)
    K = NTKLinearOperator(X, variance=torch.tensor([1.0, 2.0, 0.5]), network=lin)
    Kc = NTKLinearOperator(X, variance=torch.tensor([1.0, 2.0, 0.5]), network=chunked)
    V = torch.randn(10, 3)
    rows = torch.tensor([9, 0, 4])
    torch.testing.assert_close(Kc @ V, K @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Kc.diagonal(), K.diagonal(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Kc[rows].to_dense(), K[rows].to_dense(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Kc.to_dense(), K.to_dense(), rtol=1e-12, atol=1e-12)


def test_dtype_conversion_copies_the_network():
    net, X, lin = _small(n=4)
    before = snapshot(net)
    variance = torch.tensor([1.0, 2.0, 0.5])
    K = NTKLinearOperator(X, variance=variance, network=lin)
    Kf = K.float()
    assert Kf.dtype == torch.float32 and Kf.variance.dtype == torch.float32
    assert Kf.linearization.network is not net and Kf.symmetric
    torch.testing.assert_close(Kf.to_dense(), K.to_dense().float(), rtol=1e-5, atol=1e-5)
    assert Kf.double().linearization is lin
    assert K.to(torch.float32).linearization is Kf.linearization
    assert K.to("cpu").linearization is lin
    assert_unchanged(net, before)
    assert next(net.parameters()).dtype == torch.float64


def test_bad_input():
    net, X, lin = _small(n=4)
    with pytest.raises(ValueError, match=r"variance has shape \(2,\); expected a scalar or \(3,\)"):
        NTKLinearOperator(X, variance=torch.ones(2), network=lin)
    with pytest.raises(ValueError, match="non-negative"):
        NTKLinearOperator(X, variance=torch.tensor([1.0, -1.0, 1.0]), network=lin)
    with pytest.raises(TypeError, match="variance has dtype torch.float32"):
        NTKLinearOperator(X, variance=torch.ones(3, dtype=torch.float32), network=lin)
    with pytest.raises(ValueError, match="NaN or infinite"):
        NTKLinearOperator(X, variance=torch.tensor(float("nan")), network=lin)
    with pytest.raises(TypeError, match="X2 must be a torch.Tensor"):
        NTKLinearOperator(X, [[0.0, 1.0, 2.0]], network=lin)
    with pytest.raises(TypeError, match="dtype"):
        NTKLinearOperator(X.float(), network=lin)
    with pytest.raises(ValueError, match="feature shape"):
        NTKLinearOperator(X, torch.randn(2, 5), network=lin)
    with pytest.raises(
        TypeError,
        match="NTKLinearOperator: network must be a torch.nn.Module or a pyro_ntk.Linearization, got Tensor",
    ):
        NTKLinearOperator(X, network=X)
    K = NTKLinearOperator(X, network=lin)
    with pytest.raises((ValueError, RuntimeError)):
        K @ torch.randn(5, 2)


# ----------------------------------------------------------------------------- engines
ENGINES = [i.value for i in NTKImplementation if i is not NTKImplementation.AUTO]
ENGINE_CASES = [
    pytest.param(i, c, id=f"{c}-{i}") for c in ("tanh_mlp", "cnn", "layernorm") for i in ENGINES
]


@pytest.mark.parametrize("implementation, case_name", ENGINE_CASES)
def test_every_engine_inside_linear_operator(implementation, case_name):
    # linear_operator runs every product inside torch.autograd.Function.forward (Matmul,
    # solves, pivoted Cholesky): the engines must give the same K there as anywhere else.
    c = CASES[CASE_IDS.index(case_name)]
    net, X = c.build(n=4)
    lin = Linearization(net, c.params, implementation=implementation)
    K = NTKLinearOperator(X, variance=torch.tensor(1.5), network=lin)
    ref = reference_ntk(net, X, params=c.params) * 1.5
    V = torch.randn(ref.shape[1], 3)
    assert_rel(K @ V, ref @ V)  # first product: built inside Matmul's forward
    assert_rel(lin.ntk_mvm(X, None, V, variance=1.5), ref @ V)  # and reused outside
    assert_rel(K[torch.tensor([1, 0])].to_dense(), ref[[1, 0]])
    assert_rel(K.diagonal(), ref.diagonal())
