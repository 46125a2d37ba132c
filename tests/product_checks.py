"""Shared checks of an engine's products against the dense float64 ``jacrev`` Jacobian."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev

from pyro_ntk import Linearization


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b| / max |b|``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def jacrev_jacobian(net: nn.Module, X: torch.Tensor, names=None) -> torch.Tensor:
    """``(N, O, P)`` by ``torch.func.jacrev`` of the whole batch (eval mode; ``names``: all)."""
    net = net.eval()
    params = dict(net.named_parameters())
    names = list(params) if names is None else names
    theta = {n: params[n].detach() for n in names}
    N = X.shape[0]
    jac = jacrev(lambda p: functional_call(net, p, (X,)).reshape(N, -1))(theta)
    return torch.cat([jac[n].reshape(N, jac[n].shape[1], -1) for n in names], dim=-1).detach()


def check(net, X1, X2, params=None, chunk_size=None) -> Linearization:
    """JV, JᵀU, K·v, dense K, cross K and diag K of the structured engine against ``jacrev`` (≤ 1e-8)."""
    lin = Linearization(net, params, implementation="structured", chunk_size=chunk_size)
    J1, J2 = jacrev_jacobian(net, X1, params), jacrev_jacobian(net, X2, params)
    N1, O, P = J1.shape
    N2 = J2.shape[0]
    A1, A2 = J1.reshape(N1 * O, P), J2.reshape(N2 * O, P)
    v = torch.randn(P, 3)
    assert rel_err(lin.jvp(X1, v), (A1 @ v).reshape(N1, O, 3)) <= 1e-8
    u = torch.randn(N2, O, 2)
    assert rel_err(lin.vjp(X2, u), A2.T @ u.reshape(N2 * O, 2)) <= 1e-8
    V = torch.randn(N2 * O, 2)
    assert rel_err(lin.ntk_mvm(X1, X2, V), A1 @ (A2.T @ V)) <= 1e-8
    assert rel_err(lin.ntk_dense(X1), A1 @ A1.T) <= 1e-8
    assert rel_err(lin.ntk_dense(X1, X2), A1 @ A2.T) <= 1e-8
    assert rel_err(lin.ntk_diag(X1), (A1 * A1).sum(-1)) <= 1e-8
    return lin
