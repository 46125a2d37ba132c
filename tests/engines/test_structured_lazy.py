"""The structured engine's lazy factors, against a dense float64 ``torch.func.jacrev`` reference.

A chunk's first K·v streams (``torch.func`` vjp / jvp, nothing built), its second ``vjp``
builds the factors, later products hit them; a ``jvp`` never builds; a product of many
columns builds at once; a chunk whose factors
do not fit in the cache budget streams every product (nothing built); ``build_after = 0``
builds at the first product; dense ops build at once; a streaming route that disagrees with
the reference on the probe is a reported fallback to factored products only.
"""

from __future__ import annotations

import pytest
import torch
from networks import set_running_stats
from product_checks import jacrev_jacobian, rel_err
from torch import nn

import pyro_ntk._engines.structured.engine as engine_mod
from pyro_ntk import Linearization


def small_cnn() -> nn.Module:
    """Conv-BN-ReLU, a PReLU (its slope goes through the generic route), pooling, Linear."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.PReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return set_running_stats(net).eval()


@pytest.fixture
def setup():
    net = small_cnn()
    X = torch.randn(8, 2, 6, 6)
    J = jacrev_jacobian(net, X)  # (N, O, P)
    return net, X, J


def products(lin, X, J, k=2):
    """One vjp and one jvp on ``X``, each checked against the dense reference."""
    N, O, P = J.shape
    U, V = torch.randn(N, O, k), torch.randn(P, k)
    assert rel_err(lin.vjp(X, U), torch.einsum("nop,nok->pk", J, U)) <= 1e-10
    assert rel_err(lin.jvp(X, V), torch.einsum("nop,pk->nok", J, V)) <= 1e-10


def test_the_probe_proves_streaming_and_the_factors(setup):
    net, X, J = setup
    lin = Linearization(net, implementation="structured")
    lin(X)
    assert lin.engine.streaming
    assert {layer.module_name for layer in lin.engine.plan.layers} >= {"0", "1", "3", "6"}
    assert "2.weight" in lin.engine.plan.generic  # PReLU: the generic route in factored products
    assert "streaming products" not in lin.explain()  # no fallback
    assert "lazy" in lin.explain()


def test_first_vjp_streams_second_builds_later_hit(setup):
    net, X, J = setup
    lin = Linearization(net, implementation="structured")
    cache = lin.engine.cache
    products(lin, X, J)  # the first K·v: both halves stream
    assert cache.builds == 0 and len(cache) == 0
    for _ in range(3):  # a jvp never builds
        V = torch.randn(J.shape[2], 1)
        assert rel_err(lin.jvp(X, V), torch.einsum("nop,pk->nok", J, V)) <= 1e-10
    assert cache.builds == 0
    products(lin, X, J)  # the second vjp builds; its jvp hits
    assert cache.builds == 1 and len(cache) == 1 and cache.hits == 1
    products(lin, X, J)
    assert cache.builds == 1 and cache.hits == 3


def test_k_v_over_chunks_builds_each_chunk_once(setup):
    net, X, J = setup
    lin = Linearization(net, implementation="structured", chunk_size=3)  # chunks 3 + 3 + 2
    N, O, _ = J.shape
    Jf = J.reshape(N * O, -1)
    V = torch.randn(N * O, 2)
    want = Jf @ (Jf.T @ V)
    for expected_builds in (0, 3, 3, 3):
        assert rel_err(lin.ntk_mvm(X, X, V), want) <= 1e-10
        assert lin.engine.cache.builds == expected_builds


def test_over_the_budget_nothing_is_built_and_products_are_exact(setup):
    net, X, J = setup
    lin = Linearization(net, implementation="structured", chunk_size=4)
    lin(X)
    engine = lin.engine
    per_row = next(iter(engine._row_bytes.values()))  # measured on the preflight's probe
    engine.cache.max_bytes = int(1.5 * 4 * per_row)  # one chunk of 4 rows fits, not two
    N, O, _ = J.shape
    Jf = J.reshape(N * O, -1)
    V = torch.randn(N * O, 1)
    for _ in range(4):
        assert rel_err(lin.ntk_mvm(X, X, V), Jf @ (Jf.T @ V)) <= 1e-10
    assert engine.cache.builds == 1 and len(engine.cache) == 1  # the second chunk streams
    assert engine.cache.nbytes <= engine.cache.max_bytes
    engine.cache.max_bytes = 0
    lin.clear_cache()
    for _ in range(3):
        products(lin, X, J)
    assert engine.cache.builds == 1 and len(engine.cache) == 0


def test_eager_mode_builds_at_the_first_product(setup):
    net, X, J = setup
    lin = Linearization(net, implementation="structured")
    lin.engine.build_after = 0
    cache = lin.engine.cache
    N, O, P = J.shape
    V = torch.randn(P, 2)
    assert rel_err(lin.jvp(X, V), torch.einsum("nop,pk->nok", J, V)) <= 1e-10
    assert cache.builds == 1  # eager: a jvp builds too
    products(lin, X, J)
    assert cache.builds == 1 and cache.hits == 2


def test_dense_ops_build_at_once(setup):
    net, X, J = setup
    lin = Linearization(net, implementation="structured")
    Jf = J.reshape(-1, J.shape[2])
    assert rel_err(lin.ntk_dense(X), Jf @ Jf.T) <= 1e-10
    builds = lin.engine.cache.builds
    assert builds >= 1
    products(lin, X, J)  # the factors are there: the products hit them
    assert lin.engine.cache.builds == builds


def test_changed_rows_restart_the_count(setup):
    net, X, J = setup
    lin = Linearization(net, implementation="structured")
    products(lin, X, J)
    X.mul_(0.5)  # in place: the count (and any entry) of these rows is stale
    J = jacrev_jacobian(net, X)
    products(lin, X, J)
    assert lin.engine.cache.builds == 0
    products(lin, X, J)
    assert lin.engine.cache.builds == 1


def test_a_wrong_streaming_route_is_a_reported_fallback(setup, monkeypatch):
    net, X, J = setup
    real = engine_mod.stream_vjp
    monkeypatch.setattr(engine_mod, "stream_vjp", lambda e, X, U: 1.01 * real(e, X, U))
    lin = Linearization(net, implementation="structured")
    lin(X)
    assert not lin.engine.streaming
    assert "factored products only" in lin.explain()
    products(lin, X, J)  # every product uses factors: the (wrong) streaming route is unused
    assert lin.engine.cache.builds == 1


def test_a_product_of_many_columns_builds_at_once(setup):
    net, X, J = setup
    lin = Linearization(net, implementation="structured")
    cache = lin.engine.cache
    k = engine_mod.BUILD_COLUMNS
    V = torch.randn(J.shape[2], k)
    assert rel_err(lin.jvp(X, V), torch.einsum("nop,pk->nok", J, V)) <= 1e-10
    assert cache.builds == 1 and len(cache) == 1  # even a jvp, at its first product
    products(lin, X, J, k=1)  # one column: the chunk's factors serve it
    assert cache.builds == 1
    Y = torch.randn(5, 2, 6, 6)
    products(lin, Y, jacrev_jacobian(net, Y), k=k - 1)  # fewer columns: streams
    assert cache.builds == 1
