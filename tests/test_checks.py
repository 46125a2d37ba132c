"""Bad input: every entry point raises the exact error type, naming itself and the argument.

Each row of the table is (call, error type, regular expressions the message must match):
the entry point, the argument, what was given and what was expected. Nothing is silently
cast or broadcast, and the network is left untouched (flags included) by a failed call.
"""

from __future__ import annotations

import re

import pytest
import torch
from networks import assert_unchanged, snapshot
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk._checks import check_inputs, check_positive_int, check_vector

N, N2, D, O, H = 4, 3, 3, 2, 5
P = D * H + H + H * O + O  # 32
G = 2


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, O))


def _X(n: int = N) -> torch.Tensor:
    return torch.randn(n, D)


def _nan() -> torch.Tensor:
    X = _X()
    X[1, 2] = float("nan")
    return X


def _inf() -> torch.Tensor:
    X = _X()
    X[0, 0] = float("inf")
    return X


# (id, call(lin), error type, patterns the message must contain)
CALL_CASES = [
    # ---- X: shape, dtype, values, type
    ("X_feature_shape", lambda lin: lin(torch.randn(N, D + 1)), ValueError,
     [r"^Linearization: X", r"\(4, 4\)", r"feature shape \(4,\)"]),
    ("X_feature_shape_jvp", lambda lin: lin.jvp(torch.randn(N, 2, D), torch.randn(P)), ValueError,
     [r"^Linearization\.jvp: X", r"feature shape \(2, 3\) gives 4 outputs"]),
    ("X2_feature_shape", lambda lin: lin.ntk_mvm(_X(), torch.randn(N2, 7), torch.randn(N2 * O)),
     ValueError, [r"^Linearization\.ntk_mvm: X2", r"\(3, 7\)"]),
    ("X1_feature_shape_dense", lambda lin: lin.ntk_dense(torch.randn(N, 1), _X()), ValueError,
     [r"^Linearization\.ntk_dense: X1", r"\(4, 1\)"]),
    ("X_float32", lambda lin: lin(_X().float()), TypeError,
     [r"^Linearization: X", r"torch\.float32", r"torch\.float64"]),
    ("X2_float32", lambda lin: lin.ntk_dense(_X(), _X().float()), TypeError,
     [r"ntk_dense: X2", r"float32", r"float64"]),
    ("X_integer_for_float_network", lambda lin: lin(torch.randint(0, 3, (N, D))), ValueError,
     [r"^Linearization: X", r"torch\.int64"]),
    ("X_nan", lambda lin: lin.ntk_diag(_nan()), ValueError,
     [r"^Linearization\.ntk_diag: X", r"1 NaN or infinite"]),
    ("X_inf", lambda lin: lin.jacobian(_inf()), ValueError,
     [r"^Linearization\.jacobian: X", r"NaN or infinite"]),
    ("X1_nan", lambda lin: lin.ntk_mvm(_nan(), None, torch.randn(N * O)), ValueError,
     [r"ntk_mvm: X1", r"NaN"]),
    ("X_empty", lambda lin: lin(torch.randn(0, D)), ValueError,
     [r"^Linearization: X", r"empty", r"\(0, 3\)", r"N >= 1"]),
    ("X2_empty", lambda lin: lin.ntk_dense(_X(), torch.randn(0, D)), ValueError,
     [r"ntk_dense: X2", r"empty"]),
    ("X_list", lambda lin: lin([[0.0, 1.0, 2.0]]), TypeError,
     [r"^Linearization: X", r"torch\.Tensor", r"list"]),
    ("X_numpy", lambda lin: lin.jvp(_X().numpy(), torch.randn(P)), TypeError,
     [r"jvp: X", r"ndarray"]),
    ("X_scalar", lambda lin: lin(torch.tensor(1.0)), ValueError,
     [r"^Linearization: X", r"scalar", r"batch dimension"]),
    ("X_meta_device", lambda lin: lin(torch.empty(N, D, device="meta")), ValueError,
     [r"^Linearization: X", r"meta", r"cpu"]),
    # ---- v (jvp)
    ("v_length", lambda lin: lin.jvp(_X(), torch.randn(P + 1)), ValueError,
     [r"^Linearization\.jvp: v", r"\(33,\)", r"\(32,\)", r"P"]),
    ("v_3d", lambda lin: lin.jvp(_X(), torch.randn(P, 2, 2)), ValueError,
     [r"jvp: v", r"\(32, 2, 2\)", r"\(32, k\)"]),
    ("v_transposed", lambda lin: lin.jvp(_X(), torch.randn(2, P)), ValueError,
     [r"jvp: v", r"\(2, 32\)"]),
    ("v_float32", lambda lin: lin.jvp(_X(), torch.randn(P).float()), TypeError,
     [r"jvp: v", r"float32", r"float64"]),
    ("v_nan", lambda lin: lin.jvp(_X(), torch.full((P,), float("nan"))), ValueError,
     [r"jvp: v", r"NaN"]),
    ("v_list", lambda lin: lin.jvp(_X(), [0.0] * P), TypeError, [r"jvp: v", r"list"]),
    # ---- u (vjp)
    ("u_rows", lambda lin: lin.vjp(_X(), torch.randn(N + 1, O)), ValueError,
     [r"^Linearization\.vjp: u", r"\(5, 2\)", r"\(4, 2\)"]),
    ("u_outputs", lambda lin: lin.vjp(_X(), torch.randn(N, O + 1, 2)), ValueError,
     [r"vjp: u", r"\(4, 3, 2\)", r"\(4, 2, k\)"]),
    ("u_flat", lambda lin: lin.vjp(_X(), torch.randn(N * O)), ValueError,
     [r"vjp: u", r"\(8,\)"]),
    ("u_4d", lambda lin: lin.vjp(_X(), torch.randn(N, O, 2, 2)), ValueError, [r"vjp: u"]),
    ("u_float32", lambda lin: lin.vjp(_X(), torch.randn(N, O).float()), TypeError,
     [r"vjp: u", r"float32"]),
    # ---- V (ntk_mvm)
    ("V_rows", lambda lin: lin.ntk_mvm(_X(), _X(N2), torch.randn(N * O)), ValueError,
     [r"^Linearization\.ntk_mvm: V", r"\(8,\)", r"\(6,\)", r"N2·O"]),
    ("V_rows_cols", lambda lin: lin.ntk_mvm(_X(), None, torch.randn(N, 2)), ValueError,
     [r"ntk_mvm: V", r"\(4, 2\)", r"\(8, k\)"]),
    ("V_3d", lambda lin: lin.ntk_mvm(_X(), None, torch.randn(N * O, 1, 1)), ValueError,
     [r"ntk_mvm: V", r"\(8, 1, 1\)"]),
    ("V_int", lambda lin: lin.ntk_mvm(_X(), None, torch.ones(N * O, dtype=torch.long)), TypeError,
     [r"ntk_mvm: V", r"int64"]),
    # ---- variance
    ("variance_G_plus_1", lambda lin: lin.ntk_mvm(_X(), None, torch.randn(N * O), torch.ones(G + 1)),
     ValueError, [r"^Linearization\.ntk_mvm: variance", r"\(3,\)", r"\(2,\)"]),
    ("variance_2d", lambda lin: lin.ntk_diag(_X(), torch.ones(G, 1)), ValueError,
     [r"^Linearization\.ntk_diag: variance", r"\(2, 1\)"]),
    ("variance_dense_shape", lambda lin: lin.ntk_dense(_X(), None, torch.ones(P)), ValueError,
     [r"^Linearization\.ntk_dense: variance", r"\(32,\)", r"\(2,\)"]),
    ("variance_float32", lambda lin: lin.ntk_diag(_X(), torch.ones(G, dtype=torch.float32)),
     TypeError, [r"ntk_diag: variance", r"float32", r"float64"]),
    ("variance_int_tensor", lambda lin: lin.ntk_diag(_X(), torch.tensor(2)), TypeError,
     [r"ntk_diag: variance", r"int64"]),
    ("variance_negative", lambda lin: lin.ntk_diag(_X(), torch.tensor([1.0, -0.5])), ValueError,
     [r"ntk_diag: variance", r"non-negative", r"-0\.5"]),
    ("variance_nan", lambda lin: lin.ntk_dense(_X(), None, float("nan")), ValueError,
     [r"ntk_dense: variance", r"NaN"]),
    ("variance_string", lambda lin: lin.ntk_diag(_X(), "1.0"), TypeError,
     [r"ntk_diag: variance", r"str"]),
]  # fmt: skip


