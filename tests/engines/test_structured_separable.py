"""The channel-separable dense K of the structured engine against dense float64 references.

Layers whose sensitivities reach the outputs only through channel-wise maps (BatchNorm in
eval mode, ReLU, residual add, global average pool) and a final Linear layer are rank one
per (example, channel); their dense K (symmetric, cross, several chunks and pair blocks,
factors held or per-example gradients held, grouped, with bias) must equal ``J Jᵀ`` of
``jacrev``. Where the rank-one test fails (a conv feeding a Linear on the flattened map;
a side path that switches on for some inputs only; deliberately corrupted factors) the
layer takes the general route, the fallback is recorded, and K is still right.
"""

from __future__ import annotations

import pytest
import torch
from networks import set_running_stats
from product_checks import check_dense_variance_gradient, jacrev_jacobian, rel_err
from torch import nn

import pyro_ntk._engines.structured.separable as sep
from pyro_ntk import Linearization
from pyro_ntk._engines.structured.gram import layers_block
from pyro_ntk._engines.structured.products import piece_scales
from pyro_ntk._engines.structured.separable_layers import SeparableLayers


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a projected skip (1×1 conv, BN), add, ReLU."""

    def __init__(self, c_in: int, c_out: int, groups: int, bias: bool):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, groups=groups, bias=bias)
        self.b2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, 2, bias=bias), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.skip(x))


def resnet(groups: int = 1, bias: bool = False, side: int = 4) -> nn.Module:
    """Stem, one residual block, global average pool, Linear head with 3 outputs."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        Block(4, 6, groups, bias),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return set_running_stats(net).eval()


SEPARABLE = {"3.c2", "3.b2", "3.skip.0", "3.skip.1"}


def dense_check(net, X, Y, chunk_size=None) -> Linearization:
    lin = Linearization(net, implementation="structured", chunk_size=chunk_size)
    J = jacrev_jacobian(net, X).reshape(X.shape[0] * 3, -1)
    J2 = jacrev_jacobian(net, Y).reshape(Y.shape[0] * 3, -1)
    K = lin.ntk_dense(X)
    assert rel_err(K, J @ J.T) <= 1e-8
    assert torch.equal(K, K.T)
    assert rel_err(lin.ntk_dense(X, Y), J @ J2.T) <= 1e-8
    assert rel_err(lin.ntk_dense(Y, X), J2 @ J.T) <= 1e-8
    return lin


@pytest.mark.parametrize("groups, bias", [(1, False), (2, True)])
def test_separable_dense_k_matches_jacrev(groups, bias):
    """The last block's conv (factors A, B held), skip conv (gradients held) and BatchNorms."""
    net = resnet(groups, bias)
    lin = dense_check(net, torch.randn(5, 2, 4, 4), torch.randn(4, 2, 4, 4))
    eng = lin.engine
    held = {layer.module_name: i for i, layer in enumerate(eng.plan.layers)}
    fac = eng._factors(torch.randn(2, 2, 4, 4))
    assert fac.B[held["3.c2"]] is not None  # the from_factors path
    assert fac.wgrads[held["3.skip.0"]] is not None  # the from_gradients path
    assert eng.separable.candidates == SEPARABLE
    assert set(eng.separable.taken) == SEPARABLE and not eng.separable.fallbacks
    # conv, its BatchNorm and the skip branch added to it: one shared contraction
    assert eng.separable.shared == {"3.b2": "3.c2", "3.skip.0": "3.c2", "3.skip.1": "3.c2"}
    assert any(d.subject == "3.c2, 3.b2, 3.skip.0, 3.skip.1" for d in lin.plan.decisions)
    subjects = {d.subject for d in lin.plan.decisions if "channel-separable" in d.reason}
    kinds = {
        "3.c2": "Conv2d",
        "3.skip.0": "Conv2d",
        "3.b2": "BatchNorm2d",
        "3.skip.1": "BatchNorm2d",
    }
    assert subjects == {f"{n} ({k})" for n, k in kinds.items()}


