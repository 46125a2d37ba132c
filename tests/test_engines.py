"""Every engine strategy against the dense float64 reference, and the per-chunk cache."""

from __future__ import annotations

import gc

import pytest
import torch
from networks import CASE_IDS, CASES, assert_unchanged, group_scale, snapshot
from product_checks import check, rel_err
from torch import nn

from pyro_ntk import Linearization, NTKImplementation
from pyro_ntk.testing import reference_jacobian

STRATEGIES = [("functorch", None), ("cached", None), ("structured", None), ("structured", 4)]
CHUNKED = [("cached", 4, "batchnorm"), ("cached", 4, "multi_output"), ("auto", 3, "layernorm")]


@pytest.mark.parametrize(
    "implementation, chunk_size", STRATEGIES, ids=[f"{i}-{c}" for i, c in STRATEGIES]
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_product_matches_reference(case, implementation, chunk_size):
    check_products(case, implementation, chunk_size)


@pytest.mark.parametrize("implementation, chunk_size, case_id", CHUNKED)
def test_chunked_cached_and_auto_match_reference(implementation, chunk_size, case_id):
    check_products(CASES[CASE_IDS.index(case_id)], implementation, chunk_size)


def check_products(case, implementation, chunk_size):
    net, X1 = case.build(n=7)
    before = snapshot(net)
    check(net, X1, case.make_inputs(5), case.params, chunk_size, implementation, layers=True)
    assert_unchanged(net, before)
    assert all(not m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("implementation", ["cached", "structured"])
def test_gradients_flow_to_variance_and_right_hand_side(implementation):
    net, X = CASES[CASE_IDS.index("batchnorm")].build(n=5)
    lin = Linearization(net, implementation=implementation)
    J = reference_jacobian(net, X).reshape(5 * 2, -1)
    variance = (torch.rand(lin.space.num_groups) + 0.5).requires_grad_()
    V = torch.randn(10, 2, requires_grad=True)
    w = torch.randn(10, 2)
    (lin.ntk_mvm(X, X, V, variance) * w).sum().backward()
    var_ref = variance.detach().clone().requires_grad_()
    V_ref = V.detach().clone().requires_grad_()
    ((((J * group_scale(net, var_ref, lin.space.names)) @ J.T) @ V_ref) * w).sum().backward()
    assert rel_err(variance.grad, var_ref.grad) <= 1e-8
    assert rel_err(V.grad, V_ref.grad) <= 1e-8
    var_d = variance.detach().clone().requires_grad_()
    lin.ntk_dense(X, variance=var_d).trace().backward()
    var_ref2 = variance.detach().clone().requires_grad_()
    ((J * group_scale(net, var_ref2, lin.space.names)) @ J.T).trace().backward()
    assert rel_err(var_d.grad, var_ref2.grad) <= 1e-8


class SharedTwice(nn.Module):
    """One Linear applied twice (weight sharing by reuse) and a custom parameter."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.mid = nn.Linear(6, 6)
        self.gain = nn.Parameter(torch.rand(6) + 0.5)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h)) * self.gain
        return self.out(h)


class Tied(nn.Module):
    """Two Linear modules holding the same weight Parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Sequence(nn.Module):
    """Linear layers applied per position of a sequence (n, T, d), then pooled."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.emb(x))).mean(1))


@pytest.mark.parametrize(
    "make, inputs, generic",
    [
        (SharedTwice, lambda n: torch.randn(n, 3), {"mid.weight", "mid.bias", "gain"}),
        (Tied, lambda n: torch.randn(n, 4), {"a.weight", "a.bias", "b.bias"}),
        (Sequence, lambda n: torch.randn(n, 4, 3), {"norm.weight", "norm.bias"}),
    ],
    ids=["reused_module", "tied_weights", "sequence"],
)
def test_structured_hands_unknown_layers_to_the_generic_path(make, inputs, generic):
    torch.manual_seed(0)
    net, X = make(), inputs(6)
    lin = Linearization(net, implementation="structured", chunk_size=4)
    J = reference_jacobian(net, X)
    A = J.reshape(-1, J.shape[-1])
    V = torch.randn(A.shape[0], 2)
    assert rel_err(lin.ntk_mvm(X, X, V), A @ (A.T @ V)) <= 1e-8
    assert rel_err(lin.ntk_dense(X), A @ A.T) <= 1e-8
    assert rel_err(lin.ntk_diag(X), (A * A).sum(-1)) <= 1e-8
    assert rel_err(lin.jacobian(X), J) <= 1e-8
    assert set(lin.engine.plan.generic) == generic
    assert lin.engine.plan.layers, "some layers must stay structured"


def test_structured_conv_bias_only_subset():
    case = CASES[CASE_IDS.index("cnn")]
    net, X = case.build(n=5)

    def biases(name, p):
        return name.endswith("bias")

    lin = Linearization(net, biases, implementation="structured")
    A = reference_jacobian(net, X, biases).reshape(10, -1)
    V = torch.randn(10, 3)
    assert rel_err(lin.ntk_mvm(X, X, V), A @ (A.T @ V)) <= 1e-8
    assert rel_err(lin.ntk_dense(X), A @ A.T) <= 1e-8
    assert rel_err(lin.ntk_diag(X), (A * A).sum(-1)) <= 1e-8


def test_auto_follows_the_measured_rule_and_says_why():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    lin = Linearization(mlp)
    assert lin.implementation.value == "structured" and lin.requested.value == "auto"
    assert "100%" in lin.implementation_reason and "engine zoo" in lin.implementation_reason
    # an Embedding is factored (gather / scatter): structured
    embedding_heavy = nn.Sequential(nn.Embedding(500, 8), nn.Flatten(), nn.Linear(16, 1))
    lin = Linearization(embedding_heavy, params=["0.weight"])
    assert lin.implementation.value == "structured"
    X = torch.randint(0, 500, (5, 2))
    J = reference_jacobian(embedding_heavy, X, params=["0.weight"]).reshape(5, -1)
    V = torch.randn(5, 2)
    assert rel_err(lin.ntk_mvm(X, X, V), J @ (J.T @ V)) <= 1e-8
    # nothing to factor (only a LayerNorm is linearized): the cached closures
    norm_only = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))
    lin = Linearization(norm_only, params=["1.weight", "1.bias"])
    assert lin.implementation.value == "cached"
    assert "no layer can be factored" in lin.implementation_reason
    Xn = torch.randn(5, 3)
    J = reference_jacobian(norm_only, Xn, params=["1.weight", "1.bias"]).reshape(5, -1)
    assert rel_err(lin.ntk_mvm(Xn, Xn, V), J @ (J.T @ V)) <= 1e-8
    assert Linearization(mlp, implementation="cached").implementation_reason == "requested 'cached'"


class CountForwards:
    """Counts forward calls of a network through a hook registered only inside ``with``."""

    def __init__(self, net: nn.Module):
        self.net, self.calls = net, 0

    def _hook(self, module, args, out):
        self.calls += 1

    def __enter__(self):
        self.handle = self.net.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("implementation", ["cached", "structured"])
@pytest.mark.parametrize("case_id", ["batchnorm", "cnn"])
def test_cache_is_reused_across_products_and_invalidated_in_place(implementation, case_id):
    case = CASES[CASE_IDS.index(case_id)]
    net, X = case.build(n=9)
    lin = Linearization(net, implementation=implementation, chunk_size=4)
    O = lin.output_dim(X)
    V = torch.randn(9 * O, 2)
    with CountForwards(net) as counter:
        first = lin.ntk_mvm(X, X, V)
        if implementation == "structured":  # lazy: the first K·v streams, the second builds
            second = lin.ntk_mvm(X, X, V)
            assert rel_err(second, first) <= 1e-12
            first = second
        after_first = counter.calls
        for _ in range(5):  # a CG solve: the same operator, many products
            assert torch.equal(lin.ntk_mvm(X, X, V), first)
        assert counter.calls == after_first, "products after the first must not rerun the network"
        assert lin.engine.cache.builds == 3  # one per chunk (4 + 4 + 1 rows)
        X.mul_(0.5)  # in-place change: every chunk is stale
        J = reference_jacobian(net, X).reshape(9 * O, -1)
        assert rel_err(lin.ntk_mvm(X, X, V), J @ (J.T @ V)) <= 1e-8
        assert counter.calls > after_first
        if implementation == "structured":  # changed rows restart the count: this K·v streamed
            assert lin.engine.cache.builds == 3
            assert rel_err(lin.ntk_mvm(X, X, V), J @ (J.T @ V)) <= 1e-8
        assert lin.engine.cache.builds == 6
    assert not net._forward_hooks
    assert len(lin.engine.cache) == 3
    del X
    gc.collect()
    assert len(lin.engine.cache) == 0, "entries must die with their input tensor"


def test_cache_budget_bounds_what_is_kept():
    net, X = CASES[0].build(n=8)
    lin = Linearization(net, implementation="structured", chunk_size=2)
    lin.engine.cache.max_bytes = 0
    J = reference_jacobian(net, X).reshape(8, -1)
    V = torch.randn(8)
    for _ in range(2):
        assert rel_err(lin.ntk_mvm(X, X, V), J @ (J.T @ V)) <= 1e-8
    # over the budget (none at all here) nothing is built: every product streams
    assert len(lin.engine.cache) == 0 and lin.engine.cache.builds == 0
    lin.engine.cache.max_bytes = None
    lin.ntk_mvm(X, X, V)
    assert len(lin.engine.cache) == 4
    lin.clear_cache()
    assert len(lin.engine.cache) == 0


class ProductInsideFunction(torch.autograd.Function):
    """linear_operator runs products inside Function.forward (forward-mode AD switched off)."""

    @staticmethod
    def forward(ctx, V, lin, X):
        return lin.ntk_mvm(X, None, V)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


@pytest.mark.parametrize("implementation", ["cached", "structured"])
def test_cache_built_inside_autograd_function_is_right(implementation):
    net, X = CASES[CASE_IDS.index("layernorm")].build(n=5)
    lin = Linearization(net, implementation=implementation)
    J = reference_jacobian(net, X).reshape(5, -1)
    V = torch.randn(5, 2)
    assert rel_err(ProductInsideFunction.apply(V, lin, X), J @ (J.T @ V)) <= 1e-8
    assert rel_err(lin.ntk_mvm(X, None, V), J @ (J.T @ V)) <= 1e-8  # reused outside


def test_a_converted_auto_linearization_stays_auto():

    mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    lin = Linearization(mlp)
    lin(torch.randn(5, 3))  # auto has decided its products engine by now
    converted = lin.to(torch.float32)
    assert converted.requested is NTKImplementation.AUTO
    assert type(converted.engine) is type(lin.engine)