@pytest.fixture
def lin_and_net():
    net = _net().train()
    before = snapshot(net)
    lin = Linearization(net)
    assert (lin.num_params, len(lin.groups), lin.output_dim(_X())) == (P, G, O)
    yield lin, net
    assert_unchanged(net, before)  # a failed call leaves the network and its flags alone


@pytest.mark.parametrize(
    "call, error, patterns", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES]
)
def test_bad_call(lin_and_net, call, error, patterns):
    lin, _ = lin_and_net
    with pytest.raises(error, match=patterns[0]) as info:
        call(lin)
    assert type(info.value) is error
    for pattern in patterns[1:]:
        assert re.search(pattern, str(info.value)), (pattern, info.value)


class _NoParams(nn.Module):
    def forward(self, x):
        return x


CONSTRUCT_CASES = [
    ("chunk_size_0", lambda: Linearization(_net(), chunk_size=0), ValueError,
     [r"^Linearization: chunk_size", r"positive int", r"got 0"]),
    ("chunk_size_negative", lambda: Linearization(_net(), chunk_size=-1), ValueError,
     [r"chunk_size", r"-1"]),
    ("chunk_size_float", lambda: Linearization(_net(), chunk_size=1.5), TypeError,
     [r"^Linearization: chunk_size", r"1\.5", r"float"]),
    ("chunk_size_str", lambda: Linearization(_net(), chunk_size="2"), TypeError,
     [r"chunk_size", r"str"]),
    ("chunk_size_bool", lambda: Linearization(_net(), chunk_size=True), TypeError,
     [r"chunk_size", r"bool"]),
    ("implementation_bogus", lambda: Linearization(_net(), implementation="bogus"), ValueError,
     [r"^Linearization: implementation", r"'bogus'", r"'functorch'", r"'auto'"]),
    ("network_function", lambda: Linearization(lambda x: x), TypeError,
     [r"^Linearization: network", r"nn\.Module", r"function"]),
    ("network_none", lambda: Linearization(None), TypeError, [r"network", r"NoneType"]),
    ("network_no_parameters", lambda: Linearization(nn.ReLU()), ValueError,
     [r"^Linearization: network", r"ReLU", r"no parameters"]),
    ("network_no_parameters_custom", lambda: Linearization(_NoParams()), ValueError,
     [r"network", r"_NoParams"]),
    ("params_nothing", lambda: Linearization(_net(), []), ValueError,
     [r"^Linearization: params selected no parameters", r"0\.weight"]),
    ("params_predicate_nothing", lambda: Linearization(_net(), lambda n, p: False), ValueError,
     [r"params selected no parameters"]),
    ("params_unknown", lambda: Linearization(_net(), ["2.weight", "3.weight"]), ValueError,
     [r"^Linearization: params", r"'3\.weight'"]),
    ("params_string", lambda: Linearization(_net(), "2.weight"), TypeError,
     [r"^Linearization: params", r"'2\.weight'"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "make, error, patterns", [c[1:] for c in CONSTRUCT_CASES], ids=[c[0] for c in CONSTRUCT_CASES]
)
def test_bad_construction(make, error, patterns):
    with pytest.raises(error, match=patterns[0]) as info:
        make()
    assert type(info.value) is error
    for pattern in patterns[1:]:
        assert re.search(pattern, str(info.value)), (pattern, info.value)


def test_mixed_parameter_dtypes_rejected():
    net = _net()
    net[2].float()
    with pytest.raises(TypeError, match=r"Linearization: network parameters have several dtypes"):
        Linearization(net)


def test_integer_inputs_checked_after_float_inputs_accepted():
    """The accepted-shape cache is keyed by dtype too: ints after floats still get a clear error."""
    lin = Linearization(_net())
    lin(_X())
    with pytest.raises(ValueError, match=r"^Linearization\.jvp: X .*torch\.int64"):
        lin.jvp(torch.ones(N, D, dtype=torch.long), torch.randn(P))


def test_integer_token_ids_pass_the_dtype_check():
    net = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 1))
    lin = Linearization(net)
    ids = torch.randint(0, 6, (N, 2))
    assert lin(ids).shape == (N, 1)
    with pytest.raises(ValueError, match=r"^Linearization: X .*\(4, 3\)"):
        lin(torch.randint(0, 6, (N, 3)))


