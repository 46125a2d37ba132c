"""The symmetric (syrk-like) dense Gram of the structured engine against dense float64 references.

``add_gram``/``mirror_upper`` (:mod:`pyro_ntk._engines.structured.blocks`) and ``GramSum``
(:mod:`pyro_ntk._engines.structured.gram`) against ``G Gᵀ``, at odd sizes and several blocks;
the structured dense K with ``X2`` the same tensor as ``X1`` (upper triangle computed and
mirrored: exactly symmetric) and with a copy of it (the plain route), against ``jacrev``; the
patch Gram's skipped lower blocks; a variance that requires grad keeps ``K`` differentiable.
"""

from __future__ import annotations

import pytest
import torch
from networks import set_running_stats
from product_checks import check_dense_variance_gradient, jacrev_jacobian, rel_err
from torch import nn

import pyro_ntk._engines.structured.blocks as blocks
import pyro_ntk._engines.structured.gram as gram
from pyro_ntk import Linearization


@pytest.mark.parametrize("m", [1, 7, 160, 161, 333, 1280])
def test_upper_blocks_cover_the_upper_triangle_once(m):
    count = torch.zeros(m, m, dtype=torch.int64)
    for r, c in blocks.upper_blocks(m):
        count[r, c] += 1
        if r != c:
            assert r.stop <= c.start  # off-diagonal blocks lie wholly above the diagonal
        else:
            assert r.stop - r.start <= blocks.LEAF_ROWS
    upper = torch.ones(m, m, dtype=torch.int64).triu()
    assert torch.equal(count.triu(), upper)
    assert count.tril(-1).sum() <= sum(  # only the diagonal leaves reach below the diagonal
        (r.stop - r.start) ** 2 for r, c in blocks.upper_blocks(m) if r == c
    )


@pytest.mark.parametrize("m, P", [(1, 5), (83, 1), (161, 40), (333, 17)])
def test_symmetric_add_gram_matches_the_full_product(m, P):
    G = torch.randn(m, P)
    K = torch.randn(m, m)
    K = K + K.T  # accumulates onto a symmetric start
    want = K + 0.5 * G @ G.T
    got = blocks.mirror_upper(_add(K.clone(), G, G, 0.5, True))
    assert rel_err(got, want) <= 1e-12
    assert torch.equal(got, got.T)  # exactly symmetric
    plain = _add(K.clone(), G, G, 0.5, False)
    assert rel_err(plain, want) <= 1e-12


def _add(K, G1, G2, alpha, symmetric):
    blocks.add_gram(K, G1, G2, alpha, symmetric)
    return K


def test_symmetric_add_gram_skips_the_lower_blocks():
    """The symmetric route writes nothing below its diagonal leaves (about half the work)."""
    G = torch.randn(330, 3)
    K = torch.zeros(330, 330)
    blocks.add_gram(K, G, G, 1.0, symmetric=True)
    leaves = [r for r, c in blocks.upper_blocks(330) if r == c]
    assert [(r.start, r.stop) for r in leaves] == [(0, 82), (82, 165), (165, 247), (247, 330)]
    assert K[165:, :165].abs().max() == 0 and K[82:165, :82].abs().max() == 0
    assert K[:165, 165:].abs().min() > 0 and K[:82, 82:165].abs().min() > 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_gram_sum_mixes_narrow_and_wide_pieces_and_scales(symmetric):
    m1, m2 = 95, 95 if symmetric else 61
    widths, alphas = [3, 1500, 40, 2100, 7], [1.0, 2.5, 2.5, 1.0, 0.3]
    G1 = [torch.randn(m1, w) for w in widths]
    G2 = G1 if symmetric else [torch.randn(m2, w) for w in widths]
    extra = torch.randn(m1, m2)
    extra = extra + extra.T if symmetric else extra
    acc = gram.GramSum(symmetric)
    acc.add(extra)
    want = extra.clone()
    for a, b, alpha in zip(G1, G2, alphas):
        acc.gram(a, b, torch.tensor(alpha) if alpha == 2.5 else alpha)
        want += alpha * a @ b.T
    got = acc.result()
    assert rel_err(got, want) <= 1e-12
    assert not symmetric or torch.equal(got, got.T)


def test_gram_sum_is_differentiable_in_a_scale_that_requires_grad():
    G, H = torch.randn(170, 4), torch.randn(170, 1200)
    s = torch.tensor(0.7, requires_grad=True)
    acc = gram.GramSum(symmetric=True)
    acc.gram(G, G, s)
    acc.gram(H, H, 2.0)
    W = torch.randn(170, 170)
    (acc.result() * W).sum().backward()
    assert rel_err(s.grad, (W * (G @ G.T)).sum()) <= 1e-12


