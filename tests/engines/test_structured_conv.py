"""Factored Conv1d/Conv2d products against a dense float64 ``torch.func.jacrev`` reference.

Every stride, padding (int, tuple, ``"same"`` incl. asymmetric, ``"valid"``), dilation,
groups (incl. depthwise) and padding mode, with and without bias; the zoo's convolutional
networks; a ResNet-style block (BatchNorm in eval mode, residual add, strided and grouped
convolutions, pooling). Each test also asserts that the convolutions *are* factored (a
demoted layer would pass through the generic route), and that a wrong factored product or
patch Gram is caught by the proof, not used.
"""

from __future__ import annotations

import pytest
import torch
from product_checks import check
from torch import nn
from zoo import ZOO, ZOO_IDS

import pyro_ntk._engines.structured.factors as factors
import pyro_ntk._engines.structured.gram as gram
import pyro_ntk._engines.structured.products as products
from pyro_ntk import Linearization

CONV_TYPES = (nn.Conv1d, nn.Conv2d)
# torch's own notice for asymmetric "same" padding (an even d·(k − 1)): expected here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def factored_convs(lin: Linearization) -> set[str]:
    return {
        layer.module_name
        for layer in lin.engine.plan.layers
        if isinstance(layer.module, CONV_TYPES)
    }


def conv_names(net: nn.Module) -> set[str]:
    return {n for n, m in net.named_modules() if isinstance(m, CONV_TYPES)}


# ------------------------------------------------------------------ the grid
# (kwargs, input spatial size); channels 4 → 6 (groups 1, 2) or 4 → 4/8 (depthwise)
GRID_2D = [
    (dict(kernel_size=3), 6),
    (dict(kernel_size=3, stride=2, padding=1), 7),
    (dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0)), 6),
    (dict(kernel_size=3, dilation=2, padding=2), 7),
    (dict(kernel_size=(3, 2), padding="same"), 5),  # asymmetric along the width
    (dict(kernel_size=4, padding="same", dilation=1), 6),  # asymmetric both ways
    (dict(kernel_size=3, padding="valid", bias=False), 5),
    (dict(kernel_size=3, groups=2, padding=1), 5),
    (dict(kernel_size=3, groups=4, out_channels=8, stride=2), 7),  # depthwise ×2
    (dict(kernel_size=3, groups=4, out_channels=4, padding="same", bias=False), 5),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), 5),
    (dict(kernel_size=3, padding=(1, 2), padding_mode="replicate", stride=2), 6),
    (dict(kernel_size=3, padding=1, padding_mode="circular", groups=2, dilation=2), 6),
    (dict(kernel_size=(2, 2), padding="same", padding_mode="reflect", groups=2), 5),
    (dict(kernel_size=1, stride=2), 5),
]
GRID_1D = [
    (dict(kernel_size=3), 9),
    (dict(kernel_size=3, stride=2, dilation=2, padding=2), 11),
    (dict(kernel_size=4, padding="same"), 8),  # asymmetric
    (dict(kernel_size=2, padding="same", dilation=3, bias=False), 8),
    (dict(kernel_size=3, groups=2, padding="valid"), 9),
    (dict(kernel_size=3, groups=4, out_channels=8, padding=1), 7),  # depthwise ×2
    (dict(kernel_size=3, padding=2, padding_mode="reflect"), 8),
    (dict(kernel_size=3, padding=1, padding_mode="replicate", stride=3), 10),
    (dict(kernel_size=5, padding="same", padding_mode="circular", groups=2), 7),
]


def conv_net(conv_type: type[nn.Module], kwargs: dict, size: int) -> tuple[nn.Module, tuple]:
    """conv(4 → C) → tanh → conv(C → 3, 3 × 3 "same", 1 group) → flatten → Linear(·, 2)."""
    kw = {"in_channels": 4, "out_channels": 6, **kwargs}
    first = conv_type(**kw)
    shape = (4,) + (size,) * (2 if conv_type is nn.Conv2d else 1)
    second = conv_type(kw["out_channels"], 3, 3, padding="same")
    with torch.no_grad():
        inner = second(torch.tanh(first(torch.zeros(1, *shape))))
    net = nn.Sequential(
        first, nn.Tanh(), second, nn.Tanh(), nn.Flatten(), nn.Linear(inner.numel(), 2)
    )
    return net, shape


def grid_id(case) -> str:
    kwargs, size = case
    return "-".join(f"{k}={v}" for k, v in kwargs.items()).replace(" ", "") + f"-{size}"


@pytest.mark.parametrize(
    "conv_type, case",
    [(nn.Conv2d, c) for c in GRID_2D] + [(nn.Conv1d, c) for c in GRID_1D],
    ids=[f"2d-{grid_id(c)}" for c in GRID_2D] + [f"1d-{grid_id(c)}" for c in GRID_1D],
)
def test_conv_grid_matches_jacrev(conv_type, case):
    net, shape = conv_net(conv_type, *case)
    X1, X2 = torch.randn(5, *shape), torch.randn(3, *shape)
    lin = check(net, X1, X2)
    assert factored_convs(lin) == {"0", "2"}, lin.engine.plan.reasons


