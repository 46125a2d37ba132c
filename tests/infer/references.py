"""Problems and independent dense float64 references for the tests of :mod:`pyro_ntk.infer`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyro_ntk import Linearization


def sine_net(hidden: int = 16, inputs: int = 1, seed: int = 0) -> nn.Module:
    """A small tanh MLP trained briefly on ``sin`` of its inputs' sum (float64)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
    X = torch.linspace(-3, 3, 64).unsqueeze(-1).expand(-1, inputs)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        (net(X).squeeze(-1) - torch.sin(X.sum(-1))).square().mean().backward()
        opt.step()
    return net


def target_task(n: int, noise: float = 0.1, seed: int = 1) -> tuple[Tensor, Tensor]:
    """``n`` points of a shifted, scaled sine: ``y = 1.5 sin(x + 0.5) + noise·ε``."""
    g = torch.Generator().manual_seed(seed)
    X = (6 * torch.rand(n, 1, generator=g) - 3).double()
    y = 1.5 * torch.sin(X + 0.5).squeeze(-1) + noise * torch.randn(n, generator=g).double()
    return X, y


def layer_kernels(net: nn.Module, X: Tensor) -> list[Tensor]:
    """``J_g J_gᵀ`` per layer (parameter group), from one dense Jacobian."""
    lin = Linearization(net)
    J = lin.jacobian(X).reshape(X.shape[0], -1).detach()
    index = lin.space.group_index()
    return [J[:, index == g] @ J[:, index == g].T for g in range(len(lin.groups))]


def negative_log_marginal(r: Tensor, kernels: list[Tensor], variances: Tensor, noise: Tensor):
    """``−log N(r; 0, Σ_g v_g K_g + s² I)`` by a dense Cholesky."""
    n = r.shape[0]
    A = sum(v * K for v, K in zip(variances, kernels, strict=True)) + noise * torch.eye(n)
    L = torch.linalg.cholesky(A)
    quad = r @ torch.cholesky_solve(r[:, None], L).squeeze(-1)
    return 0.5 * quad + L.diagonal().log().sum() + 0.5 * n * math.log(2 * math.pi)


def maximise_marginal(
    r: Tensor, kernels: list[Tensor], jitter: float = 0.0, start: float = 0.0
) -> tuple[float, float, Tensor]:
    """The exact optimum over ``(s², v_g)`` by L-BFGS on log-parameters: (loss, s², v)."""
    log_params = torch.full((1 + len(kernels),), start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_params], max_iter=1000, tolerance_grad=1e-12, tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        p = log_params.exp()
        loss = negative_log_marginal(r, kernels, p[1:], p[0] + jitter)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    p = log_params.detach().exp()
    return float(closure().detach()), float(p[0]), p[1:]
