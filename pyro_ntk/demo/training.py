"""Training the demo's networks: Adam loops with bars, and the cached source network."""

from __future__ import annotations

import copy
import hashlib
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from pyro_ntk.demo.config import Data, DemoConfig
from pyro_ntk.demo.tasks import make_network

DIGITS_BATCH = 64  # minibatch of the digits source network's Adam steps


def _progress(iterable, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _architecture(net: nn.Module) -> str:
    return "-".join(
        f"{type(m).__name__}{tuple(p.shape for p in m.parameters(recurse=False))}"
        for m in net.modules()
        if not list(m.children())
    )


def train_mse(
    net: nn.Module,
    params,
    X: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    desc: str,
    progress: bool,
    validation: tuple[Tensor, Tensor] | None = None,
) -> float:
    """Adam on the mean squared error; returns the final training MSE.

    With ``validation`` data, the weights with the lowest validation error (checked every
    10 steps) are kept: early stopping, for small tables that a network overfits quickly.
    """
    opt = torch.optim.Adam(params, lr=lr)
    net.train()
    bar = _progress(range(steps), desc, progress)
    best, best_state = float("inf"), None
    for step in bar:
        opt.zero_grad()
        loss = (net(X).squeeze(-1) - y).square().mean()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{loss.item():.2e}")
        if validation is not None and step % 10 == 0:
            with torch.no_grad():
                err = float((net(validation[0]).squeeze(-1) - validation[1]).square().mean())
            if err < best:
                best, best_state = err, copy.deepcopy(net.state_dict())
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        return float((net(X).squeeze(-1) - y).square().mean())


def train_cross_entropy(
    net: nn.Module,
    params,
    X: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    desc: str,
    progress: bool,
    *,
    batch_size: int | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """Adam on the mean cross-entropy of the logits ``net(X)``; returns the training accuracy.

    Args:
        net: the classifier (trained in place).
        params: the parameters Adam updates.
        X: inputs ``(N, ...)``.
        y: integer labels ``(N,)``.
        steps: Adam steps.
        lr: step size.
        desc: the progress bar's label.
        progress: show the bar.
        batch_size: minibatch size, drawn with replacement (``None``: full batch).
        weight_decay: Adam's L2 weight decay.
        seed: seed of the minibatch draws.

    Returns:
        The accuracy on ``(X, y)`` after training (the network is left in eval mode).
    """
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    bar = _progress(range(steps), desc, progress)
    for step in bar:
        if batch_size is None:
            Xb, yb = X, y
        else:
            idx = torch.randint(0, X.shape[0], (batch_size,), generator=gen).to(X.device)
            Xb, yb = X[idx], y[idx]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(Xb), yb)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        return float((net(X).argmax(-1) == y).to(torch.float64).mean())


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyro_ntk``, or ``~/.cache/pyro_ntk``.

    Returns:
        The directory (not created).
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro_ntk"


def _train_source(net: nn.Module, cfg: DemoConfig, data: Data) -> str:
    """Train the source network in place; returns what the training reached."""
    X, y = data.X_source, data.y_source
    if data.num_classes is not None:
        accuracy = train_cross_entropy(
            net, net.parameters(), X, y, cfg.resolved_source_steps(), 3e-3,
            "training the source network", cfg.progress, batch_size=DIGITS_BATCH, seed=cfg.seed,
        )  # fmt: skip
        return f"training accuracy {accuracy:.3f}"
    validation = None
    if data.truth is None:  # a small table: hold out a fifth of the source rows, stop early
        perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
        n_val = X.shape[0] // 5
        iv, it = perm[:n_val].to(X.device), perm[n_val:].to(X.device)
        X, y, validation = X[it], y[it], (X[iv], y[iv])
    mse = train_mse(
        net,
        net.parameters(),
        X,
        y,
        cfg.resolved_source_steps(),
        1e-2,
        "training the source network",
        cfg.progress,
        validation,
    )
    return f"training MSE {mse:.2e}"


def source_network(cfg: DemoConfig, data: Data, device: torch.device) -> tuple[nn.Module, str]:
    """Train the source network, or load it from the cache.

    The cache key covers the task, the seed, the architecture, the source data themselves,
    the number of steps, the training recipe and the dtype, so a change to any of them
    trains afresh.

    Args:
        cfg: the demo configuration.
        data: the transfer problem.
        device: where the network lives.

    Returns:
        The trained network (eval mode) and a line saying where it came from.
    """
    torch.manual_seed(cfg.seed)
    net = make_network(data.name, data.X_source.shape[-1], data.num_classes).to(device)
    if data.num_classes is not None:
        recipe = f"cross-entropy-batch{DIGITS_BATCH}"
    else:
        recipe = "early-stopping" if data.truth is None else ""
    key = "|".join(
        [
            data.name,
            f"seed={cfg.seed}",
            _architecture(net),
            hashlib.sha256(data.X_source.cpu().numpy().tobytes()).hexdigest(),
            hashlib.sha256(data.y_source.cpu().numpy().tobytes()).hexdigest(),
            f"steps={cfg.resolved_source_steps()}",
            recipe,
            str(torch.get_default_dtype()),
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = None
    if cfg.cache_dir != "":
        root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        cache = root / f"source-{data.name}-seed{cfg.seed}-{digest}.pt"
        if cache.exists():
            try:
                state = torch.load(cache, map_location=device, weights_only=True)
                net.load_state_dict(state)
                net.eval()
                return net, f"source network loaded from {cache}"
            except (RuntimeError, OSError, KeyError, ValueError):
                pass  # a stale or corrupt cache entry: train afresh and overwrite it
    t0 = time.perf_counter()
    reached = _train_source(net, cfg, data)
    how = f"source network trained in {time.perf_counter() - t0:.1f} s ({reached})"
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save(net.state_dict(), tmp)
            tmp.replace(cache)
            how += f", cached in {cache}"
        except OSError as err:
            how += f" (not cached: {err})"
    return net, how
