"""The source networks: one fixed MLP recipe per task kind, trained on the source alone.

Recipe (the same for every task; fixed before any target score was seen): a ``D``-64-64-``O``
tanh MLP in float64 (``O`` = 1 for regression and counts, ``C`` logits for classification),
Adam (lr 3·10⁻³, weight decay 10⁻⁴), minibatches of 128, at most 150 epochs, on 80 % of the
source rows; **early stopping on the other 20 % (the source validation split)**: the weights
with the lowest validation loss are kept (patience 15 epochs). Losses: squared error
(regression), cross-entropy (classification), Poisson NLL with a log-rate output (counts).
Target rows are never seen.

The deep ensemble's members are the same recipe from seeds ``0 … M − 1``; member 0 is
*the* source network that every method starts from. Networks are cached under
``benchmarks/_out/cache`` (keyed by task, seed and recipe).

Example:
    >>> from transfer_suite.tasks import load_task
    >>> net, info = source_network(load_task("diabetes"), 0, use_cache=False, max_epochs=2)
    >>> info["epochs"] <= 2
    True
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from transfer_suite.tasks import Task

WIDTH = 64
RECIPE = dict(lr=3e-3, weight_decay=1e-4, batch=128, max_epochs=150, patience=15)
CACHE = Path(__file__).resolve().parents[1] / "_out" / "cache"


def make_mlp(input_dim: int, output_dim: int, width: int = WIDTH) -> nn.Sequential:
    """``input_dim``-width-width-``output_dim`` tanh MLP (float64)."""
    return nn.Sequential(
        nn.Linear(input_dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, output_dim),
    ).double()  # fmt: skip


def output_dim(task: Task) -> int:
    return task.num_classes if task.spec.kind == "classification" else 1


def loss_fn(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """Mean training loss of outputs ``out`` ``(N, O)`` for targets ``y`` ``(N,)``."""
    if kind == "classification":
        return nn.functional.cross_entropy(out, y)
    if kind == "count":
        return nn.functional.poisson_nll_loss(out.squeeze(-1), y, log_input=True, full=False)
    return (out.squeeze(-1) - y).square().mean()


def train_source(task: Task, seed: int, max_epochs: int | None = None) -> tuple[nn.Module, dict]:
    """Train one source network by the recipe; returns it (eval mode) and a summary."""
    r = dict(RECIPE, **({} if max_epochs is None else {"max_epochs": max_epochs}))
    kind = task.spec.kind
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(task.ys), generator=gen)
    n_val = len(perm) // 5
    iv, it = perm[:n_val], perm[n_val:]
    Xtr, ytr, Xv, yv = task.Xs[it], task.ys[it], task.Xs[iv], task.ys[iv]
    torch.manual_seed(seed)
    net = make_mlp(task.Xs.shape[1], output_dim(task))
    opt = torch.optim.Adam(net.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    best, best_state, since, epoch = float("inf"), None, 0, 0
    for epoch in range(1, r["max_epochs"] + 1):  # noqa: B007 - the count is returned
        net.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(r["batch"]):
            opt.zero_grad()
            loss_fn(kind, net(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = float(loss_fn(kind, net(Xv), yv))
        if val < best - 1e-6:
            best, best_state, since = val, copy.deepcopy(net.state_dict()), 0
        else:
            since += 1
            if since >= r["patience"]:
                break
    net.load_state_dict(best_state)
    return net.eval(), {"epochs": epoch, "val_loss": best}


def source_network(
    task: Task, seed: int, use_cache: bool = True, max_epochs: int | None = None
) -> tuple[nn.Module, dict]:
    """Member ``seed`` of the task's source networks (trained once, then cached)."""
    key = f"{task.spec.name}-s{seed}-w{WIDTH}-" + "-".join(f"{v}" for v in RECIPE.values())
    path = CACHE / f"{key}.pt"
    if use_cache and path.exists():
        saved = torch.load(path)
        net = make_mlp(task.Xs.shape[1], output_dim(task))
        net.load_state_dict(saved["state"])
        return net.eval(), saved["info"]
    net, info = train_source(task, seed, max_epochs)
    if use_cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save({"state": net.state_dict(), "info": info}, path)
    return net, info
