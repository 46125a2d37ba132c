"""Shared checks of an engine's products against dense float64 Jacobians."""

from __future__ import annotations

import torch
from networks import group_scale
from torch import nn
from torch.func import functional_call, jacrev

from pyro_ntk import Linearization
from pyro_ntk.testing import reference_jacobian


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


def check(
    net, X1, X2, params=None, chunk_size=None, implementation="structured", layers=False
) -> Linearization:
    """JV, JᵀU, K·v (cross and X2 = X1), dense K (cross and X1), diag K and the Jacobian of an
    engine against the per-example autograd reference (``pyro_ntk.testing``, float64, ≤ 1e-8).

    ``layers``: the kernel products at random per-layer σ_g² in [0.5, 1.5) (σ² = 1 otherwise).
    """
    lin = Linearization(net, params, implementation=implementation, chunk_size=chunk_size)
    variance = torch.rand(len(lin.groups)) + 0.5 if layers else None
    J1, J2 = reference_jacobian(net, X1, params), reference_jacobian(net, X2, params)
    N1, O, P = J1.shape
    N2 = J2.shape[0]
    A1, A2 = J1.reshape(N1 * O, P), J2.reshape(N2 * O, P)
    s = torch.ones(P) if variance is None else group_scale(net, variance, lin.space.names)
    v = torch.randn(P, 3)
    assert rel_err(lin.jvp(X1, v), (A1 @ v).reshape(N1, O, 3)) <= 1e-8
    u = torch.randn(N2, O, 2)
    assert rel_err(lin.vjp(X2, u), A2.T @ u.reshape(N2 * O, 2)) <= 1e-8
    K12, K11 = (A1 * s) @ A2.T, (A1 * s) @ A1.T
    V, W = torch.randn(N2 * O, 4), torch.randn(N1 * O)
    assert rel_err(lin.ntk_mvm(X1, X2, V, variance), K12 @ V) <= 1e-8
    assert rel_err(lin.ntk_mvm(X1, None, W, variance), K11 @ W) <= 1e-8
    assert rel_err(lin.ntk_dense(X1, X2, variance), K12) <= 1e-8
    assert rel_err(lin.ntk_dense(X1), A1 @ A1.T) <= 1e-8
    assert rel_err(lin.ntk_diag(X1, variance), K11.diagonal()) <= 1e-8
    assert rel_err(lin.jacobian(X2), J2) <= 1e-8
    return lin


def check_dense_variance_gradient(net, X) -> Linearization:
    """The structured dense ``K`` at a scalar σ² that requires grad: ``K`` and ``∂⟨W, K⟩/∂σ²``
    against ``jacrev`` (≤ 1e-8)."""
    lin = Linearization(net, implementation="structured")
    J = jacrev_jacobian(net, X)
    J = J.reshape(-1, J.shape[-1])
    s = torch.tensor(1.3, requires_grad=True)
    K = lin.ntk_dense(X, variance=s)
    W = torch.randn_like(K)
    (K * W).sum().backward()
    assert rel_err(K.detach(), 1.3 * J @ J.T) <= 1e-8
    assert rel_err(s.grad, (W * (J @ J.T)).sum()) <= 1e-8
    return lin
