"""Dense float64 references for tests and benchmarks, independent of the engines.

Everything here loops over examples in Python and uses ``torch.autograd.grad`` on the
user's network with *copied* parameters — slow, simple and obviously correct. It shares no
code with :mod:`pyro_ntk._engines`, so agreement with it is evidence, not tautology.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def _selected(network: nn.Module, params) -> list[str]:
    named = list(network.named_parameters())
    if params is None:
        return [n for n, p in named if p.requires_grad]
    if callable(params):
        return [n for n, p in named if params(n, p)]
    wanted = set(params)
    return [n for n, _ in named if n in wanted]


def reference_jacobian(network: nn.Module, X: Tensor, params=None) -> Tensor:
    """Dense Jacobian ``(N, O, P)`` at the network's current weights, one example at a time.

    Args:
        network: the network (a deep copy is differentiated, in eval mode).
        X: inputs ``(N, ...)``.
        params: the same selector :class:`pyro_ntk.Linearization` accepts.

    Returns:
        ``J[n, o, :] = ∂f_o(x_n)/∂θ``, parameters flattened in ``named_parameters()`` order.
    """
    net = copy.deepcopy(network).eval()
    names = _selected(network, params)
    named = dict(net.named_parameters())
    for p in net.parameters():
        p.requires_grad_(False)
    chosen = [named[n].requires_grad_(True) for n in names]
    rows = []
    for x in X:
        out = net(x.unsqueeze(0)).reshape(-1)
        per_output = []
        for o in range(out.shape[0]):
            grads = torch.autograd.grad(out[o], chosen, retain_graph=True, allow_unused=True)
            per_output.append(
                torch.cat(
                    [
                        torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                        for g, p in zip(grads, chosen)
                    ]
                )
            )
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def reference_ntk(
    network: nn.Module,
    X1: Tensor,
    X2: Tensor | None = None,
    params=None,
    scale: Tensor | None = None,
) -> Tensor:
    """Dense K(X1, X2) = J1 diag(scale) J2ᵀ, shape ``(N1·O, N2·O)``, rows ``n·O + o``."""
    J1 = reference_jacobian(network, X1, params)
    J2 = J1 if X2 is None else reference_jacobian(network, X2, params)
    A = J1.reshape(-1, J1.shape[-1])
    B = J2.reshape(-1, J2.shape[-1])
    if scale is not None:
        A = A * scale
    return A @ B.T


def reference_output(network: nn.Module, X: Tensor) -> Tensor:
    """f(X) in eval mode, shape ``(N, O)``."""
    net = copy.deepcopy(network).eval()
    with torch.no_grad():
        return net(X).reshape(X.shape[0], -1)