def test_symmetric_patch_gram_fills_the_upper_triangle(monkeypatch):
    """Several example blocks: those wholly below the diagonal are skipped, the rest exact."""
    A, B = torch.randn(7, 5, 6), torch.randn(7, 3, 5, 4)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 3 * 3 * 25 * 4)  # 2 × 2 examples a block
    full = gram.patch_gram(A, B, A, B, 2)
    upper = gram.patch_gram(A, B, A, B, 2, True)
    Gw = torch.einsum("nosgj,nsgi->nogji", B.reshape(7, 3, 5, 2, 2), A.reshape(7, 5, 2, 3))
    Gw = Gw.reshape(21, -1)
    assert rel_err(full, Gw @ Gw.T) <= 1e-12
    assert upper[15:, :6].abs().max() == 0  # examples 5, 6 against 0, 1: skipped
    assert rel_err(blocks.mirror_upper(upper), Gw @ Gw.T) <= 1e-12


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_gram_sums_the_column_blocks(monkeypatch, symmetric):
    """``G = Σ_s B_s A_sᵀ`` in blocks of 4, 4, 3 input columns (odd ``n``, ``S``)."""
    monkeypatch.setattr(gram, "NARROW", 1)
    monkeypatch.setattr(gram, "WORK_ELEMENTS", 7 * 3 * 5 * 4)
    A1, B1 = torch.randn(7, 9, 11), torch.randn(7, 3, 9, 5)
    A2, B2 = (A1, B1) if symmetric else (torch.randn(4, 9, 11), torch.randn(4, 3, 9, 5))
    acc = gram.GramSum(symmetric)
    gram.blocked_gram(acc, A1, B1, A2, B2, 0.5)
    G1 = torch.einsum("nosj,nsi->noji", B1, A1).reshape(21, -1)
    G2 = torch.einsum("nosj,nsi->noji", B2, A2).reshape(B2.shape[0] * 3, -1)
    assert rel_err(acc.result(), 0.5 * G1 @ G2.T) <= 1e-12


# ------------------------------------------------------------------ the engine, end to end
def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # holds its factors A, B
        nn.Tanh(),
        nn.Conv2d(8, 4, 3, padding=1, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return set_running_stats(net).eval()


@pytest.mark.parametrize("route", [None, "contraction", "patch"])
def test_dense_k_symmetric_and_plain_routes_match_jacrev(monkeypatch, route):
    """``X2 is X1`` (symmetric route, 8 leaves) and a copy of ``X1`` (plain route), N = 9."""
    monkeypatch.setattr(blocks, "LEAF_ROWS", 4)  # N·O = 27 rows: 8 leaves
    monkeypatch.setattr(gram, "NARROW", 50)  # conv weights wide, biases and BatchNorm narrow
    monkeypatch.setattr(gram, "WORK_ELEMENTS", 64)  # held factors: blocks of 7 columns
    blocked = []
    real = gram.blocked_gram
    monkeypatch.setattr(gram, "blocked_gram", lambda *a: blocked.append(1) or real(*a))
    if route is not None:
        monkeypatch.setattr(gram, "choose_route", lambda *a: route)
    net = small_cnn()
    X = torch.randn(9, 2, 6, 6)
    lin = Linearization(net, implementation="structured")
    J = jacrev_jacobian(net, X).reshape(27, -1)
    assert {type(layer.module) for layer in lin.engine.plan.layers} >= {nn.Conv2d, nn.BatchNorm2d}
    K = lin.ntk_dense(X)
    assert rel_err(K, J @ J.T) <= 1e-8
    assert torch.equal(K, K.T)
    # the strided conv keeps its factors A, B, contracted block by block of input columns
    assert (route == "contraction") <= bool(blocked)
    Y = torch.randn(5, 2, 6, 6)
    J2 = jacrev_jacobian(net, Y).reshape(15, -1)
    assert rel_err(lin.ntk_dense(X, X.clone()), J @ J.T) <= 1e-8
    assert rel_err(lin.ntk_dense(X, Y), J @ J2.T) <= 1e-8
    assert rel_err(lin.ntk_dense(Y, X), J2 @ J.T) <= 1e-8


def test_dense_k_stays_differentiable_in_the_variance():
    check_dense_variance_gradient(small_cnn(), torch.randn(6, 2, 6, 6))
