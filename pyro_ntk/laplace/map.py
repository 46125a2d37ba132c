r"""The MAP of the linearized model by a gradient optimizer (the dense and Lanczos routes).

.. math:: \delta^* = \arg\max_\delta\; \log p(y \mid f_0 + J \delta)
    - \tfrac12 \lVert (\delta - m) / S_T \rVert^2, \qquad f_0 = f(X; \theta^*),

a convex problem (the model is linear in δ): L-BFGS with a strong-Wolfe line search on the
full batch, or Adam on minibatches (the likelihood rescaled by ``N / batch``). Cost per
step: one JVP (and its backward, one VJP) over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_ntk.laplace.route import LaplaceProblem

__all__ = ["fit_map", "log_joint"]


def log_joint(problem: LaplaceProblem, f0: Tensor, delta: Tensor, S: Tensor) -> Tensor:
    """``log p(y | f0 + J δ) − ½ ‖(δ − m)/S‖²`` (differentiable in δ)."""
    p = problem
    f = f0 + p.lin.jvp(p.X, delta)
    quad = ((delta - p.prior_mean) / S).square().sum()
    return p.likelihood.log_prob(f, p.y, p.noise) - 0.5 * quad


def fit_map(
    problem: LaplaceProblem,
    f0: Tensor,
    start: Tensor,
    S: Tensor,
    *,
    num_steps: int,
    optimizer: str,
    lr: float | None,
    batch_size: int | None,
    seed: int,
) -> Tensor:
    """δ* from ``start`` ``(P,)``, with prior standard deviations ``S`` ``(P,)``.

    ``optimizer``: ``"lbfgs"`` (``num_steps`` iterations, ``lr`` default 1) or ``"adam"``
    (``num_steps`` steps of minibatches of ``batch_size`` drawn with ``seed``, ``lr``
    default 0.01).
    """
    p = problem
    delta = start.clone().requires_grad_(True)
    N = p.X.shape[0]
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            [delta], lr=lr or 1.0, max_iter=num_steps, line_search_fn="strong_wolfe",
            tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20,
        )  # fmt: skip

        def closure() -> Tensor:
            opt.zero_grad()
            loss = -log_joint(p, f0, delta, S) / N
            loss.backward()
            return loss

        opt.step(closure)
    else:
        opt = torch.optim.Adam([delta], lr=lr or 0.01)
        gen = torch.Generator().manual_seed(seed)
        B = batch_size or N
        for _ in range(num_steps):
            idx = torch.randperm(N, generator=gen)[:B].to(p.X.device)
            opt.zero_grad()
            f = f0[idx] + p.lin.jvp(p.X[idx], delta)
            lik = p.likelihood.log_prob(f, p.y[idx], p.noise) * (N / B)
            loss = -(lik - 0.5 * ((delta - p.prior_mean) / S).square().sum()) / N
            loss.backward()
            opt.step()
    return delta.detach()
