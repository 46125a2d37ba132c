"""The preflight (``pyro_ntk._engines.preflight``): what it establishes, refuses and records.

The zoo (``tests/test_zoo.py``) checks the numbers on many networks in float64; these tests
check the preflight's own contract: its refusals name the module and the fix, its decisions
are recorded in ``lin.plan`` / ``lin.explain()``, it leaves the caller's random stream,
network and inputs alone, and it catches what only shows in float32 (oneDNN's fused LSTM,
whose cells' in-place ops are hidden from a default-kernel scan).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from networks import assert_unchanged, snapshot
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.testing import reference_jacobian

ENGINES = ("functorch", "cached", "structured", "auto")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Noisy(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, training=True)


class RandomInEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.noise = Noisy()
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.noise(self.fc(x)))


@pytest.mark.parametrize("implementation", ENGINES)
def test_random_forward_is_refused_at_construction_with_example(implementation):
    net = RandomInEval()
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"random even in eval mode.*'noise' \(Noisy\)"):
        Linearization(net, implementation=implementation, example=torch.randn(4, 3))
    assert_unchanged(net, before)


class Counter(nn.Module):
    """Counts its calls in a buffer: a forward that writes into its own state."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x)


def test_forward_writing_a_buffer_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"writes in place.*\['calls'\]"):
        Linearization(Counter(), example=torch.randn(4, 3))


class ReluOnInput(nn.Module):
    """Flatten returns a view of the input, which ReLU(inplace=True) then overwrites."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.act(self.flat(x)))


@pytest.mark.parametrize("implementation", ENGINES)
def test_forward_writing_its_input_gets_a_copy(implementation):
    net = ReluOnInput()
    X = torch.randn(5, 2, 3)
    X0 = X.clone()
    lin = Linearization(net, implementation=implementation)
    K = lin.ntk_dense(X)
    V = torch.randn(10, 2)
    KV = lin.ntk_mvm(X, X, V)
    assert torch.equal(X, X0), "the caller's inputs were overwritten"
    J = reference_jacobian(net, X0).reshape(10, -1)
    assert rel_err(K, J @ J.T) <= 1e-8
    assert rel_err(KV, J @ (J.T @ V)) <= 1e-8
    assert "inputs are copied first" in lin.explain()


class WrongJVP(torch.autograd.Function):
    """y = 2x with a forward-mode formula that disagrees with its backward (3x)."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g

    @staticmethod
    def jvp(ctx, t):
        return 3 * t


class Inconsistent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return WrongJVP.apply(self.fc(x))


def test_inconsistent_forward_and_reverse_derivatives_are_refused():
    with pytest.raises(ValueError, match="forward-mode and reverse-mode derivatives"):
        Linearization(Inconsistent(), example=torch.randn(4, 3))


def test_global_random_stream_is_left_alone():
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    X = torch.randn(6, 3)
    for implementation in ENGINES:
        lin = Linearization(net, implementation=implementation)
        state = torch.get_rng_state()
        lin.ntk_dense(X)  # the preflight, the dense proof and auto's timing run here
        assert torch.equal(torch.get_rng_state(), state), implementation


class SequenceFirst(nn.Module):
    """A Linear on (T, N, d) tensors, and one on a learned (L, d) array."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.latents = nn.Parameter(torch.randn(3, 3))
        self.proj = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # x: (N, T, d)
        h = torch.tanh(self.fc(x.transpose(0, 1))).mean(0)  # (N, d)
        lat = self.proj(self.latents)  # (L, d): no example dimension
        return self.head(torch.softmax(h @ lat.T, -1) @ lat)


def test_plan_records_example_dimensions_and_demotions():
    net = SequenceFirst()
    lin = Linearization(net, implementation="structured", chunk_size=3)
    X = torch.randn(3, 3, 3)  # N = T = L = chunk size: a guessed dimension would be wrong
    K = lin.ntk_dense(X)
    J = reference_jacobian(net, X).reshape(6, -1)
    assert rel_err(K, J @ J.T) <= 1e-8
    text = lin.explain()
    assert "fc (Linear)" in text and "examples in dim 1" in text
    assert "proj (Linear)" in text and "no dimension follows the examples" in text
    routes = {d.subject.split(" ")[0]: d.route for d in lin.plan.decisions}
    assert routes["fc"] == "fast path" and routes["proj"] == "generic"
    assert [layer.module_name for layer in lin.engine.plan.layers] == ["fc", "head"]


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("implementation", ENGINES)
def test_float32_lstm_is_exact_to_float32_precision(implementation):
    # In float32 on CPU nn.LSTM runs oneDNN's fused kernel (no forward-mode formula, and its
    # in-place cell ops invisible to a default-kernel scan); the engines must still agree
    # with the float64 reference of the same weights, call after call.
    torch.manual_seed(0)
    net32 = LSTMHead().float()
    X = torch.randn(4, 3, 3, dtype=torch.float32)
    lin = Linearization(net32, implementation=implementation)
    J = reference_jacobian(copy.deepcopy(net32).double(), X.double()).reshape(8, -1)
    for _ in range(3):
        V = torch.randn(8, 2)
        got = lin.ntk_mvm(X, X, V.float()).double()
        assert rel_err(got, J @ (J.T @ V)) <= 1e-4
    assert rel_err(lin.ntk_dense(X).double(), J @ J.T) <= 1e-4


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _switches() -> dict:
    return {
        "mha fast path": torch.backends.mha.get_fastpath_enabled(),
        "cudnn": torch.backends.cudnn.enabled,
        "cudnn tf32": torch.backends.cudnn.allow_tf32,
        "matmul tf32": torch.backends.cuda.matmul.allow_tf32,
        "mkldnn": torch.backends.mkldnn.enabled,
    }


def test_torch_switches_are_restored_after_reference_kernels():
    # the attention fast path has no forward-mode formula: the reference kernels are used,
    # and every global switch they (and the full-precision comparisons) touch comes back
    before = _switches()
    lin = Linearization(Attention())
    X = torch.randn(4, 3, 4)
    lin.ntk_dense(X)
    lin.ntk_mvm(X, X, torch.randn(4))
    assert "reference kernels" in lin.explain()
    assert _switches() == before
