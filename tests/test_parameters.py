"""Parameter selection, flat layout and groups of the linearized parameter space."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.parameters import ParameterSpace


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


ALL = ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize(
    "params, names",
    [
        (None, ALL),
        (["2.bias", "0.weight"], ["0.weight", "2.bias"]),  # network order, not list order
        (("2.weight",), ["2.weight"]),
        ({"0.bias"}, ["0.bias"]),
        (lambda name, p: name.startswith("2."), ["2.weight", "2.bias"]),
        (lambda name, p: p.dim() == 1, ["0.bias", "2.bias"]),
    ],
    ids=["none", "list", "tuple", "set", "predicate_name", "predicate_param"],
)
def test_selection(params, names):
    net = _net()
    lin = Linearization(net, params)
    assert list(lin.theta) == names
    own = dict(net.named_parameters())
    assert lin.num_params == sum(own[n].numel() for n in names)
    for n in names:
        assert torch.equal(lin.theta[n], own[n])
        assert not lin.theta[n].requires_grad
    # everything not selected is held fixed at θ*, buffers included
    assert set(lin.space.fixed) == set(ALL) - set(names)


def test_frozen_parameters_excluded_by_default_but_selectable_by_name():
    net = _net()
    net[2].bias.requires_grad_(False)
    assert list(Linearization(net).theta) == ALL[:3]
    assert list(Linearization(net, ["2.bias"]).theta) == ["2.bias"]
    assert not net[2].bias.requires_grad


def test_unknown_names_are_named():
    with pytest.raises(ValueError, match=r"params.*'bogus'.*'1\.weight'") as info:
        Linearization(_net(), ["0.weight", "bogus", "1.weight"])
    assert "0.weight" in str(info.value)  # the known names are listed as expected values


@pytest.mark.parametrize(
    "params",
    [[], (), lambda name, p: False],
    ids=["empty_list", "empty_tuple", "predicate_false"],
)
def test_selecting_nothing(params):
    with pytest.raises(ValueError, match=r"Linearization: params selected no parameters"):
        Linearization(_net(), params)


def test_all_frozen_selects_nothing():
    net = _net().requires_grad_(False)
    with pytest.raises(ValueError, match=r"params selected no parameters.*requires_grad"):
        Linearization(net)


@pytest.mark.parametrize(
    "params, match",
    [
        ("0.weight", r"params.*single string '0\.weight'"),
        (3, r"params.*int"),
        ([0, 1], r"params.*\['int'\]"),
    ],
    ids=["string", "int", "list_of_ints"],
)
def test_selector_type_errors(params, match):
    with pytest.raises(TypeError, match=match):
        Linearization(_net(), params)


def test_parameter_objects_rejected_with_hint():
    net = _net()
    with pytest.raises(TypeError, match=r"params.*Parameter.*predicate"):
        Linearization(net, list(net[2].parameters()))


def test_groups_are_owning_modules():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))
            self.body = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))

        def forward(self, x):
            return self.scale * self.body(x)

    lin = Linearization(Root())
    assert lin.groups == ["", "body.0", "body.2"]
    idx = lin.space.group_index()
    assert idx.tolist() == [0] + [1] * (6 + 3) + [2] * (3 + 1)
    var = torch.tensor([5.0, 6.0, 7.0])
    assert lin.space.expand_group_values(var).tolist() == [5.0] + [6.0] * 9 + [7.0] * 4
    assert torch.equal(lin.space.expand_group_values(torch.tensor(3.0)), torch.full((14,), 3.0))


def test_group_grams_sum_each_groups_rows():
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
    space = ParameterSpace(net, ["0.weight", "2.weight", "2.bias", "4.bias"], where="test")
    idx = space.group_index()
    assert idx.tolist() == [0] * 6 + [1] * 8 + [2]  # a group of two parameters, one of one
    A = torch.randn(space.num_params, 4, dtype=torch.float64)
    grams = space.group_grams(A)
    assert grams.shape == (3, 4, 4)
    for g in range(space.num_groups):
        Ag = A[idx == g]
        torch.testing.assert_close(grams[g], Ag.T @ Ag)
    torch.testing.assert_close(grams.sum(0), A.T @ A)


def test_flat_layout_round_trips():
    net = _net()
    space = ParameterSpace(net, None, where="test")
    P = space.num_params
    flat = torch.arange(float(P))
    tree = space.unflatten(flat)
    start = 0
    for (n, p), (m, t) in zip(net.named_parameters(), tree.items()):
        assert n == m and t.shape == p.shape
        assert torch.equal(t.reshape(-1), flat[start : start + p.numel()])
        start += p.numel()
    cols = torch.randn(P, 3)
    batched = space.unflatten_batched(cols)  # {name: (k, *shape)}
    assert all(batched[n].shape == (3, *space.theta[n].shape) for n in space.names)
    assert torch.equal(space.flatten_batched(batched).T, cols)


def test_theta_and_fixed_are_detached_copies():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    space = ParameterSpace(net, ["2.weight"], where="test")
    assert set(space.fixed) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "2.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    ptrs = {t.data_ptr() for t in [*net.parameters(), *net.buffers()]}
    for t in [*space.theta.values(), *space.fixed.values()]:
        assert t.data_ptr() not in ptrs
        assert not t.requires_grad
