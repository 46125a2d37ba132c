"""The test zoo: small seeded networks and inputs shared by the whole test suite.

Every case is a :class:`Case` (network, input factory, parameter selector) built in the
default dtype (float64 under ``conftest.py``). Cases with BatchNorm carry non-trivial
running statistics so that eval mode matters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Case:
    name: str
    make_network: Callable[[], nn.Module]
    make_inputs: Callable[[int], torch.Tensor]
    params: object = None  # selector passed to Linearization(params=...)

    def build(self, n: int = 6, seed: int = 0):
        torch.manual_seed(seed)
        net = self.make_network()
        return net, self.make_inputs(n)


def _mlp(act: type[nn.Module], d_in: int = 3, width: int = 8, d_out: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, d_out)
    )


def _cnn(d_out: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, d_out),
    )


def _batchnorm() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 1))


def _tab(n: int) -> torch.Tensor:
    return torch.randn(n, 3)


def _img(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6)


CASES: list[Case] = [
    Case("tanh_mlp", lambda: _mlp(nn.Tanh), _tab),
    Case("relu_mlp", lambda: _mlp(nn.ReLU), _tab),
    Case("cnn", _cnn, _img),
    Case("multi_output", lambda: _mlp(nn.Tanh, d_out=3), _tab),
    Case("batchnorm", _batchnorm, _tab),
    Case("layernorm", _layernorm, _tab),
    Case("last_layer", lambda: _mlp(nn.Tanh, d_out=2), _tab, params=["4.weight", "4.bias"]),
    Case(
        "predicate_weights",
        lambda: _mlp(nn.Tanh),
        _tab,
        params=lambda name, p: name.endswith("weight"),
    ),
]
CASE_IDS = [c.name for c in CASES]


def set_running_stats(net: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics, so eval mode matters."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def group_scale(net: nn.Module, values: torch.Tensor, names=None) -> torch.Tensor:
    """Per-parameter σ² from per-layer values (groups = owning modules, in order), built from
    the parameter names, not from the engine; ``names``: only these parameters (a
    linearization's ``lin.space.names``), all by default."""
    layers, out = [], []
    for name, p in net.named_parameters():
        if names is not None and name not in names:
            continue
        layer = name.rsplit(".", 1)[0] if "." in name else ""
        if layer not in layers:
            layers.append(layer)
        out.append(values[layers.index(layer)].expand(p.numel()))
    return torch.cat(out)


def snapshot(net: nn.Module) -> dict:
    """Everything about a network that pyro_ntk must leave bitwise unchanged."""
    return {
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in net.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in net.named_buffers()},
        "training": [m.training for m in net.modules()],
        "grads": {
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in net.named_parameters()
        },
        "hooks": {
            name: {attr: dict(getattr(m, attr)) for attr in _HOOK_DICTS if hasattr(m, attr)}
            for name, m in net.named_modules()
        },
    }


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def assert_unchanged(net: nn.Module, before: dict) -> None:
    after = snapshot(net)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    # same hook dicts, same keys, the very same hook objects
    assert after["hooks"].keys() == before["hooks"].keys()
    for name, attrs in before["hooks"].items():
        for attr, hooks in attrs.items():
            now = after["hooks"][name][attr]
            assert now.keys() == hooks.keys(), f"{name}.{attr} keys changed"
            assert all(now[k] is hooks[k] for k in hooks), f"{name}.{attr} hooks replaced"
    for kind in ("params", "buffers"):
        assert after[kind].keys() == before[kind].keys()
        for n, t in before[kind].items():
            assert torch.equal(after[kind][n], t), f"{kind} {n} changed"
            # bitwise: also dtype/device/stride-independent equality of the bytes
            assert after[kind][n].dtype == t.dtype and after[kind][n].device == t.device
    for n, g in before["grads"].items():
        g2 = after["grads"][n]
        assert (g is None) == (g2 is None), f"grad of {n} created or dropped"
        assert g is None or torch.equal(g, g2), f"grad of {n} changed"


def trained_regression_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 10-24-24-1 tanh MLP trained 300 Adam steps on 200 rows of sklearn's diabetes.

    Returns the network and the 242 held-out rows ``(X, y)`` (standardized), whose NTK
    preconditioner tests solve with.
    """
    from sklearn.datasets import load_diabetes

    data, target = load_diabetes(return_X_y=True)
    X = torch.tensor(data)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(target)
    y = (y - y.mean()) / y.std()
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 1)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        (net(X[:200]).squeeze(-1) - y[:200]).square().mean().backward()
        opt.step()
    return net, X[200:], y[200:]
