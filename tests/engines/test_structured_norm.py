"""Factored BatchNorm (eval mode) against a dense float64 ``torch.func.jacrev`` reference.

BatchNorm1d after a Linear layer and after a Conv1d, BatchNorm2d after convolutions in a
residual block, BatchNorm3d, ``affine=False``, γ or β alone linearized; each test asserts
the BatchNorm *is* factored (not on the generic route). BatchNorms that are not the fixed
affine map (train mode, no running statistics, a custom ``forward``) are demoted with a
reason, and a wrong factorization is caught by the per-layer proof, not used.
"""

from __future__ import annotations

import pytest
import torch
from product_checks import check
from torch import nn
from zoo import ZOO, ZOO_IDS

import pyro_ntk._engines.structured.factors as factors
import pyro_ntk._engines.structured.norm as norm
from pyro_ntk import Linearization
from pyro_ntk._engines.structured.norm import eval_problem, norm_kind
from pyro_ntk._engines.structured.plan import make_plan
from pyro_ntk.parameters import ParameterSpace

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def factored_norms(lin: Linearization) -> set[str]:
    return {layer.module_name for layer in lin.engine.plan.layers if layer.kind == "batchnorm"}


def norm_names(net: nn.Module, affine_only: bool = True) -> set[str]:
    return {
        n
        for n, m in net.named_modules()
        if isinstance(m, BN_TYPES) and (m.affine or not affine_only)
    }


def trained_stats(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as after training; eval mode."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BN_TYPES):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
    return net.eval()


class Block(nn.Module):
    """conv-BN-ReLU, conv-BN, projected skip (1×1 conv + BN), add, ReLU."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out, affine=affine)
        self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, 2, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.skip(x))


def residual_net(affine: bool = True) -> nn.Module:
    return trained_stats(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(inplace=True),
            Block(3, 4, affine),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )
    )


def mlp_bn1d() -> nn.Module:
    return trained_stats(
        nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    )


# ------------------------------------------------------------------ exact, and factored
def test_batchnorm1d_after_linear():
    net = mlp_bn1d()
    lin = check(net, torch.randn(5, 3), torch.randn(4, 3), chunk_size=3)
    assert factored_norms(lin) == {"1"}
    assert lin.engine.plan.generic == []


def test_batchnorm1d_on_sequences_after_conv1d():
    net = trained_stats(
        nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1),
            nn.BatchNorm1d(3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 5, 2),
        )
    )
    lin = check(net, torch.randn(4, 2, 5), torch.randn(3, 2, 5))
    assert factored_norms(lin) == {"1"}
    assert lin.engine.plan.generic == []


def test_batchnorm2d_in_a_residual_block():
    net = residual_net()
    lin = check(net, torch.randn(5, 2, 6, 6), torch.randn(3, 2, 6, 6), chunk_size=3)
    assert factored_norms(lin) == norm_names(net)
    assert lin.engine.plan.generic == []


def test_batchnorm_without_affine_parameters():
    net = residual_net(affine=False)
    lin = check(net, torch.randn(4, 2, 6, 6), torch.randn(3, 2, 6, 6))
    assert "3.b2" not in norm_names(net)
    assert factored_norms(lin) == norm_names(net)
    assert lin.engine.plan.generic == []


def test_batchnorm3d():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 16)
            self.bn = nn.BatchNorm3d(2)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h = self.bn(self.lin(x).reshape(-1, 2, 2, 2, 2))
            return self.head(torch.tanh(h).flatten(1))

    net = trained_stats(Net())
    lin = check(net, torch.randn(4, 3), torch.randn(3, 3))
    assert factored_norms(lin) == {"bn"}


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_gamma_or_beta_alone(which):
    net = residual_net()
    params = [n for n, _ in net.named_parameters() if n.endswith(which)]
    lin = check(net, torch.randn(4, 2, 6, 6), torch.randn(3, 2, 6, 6), params=params)
    assert factored_norms(lin) == norm_names(net)
    assert lin.engine.plan.generic == []


@pytest.mark.parametrize("name", ["batchnorm1d", "batchnorm2d", "resnet_block"])
def test_zoo_batchnorm_networks(name):
    case = ZOO[ZOO_IDS.index(name)]
    net, X1 = case.build(n=4)
    lin = check(net, X1, case.make_inputs(3), chunk_size=3)
    assert factored_norms(lin) == norm_names(net)


# ------------------------------------------------------------------ demoted, with a reason
def test_a_custom_batchnorm_forward_is_generic_with_a_reason():
    class Scaled(nn.BatchNorm1d):
        def forward(self, x):
            return 2.0 * super().forward(x)

    net = trained_stats(nn.Sequential(nn.Linear(3, 4), Scaled(4), nn.Tanh(), nn.Linear(4, 1)))
    lin = check(net, torch.randn(4, 3), torch.randn(3, 3))
    assert factored_norms(lin) == set()
    assert "not the stock" in lin.engine.plan.reasons["1"]
    assert lin.engine.plan.generic == ["1.weight", "1.bias"]


def test_batch_statistics_are_never_factored():
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    assert norm_kind(bn)[0] is None and "running statistics" in norm_kind(bn)[1]
    net = nn.Sequential(nn.Conv2d(1, 3, 3), bn)
    plan = make_plan(net, ParameterSpace(net, where="test"))
    assert "1" in plan.reasons and "1.weight" in plan.generic
    assert "train mode" in eval_problem(nn.BatchNorm2d(3).train())
    assert eval_problem(nn.BatchNorm2d(3).eval()) is None


def test_a_batchnorm_running_in_train_mode_is_demoted():
    net = mlp_bn1d()
    lin = Linearization(net, implementation="structured")
    X = torch.randn(4, 3)
    lin.jvp(X, torch.randn(lin.num_params, 1))  # preflight: the BatchNorm is factored
    assert factored_norms(lin) == {"1"}
    engine = lin.engine
    engine.network[1].train()  # as a forward that switches it would
    try:
        with pytest.raises(factors.Demote) as demoted:
            factors.build_factors(
                engine.plan, engine.f, engine.space.theta, engine.routes, engine.network, X
            )
    finally:
        engine.network[1].eval()
    assert "train mode" in demoted.value.reasons["1"]


# ------------------------------------------------------------------ the proof catches errors
@pytest.mark.parametrize("part", ["gamma", "beta"])
def test_a_wrong_batchnorm_factorization_is_demoted_not_used(monkeypatch, part):
    real = norm.norm_gradients

    def wrong(xhat, g):  # one of the two per-channel gradients off by 1 %
        wg, bs = real(xhat, g)
        return (wg * 1.01, bs) if part == "gamma" else (wg, bs * 1.01)

    monkeypatch.setattr(norm, "norm_gradients", wrong)
    net = residual_net()
    lin = check(net, torch.randn(4, 2, 6, 6), torch.randn(3, 2, 6, 6))
    assert factored_norms(lin) == set()
    for name in norm_names(net):
        assert "disagree" in lin.engine.plan.reasons[name]
    # the convolutions stay factored
    assert {layer.kind for layer in lin.engine.plan.layers} >= {"conv2d", "linear"}


def test_a_wrong_normalization_is_demoted_not_used(monkeypatch):
    real = norm.normalized
    monkeypatch.setattr(norm, "normalized", lambda m, x: real(m, x) + 0.01)
    net = mlp_bn1d()
    lin = check(net, torch.randn(4, 3), torch.randn(3, 3))
    assert factored_norms(lin) == set()
    assert "disagree" in lin.engine.plan.reasons["1"]