def test_separable_dense_k_over_chunks_and_pair_blocks(monkeypatch):
    """Several chunks (cross blocks between them) and several pair blocks of ``T`` each."""
    monkeypatch.setattr(sep, "WORK_ELEMENTS", 3 * 18 * 2)  # 2 pairs per block of T
    lin = dense_check(resnet(2, True), torch.randn(7, 2, 4, 4), torch.randn(5, 2, 4, 4), 3)
    assert lin.engine.separable.taken["3.c2"] >= 9


def test_separable_dense_k_stays_differentiable_in_the_variance():
    lin = check_dense_variance_gradient(resnet(2, True), torch.randn(5, 2, 4, 4))
    assert lin.engine.separable.taken


def test_conv_feeding_a_flattened_linear_is_not_separable():
    """Position-dependent head weights: ∂f/∂z is not rank one; the general route is exact."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    lin = dense_check(net, torch.randn(5, 2, 4, 4), torch.randn(4, 2, 4, 4))
    eng = lin.engine
    assert not eng.separable.candidates and not eng.separable.taken
    assert eng.separable.rejected["0"] > 1e-2  # tested on the probe, far from rank one


class Gated(nn.Module):
    """Pooled head, plus a flattened side path that is zero unless the activations pass 2."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.side = nn.Linear(64, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.head(h.mean((2, 3))) + self.side(torch.relu(h - 2.0).flatten(1))


def test_a_batch_that_fails_the_test_falls_back_and_is_recorded():
    """Proven separable on small inputs; on large ones the side path breaks the rank one."""
    net = Gated().eval()
    small, large = 0.05 * torch.randn(5, 2, 4, 4), 20 * torch.randn(4, 2, 4, 4)
    lin = dense_check(net, small, small[:3] + 0.01)
    eng = lin.engine
    assert eng.separable.candidates == {"conv"} and not eng.separable.fallbacks
    J = jacrev_jacobian(net, large).reshape(12, -1)
    assert rel_err(lin.ntk_dense(large), J @ J.T) <= 1e-8
    count, worst = eng.separable.fallbacks["conv"]
    assert count == 1 and worst > sep.tolerance(torch.float64)
    Js = jacrev_jacobian(net, small).reshape(15, -1)
    assert rel_err(lin.ntk_dense(small, large), Js @ J.T) <= 1e-8  # one chunk fails: both go
    assert eng.separable.fallbacks["conv"][0] == 2
    lines = [d for d in lin.plan.decisions if d.subject == "conv (Conv2d)"]
    assert any(d.route == "fallback" and "not rank one" in d.reason for d in lines)


@pytest.mark.parametrize("where", ["B", "wgrads"])
def test_corrupted_rank_one_factors_fail_the_test(where):
    """One (example, channel) slice off rank one by 1e-6 of its norm: caught, exact fallback.

    The separable Gram of the corrupted factors, were it used, would be off by far more
    than the 1e-8 of the references: the test is what keeps it out.
    """
    net = resnet()
    lin = Linearization(net, implementation="structured")
    X = torch.randn(4, 2, 4, 4)
    lin.ntk_dense(X)
    eng = lin.engine
    fac = eng._factors(X)
    i = [layer.module_name for layer in eng.plan.layers].index(
        "3.c2" if where == "B" else "3.skip.0"
    )
    held = getattr(fac, where)[i].clone()
    getattr(fac, where)[i] = held
    if where == "B":  # (n, O, S, C): example 1, channel 2
        held[1, 0, 0, 2] += 1e-6 * held[1, :, :, 2].norm()
    else:  # (n, O, C·d_in): example 1, the first input column of channel 2
        d_in = eng.plan.layers[i].d_in
        held[1, 0, 2 * d_in] += 1e-6 * held[1].norm()
    layer = eng.plan.layers[i]
    s = sep.separate(layer, fac, i)
    assert s.residual > sep.tolerance(torch.float64)
    G = fac.wgrad(i).reshape(12, -1)
    assert rel_err(sep.separable_gram(s, s, 1.0, 0.0, symmetric=False), G @ G.T) > 1e-8
    scales = piece_scales(eng.plan, None)
    book = SeparableLayers(candidates=set(SEPARABLE))
    K = layers_block(eng.plan, fac, fac, scales, separable=book)
    want = layers_block(eng.plan, fac, fac, scales, route="contraction")
    assert rel_err(K, want) <= 1e-12
    assert book.fallbacks[layer.module_name][0] == 1
    assert set(book.taken) == SEPARABLE - {layer.module_name}


