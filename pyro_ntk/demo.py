"""The end-to-end demo behind ``make demo`` (a short version until the transfer demo lands)."""

from __future__ import annotations

import time

import torch


def run(seed: int = 0) -> int:
    """Train a small MLP on a sine, linearize it and print a few NTK figures."""
    from pyro_ntk import Linearization

    torch.manual_seed(seed)
    X = torch.linspace(-3, 3, 200).unsqueeze(-1)
    y = torch.sin(2 * X)
    net = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        loss = (net(X) - y).square().mean()
        loss.backward()
        opt.step()
    lin = Linearization(net)
    t0 = time.perf_counter()
    K = lin.ntk_dense(X)
    t_dense = time.perf_counter() - t0
    eig = torch.linalg.eigvalsh(K)
    V = torch.randn(X.shape[0], 8)
    t0 = time.perf_counter()
    KV = lin.ntk_mvm(X, X, V)
    t_mvm = time.perf_counter() - t0
    print(f"network            : {lin}")
    print(f"training MSE       : {loss.item():.2e}")
    print(f"K shape            : {tuple(K.shape)}, trace {K.trace().item():.3g}")
    print(f"largest eigenvalues: {', '.join(f'{e:.3g}' for e in eig.flip(0)[:5].tolist())}")
    print(f"effective rank     : {(eig.sum() ** 2 / eig.square().sum()).item():.2f}")
    print(f"matrix-free K·V err: {((KV - K @ V).norm() / (K @ V).norm()).item():.2e}")
    print(f"seconds            : dense K {t_dense:.3f}, K·V (8 columns) {t_mvm:.3f}")
    return 0