@pytest.mark.parametrize("route", ["patch", "contraction"])
@pytest.mark.parametrize("conv_type, case", [(nn.Conv2d, GRID_2D[12]), (nn.Conv1d, GRID_1D[5])])
def test_both_dense_routes_match_jacrev(monkeypatch, conv_type, case, route):
    monkeypatch.setattr(gram, "choose_route", lambda *args, **kw: route)
    monkeypatch.setattr(factors, "prefer_gradients", lambda *a: False)  # keep the factors
    net, shape = conv_net(conv_type, *case)
    check(net, torch.randn(4, *shape), torch.randn(3, *shape))


def test_route_rule_follows_the_flop_count():
    layer = type("L", (), {"in_width": 64 * 9, "d_out": 64, "d_in": 64 * 9, "groups": 1})
    # a 2 × 2 map, 10 outputs: the patch Gram (4·4·(576 + 6400 + 100)) beats O²·P_W
    assert gram.choose_route(layer, S=4, O=10, n1=512, n2=512) == "patch"
    # a 32 × 32 map: S² dominates, the contraction wins
    assert gram.choose_route(layer, S=1024, O=10, n1=512, n2=512) == "contraction"
    assert gram.patch_gram_flops(4, 576, 64, 10, 1) == 16 * (576 + 6400 + 100)


# ------------------------------------------------------------------ the zoo and a ResNet block
ZOO_CONV = [
    "conv1d_stride_dilation",
    "conv2d_groups_dilation",
    "pools",
    "batchnorm2d",
    "groupnorm",
    "resnet_block",
    "relu_inplace_conv",
]


@pytest.mark.parametrize("name", ZOO_CONV)
def test_zoo_conv_networks_match_jacrev(name):
    case = ZOO[ZOO_IDS.index(name)]
    net, X1 = case.build(n=5)
    lin = check(net, X1, case.make_inputs(3), chunk_size=3)
    assert factored_convs(lin) == conv_names(net), lin.engine.plan.reasons


class Block(nn.Module):
    """Strided grouped conv-BN-ReLU, conv-BN, projected skip (strided 1×1 conv + BN), add."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, 2, 1, groups=groups, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, 2, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.skip(x))


def resnet_style() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        Block(4, 8, groups=2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def test_resnet_style_block_matches_jacrev():
    net = resnet_style()
    lin = check(net, torch.randn(5, 3, 8, 8), torch.randn(4, 3, 8, 8), chunk_size=4)
    assert factored_convs(lin) == conv_names(net), lin.engine.plan.reasons
    bn = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    kinds = {layer.module_name: layer.kind for layer in lin.engine.plan.layers}
    assert {n for n, k in kinds.items() if k == "batchnorm"} == bn
    assert lin.engine.plan.generic == []


# ------------------------------------------------------------------ the proof catches errors
def test_a_wrong_factored_product_is_demoted_not_used(monkeypatch):
    real = factors.conv_patches

    def wrong(layer, a):  # patches of a grouped convolution off by 1 %
        return real(layer, a) * (1.01 if layer.groups > 1 else 1.0)

    monkeypatch.setattr(factors, "conv_patches", wrong)
    net, shape = conv_net(nn.Conv2d, *GRID_2D[7])  # the first conv has 2 groups
    lin = check(net, torch.randn(4, *shape), torch.randn(3, *shape))
    assert factored_convs(lin) == {"2"}
    assert "disagree" in lin.engine.plan.reasons["0"]


def test_a_wrong_grouped_product_is_demoted_not_used(monkeypatch):
    real = products.grouped_pull
    monkeypatch.setattr(products, "grouped_pull", lambda *a: real(*a) * 1.01)
    monkeypatch.setattr(factors, "prefer_gradients", lambda *a: False)  # keep the factors
    net, shape = conv_net(nn.Conv1d, *GRID_1D[4])
    lin = check(net, torch.randn(4, *shape), torch.randn(3, *shape))
    assert factored_convs(lin) == set()


def test_a_wrong_patch_gram_is_switched_off(monkeypatch):
    real = gram.patch_gram
    monkeypatch.setattr(gram, "patch_gram", lambda *a: real(*a) * 1.01)
    monkeypatch.setattr(gram, "choose_route", lambda *args, **kw: "patch")
    monkeypatch.setattr(factors, "prefer_gradients", lambda *a: False)
    net, shape = conv_net(nn.Conv1d, *GRID_1D[1])
    lin = check(net, torch.randn(4, *shape), torch.randn(3, *shape))
    assert not lin.engine.plan.patch_gram
    assert factored_convs(lin) == {"0", "2"}


def test_kfac_factors_skip_grouped_convolutions():
    net = resnet_style()
    lin = Linearization(net, implementation="structured")
    names = {f.name for f in lin.layer_factors(torch.randn(4, 3, 8, 8))}
    grouped = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert grouped and not names & grouped