def test_output_dim_mismatch_across_feature_shapes():
    """A network whose O depends on the input's feature shape is rejected, not mixed up."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Flatten())
    lin = Linearization(net)
    assert lin.output_dim(torch.randn(N, 3, 2)) == 6
    with pytest.raises(ValueError, match=r"gives 8 outputs per example; earlier inputs gave 6"):
        lin(torch.randn(N, 4, 2))


def test_network_returning_tuple():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(D, 1)

        def forward(self, x):
            return self.a(x), x

    with pytest.raises((TypeError, ValueError), match=r"single tensor.*tuple"):
        Linearization(Two())(_X())


# ---- the helpers themselves
def test_check_helpers_name_entry_point_and_argument():
    with pytest.raises(TypeError, match=r"^where: arg must be a torch\.Tensor, got int"):
        check_inputs("where", "arg", 3, torch.float64, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^where: arg has shape \(2, 3\); expected \(5,\)"):
        check_vector("where", "arg", torch.zeros(2, 3), 5, torch.float64, torch.device("cpu"), "n")
    assert check_positive_int("w", "n", None, allow_none=True) is None
    assert check_positive_int("w", "n", 3) == 3
    with pytest.raises(TypeError, match=r"^w: n must be a positive int, got None"):
        check_positive_int("w", "n", None)


# ---- a missing feature or batch dimension on 1-D inputs
def test_1d_inputs_name_the_shape_they_should_have():
    from pyro_ntk import EmpiricalNTK

    one = nn.Sequential(nn.Linear(1, H), nn.Tanh(), nn.Linear(H, 1))
    x = torch.linspace(0, 1, 6)
    for call, where in (
        (lambda: Linearization(one).ntk_dense(x), "Linearization.ntk_dense: X1"),
        (lambda: Linearization(one)(x[:1]), "Linearization: X"),  # N = 1 too
    ):
        with pytest.raises(ValueError, match=rf"^{re.escape(where)} has shape \(\d,\); the "
                           r"network's first layer \(Linear\) takes 1 feature per example, so "
                           r"X1? should be \(\d, 1\): use X1?\.unsqueeze\(-1\)\.$") as info:  # fmt: skip
            call()
        assert isinstance(info.value.__cause__, RuntimeError)
    # one example of D features without its batch dimension
    with pytest.raises(ValueError, match=r"X has shape \(3,\); .* takes 3 features per example, "
                       r"so X should be \(1, 3\) \(one example\): use X\.unsqueeze\(0\)"):  # fmt: skip
        Linearization(_net())(torch.randn(D))
    # no fix explains it: torch's error, named and kept as the cause
    with pytest.raises(ValueError, match=r"^Linearization: X has shape \(4,\) and dtype .*"
                       r"feature shape \(\) or dtype the network rejects") as info:  # fmt: skip
        Linearization(_net())(torch.randn(4))
    assert isinstance(info.value.__cause__, RuntimeError)
    # the Pyro kernel follows Pyro's convention: (N,) is N inputs of one feature
    kernel = EmpiricalNTK(one)
    torch.testing.assert_close(kernel(x), kernel(x.unsqueeze(-1)))
    with pytest.raises(ValueError, match=r"^EmpiricalNTK: X has shape \(6, 1\)"):
        EmpiricalNTK(_net())(x)