class TwoBranch(nn.Module):
    """Two pooled conv branches of equal width feeding different columns of one Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.left = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.right = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        return self.head(h.mean((2, 3)))


def test_layers_of_different_directions_keep_their_own_contraction():
    """Same shapes, different head columns: each branch is its own group, K exact."""
    net = set_running_stats(TwoBranch()).eval()
    lin = dense_check(net, torch.randn(5, 2, 4, 4), torch.randn(4, 2, 4, 4))
    book = lin.engine.separable
    assert book.candidates == {"left.0", "left.1", "right.0", "right.1"}
    assert book.shared == {"left.1": "left.0", "right.1": "right.0"}


def test_a_wrong_shared_contraction_is_caught_on_the_probe(monkeypatch):
    """``λ`` off by 1 %: the probe check switches sharing off, reports it, K stays exact."""
    direction = sep.direction

    def off(a, ref):
        lam, rel = direction(a, ref)
        return 1.01 * lam, rel

    monkeypatch.setattr(sep, "direction", off)
    lin = dense_check(resnet(), torch.randn(5, 2, 4, 4), torch.randn(4, 2, 4, 4))
    book = lin.engine.separable
    assert not book.share and not book.shared and set(book.taken) == SEPARABLE
    lines = [d for d in lin.plan.decisions if d.subject == "3.c2, 3.b2, 3.skip.0, 3.skip.1"]
    assert [d.route for d in lines] == ["fallback"] and "shared" in lines[0].reason


def test_direction_factor_and_residual():
    """Parallel directions give λ and a rounding-level residual; 1e3·tol off or a zero ref fail."""
    ref = torch.randn(4, 3, 5)
    lam = torch.randn(4, 5)
    a = lam[:, None] * ref
    a[1, :, 2] = 0.0  # a zero direction joins anything
    got, rel = sep.direction(a, ref)
    keep = torch.ones_like(lam, dtype=torch.bool)
    keep[1, 2] = False
    assert rel <= 8 * torch.finfo(a.dtype).eps and torch.allclose(got[keep], lam[keep])
    tol = sep.tolerance(a.dtype)
    b = a.clone()
    b[2, 0, 1] += 1e3 * tol * b[2, :, 1].norm()
    assert sep.direction(b, ref)[1] > tol
    zero = ref.clone()
    zero[3, :, 4] = 0.0
    assert sep.direction(a, zero)[1] == 1.0  # nothing to be parallel to


def test_rank_one_test_tolerance_and_zero_slices():
    """Exact rank one passes (zero slices too); a perturbation of 1e3·tol of the norm fails."""
    a, D = torch.randn(6, 3, 1), torch.randn(6, 1, 5)
    M = a * D
    M[2] = 0.0
    _, _, rel = sep.rank_one(M)
    assert float(rel.max()) <= 4 * torch.finfo(M.dtype).eps and rel[2] == 0
    tol = sep.tolerance(M.dtype)
    assert tol == 256 * torch.finfo(torch.float64).eps
    assert sep.tolerance(torch.float32) == 256 * torch.finfo(torch.float32).eps
    assert sep.tolerance(torch.bfloat16) == sep.tolerance(torch.float16) == 1e-4  # capped
    M[4, 1, 3] += 1e3 * tol * M[4].norm()
    _, _, rel = sep.rank_one(M)
    assert rel[4] > tol and float(rel[torch.arange(6) != 4].max()) <= tol
