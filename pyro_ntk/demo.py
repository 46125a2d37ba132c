r"""The demo behind ``make demo``: adapt a trained network to a new task, four ways.

A source network is trained on plenty of data from a source task (and cached in a user cache
directory). A *target* task is then observed at a few points, and five predictors are scored
on the target's held-out test points:

* **source network** — the trained network as it is, no adaptation (reference);
* **NTK-GP (pyro_ntk)** — :class:`~pyro_ntk.NTKGPRegression`: the GP whose mean is the
  network and whose kernel is its empirical NTK; the noise s² and the kernel variance σ²
  (or one per layer) are fitted by SVI on the marginal likelihood. The network is not trained;
* **fine-tuning** — a copy of the network trained on the target points by Adam;
* **last layer retrained** — a copy whose last ``nn.Linear`` alone is trained on the target
  points by Adam (the other layers frozen);
* **RBF GP (pyro.contrib.gp)** — ``GPRegression`` with an ``RBF`` kernel, fitted by
  SVI the same way, ignoring the network.

The two network baselines have no uncertainty of their own; they predict
:math:`\mathcal{N}(f(x), \hat s^2)` with :math:`\hat s^2` the maximum-likelihood noise on the
target points (their mean squared training residual, floored at 1e-6), the usual
plug-in. Scores: RMSE, mean Gaussian negative log-likelihood (NLL) of the noisy test targets,
coverage of the 95 % predictive interval, and wall-clock seconds spent adapting (fit +
predict; every method is first run for two steps, so one-time start-up costs are excluded).
A PNG of the predictive bands is written to ``--out-dir``.

Tasks: ``sine`` (the few-shot family of :mod:`pyro_ntk.datasets`: y = A sin(x + φ), source and
target tasks drawn from it) and ``diabetes`` (scikit-learn's bundled diabetes table,
442 patients: the network is trained on patients aged below the median and adapted to older
patients from a few of them).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

TASKS = ("sine", "diabetes")
Z95 = 1.959963984540054


# ----------------------------------------------------------------------------- configuration
@dataclass
class DemoConfig:
    """Sizes and steps of the demo (defaults: under 2 minutes on a 2-core CPU).

    Args:
        task: ``"sine"`` or ``"diabetes"``.
        num_target: labelled target points used for adaptation.
        seed: seed of the tasks, the data split and every initialization.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ...
        out_dir: where the PNG is written.
        cache_dir: where trained source networks are cached; ``None`` uses
            ``$XDG_CACHE_HOME/pyro_ntk`` (or ``~/.cache/pyro_ntk``); ``""`` disables the cache.
        num_source: source training points (sine; the table uses all its source rows).
        num_test: target test points (sine; the table uses all remaining target rows).
        source_steps: Adam steps training the source network.
        finetune_steps: Adam steps of fine-tuning and of last-layer retraining.
        svi_steps: SVI steps fitting each GP's hyperparameters.
        layer_variances: one NTK variance per layer instead of one in all.
        progress: show tqdm progress bars.
        plot: write the PNG (needs matplotlib).
    """

    task: str = "sine"
    num_target: int = 10
    seed: int = 0
    device: str = "auto"
    out_dir: str = "outputs"
    cache_dir: str | None = None
    num_source: int = 400
    num_test: int = 500
    source_steps: int = 3000
    finetune_steps: int = 500
    svi_steps: int = 300
    layer_variances: bool = False
    progress: bool = True
    plot: bool = True


@dataclass
class Data:
    """One transfer problem: source training data, target adaptation and test data."""

    name: str
    X_source: Tensor
    y_source: Tensor
    X_target: Tensor
    y_target: Tensor
    X_test: Tensor
    y_test: Tensor
    description: str
    truth: Callable[[Tensor], Tensor] | None = None  # noise-free target function (1-D tasks)


@dataclass
class Result:
    """Scores of one method on the target task's test points."""

    method: str
    rmse: float
    nll: float
    coverage: float
    seconds: float
    mean: Tensor
    var: Tensor
    info: str = ""


# ----------------------------------------------------------------------------- tasks
def _sine_data(cfg: DemoConfig) -> Data:
    from pyro_ntk.datasets import sample_sine_tasks

    source, target = sample_sine_tasks(2, seed=cfg.seed)
    Xs, ys = source.sample(cfg.num_source, seed=cfg.seed + 1)
    Xa, ya = target.sample(cfg.num_target, seed=cfg.seed + 2)
    Xt, yt = target.sample(cfg.num_test, seed=cfg.seed + 3)
    desc = (
        f"sine: source y = {source.amplitude:.2f} sin(x + {source.phase:.2f}) "
        f"({cfg.num_source} points), target y = {target.amplitude:.2f} sin(x + "
        f"{target.phase:.2f}) from {cfg.num_target} points, {cfg.num_test} test points"
    )
    return Data("sine", Xs, ys, Xa, ya, Xt, yt, desc, truth=target)


def _diabetes_data(cfg: DemoConfig) -> Data:
    try:
        from sklearn.datasets import load_diabetes
    except ImportError as err:  # pragma: no cover - scikit-learn ships with the extras
        raise RuntimeError(
            "demo --task diabetes needs scikit-learn (pip install scikit-learn)."
        ) from err
    X, y = load_diabetes(return_X_y=True)  # shipped inside scikit-learn: no download
    X = torch.as_tensor(X, dtype=torch.get_default_dtype())
    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    age = X[:, 0]
    old = age > age.median()
    Xs, ys = X[~old], y[~old]
    Xo, yo = X[old], y[old]
    # standardize with the source statistics only (the target is a shifted domain)
    mu, sd = Xs.mean(0), Xs.std(0)
    ymu, ysd = ys.mean(), ys.std()
    Xs, Xo = (Xs - mu) / sd, (Xo - mu) / sd
    ys, yo = (ys - ymu) / ysd, (yo - ymu) / ysd
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(Xo.shape[0], generator=gen)
    if not 0 < cfg.num_target < Xo.shape[0]:
        raise ValueError(
            f"demo: --num-target must be between 1 and {Xo.shape[0] - 1} for the diabetes "
            f"task, got {cfg.num_target}."
        )
    ia, it = perm[: cfg.num_target], perm[cfg.num_target :]
    desc = (
        f"diabetes (scikit-learn, 10 features, standardized): source = {Xs.shape[0]} patients "
        f"aged below the median, target = older patients: {cfg.num_target} for adaptation, "
        f"{it.numel()} for testing"
    )
    return Data("diabetes", Xs, ys, Xo[ia], yo[ia], Xo[it], yo[it], desc)


def make_network(task: str, input_dim: int) -> nn.Module:
    """The source architecture of each task (a small tanh MLP).

    Args:
        task: the task name.
        input_dim: number of input features.

    Returns:
        A freshly initialized ``nn.Sequential``.
    """
    width = 40 if task == "sine" else 50
    return nn.Sequential(
        nn.Linear(input_dim, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 1),
    )


def _architecture(net: nn.Module) -> str:
    return "-".join(
        f"{type(m).__name__}{tuple(p.shape for p in m.parameters(recurse=False))}"
        for m in net.modules()
        if not list(m.children())
    )


# ----------------------------------------------------------------------------- training
def _progress(iterable, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


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


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyro_ntk``, or ``~/.cache/pyro_ntk``.

    Returns:
        The directory (not created).
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro_ntk"


def source_network(cfg: DemoConfig, data: Data, device: torch.device) -> tuple[nn.Module, str]:
    """Train the source network, or load it from the cache.

    The cache key covers the task, the seed, the architecture, the source data themselves,
    the number of steps and the dtype, so a change to any of them trains afresh.

    Args:
        cfg: the demo configuration.
        data: the transfer problem.
        device: where the network lives.

    Returns:
        The trained network (eval mode) and a line saying where it came from.
    """
    torch.manual_seed(cfg.seed)
    net = make_network(data.name, data.X_source.shape[1]).to(device)
    key = "|".join(
        [
            data.name,
            f"seed={cfg.seed}",
            _architecture(net),
            hashlib.sha256(data.X_source.cpu().numpy().tobytes()).hexdigest(),
            hashlib.sha256(data.y_source.cpu().numpy().tobytes()).hexdigest(),
            f"steps={cfg.source_steps}",
            "early-stopping" if data.truth is None else "",
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
    X, y, validation = data.X_source, data.y_source, None
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
        cfg.source_steps,
        1e-2,
        "training the source network",
        cfg.progress,
        validation,
    )
    how = f"source network trained in {time.perf_counter() - t0:.1f} s (training MSE {mse:.2e})"
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


# ----------------------------------------------------------------------------- scoring
def gaussian_scores(mean: Tensor, var: Tensor, y: Tensor) -> tuple[float, float, float]:
    r"""RMSE, mean negative log-likelihood and 95 % coverage of :math:`\mathcal{N}(\mu, v)`.

    .. math::

        \mathrm{NLL} = \frac1n \sum_i \tfrac12 \log(2\pi v_i) + \frac{(y_i - \mu_i)^2}{2 v_i}

    Args:
        mean: predictive means ``(n,)``.
        var: predictive variances ``(n,)`` (of a noisy observation).
        y: targets ``(n,)``.

    Returns:
        ``(rmse, nll, coverage)`` as floats.

    Example:
        >>> rmse, nll, cov = gaussian_scores(torch.zeros(4), torch.ones(4), torch.zeros(4))
        >>> round(rmse, 3), round(nll, 3), cov
        (0.0, 0.919, 1.0)
    """
    mean, var, y = mean.detach(), var.detach(), y.detach()
    rmse = float((mean - y).square().mean().sqrt())
    nll = float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean).square() / var).mean())
    half = Z95 * var.sqrt()
    coverage = float(((y - mean).abs() <= half).to(torch.float64).mean())
    return rmse, nll, coverage


def _plug_in(net: nn.Module, data: Data, train_mse: float) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        mean = net(data.X_test).squeeze(-1)
    return mean, torch.full_like(mean, max(train_mse, 1e-6))


def _fit_gp(model, steps: int, lr: float, desc: str, progress: bool) -> list[float]:
    """Fit a ``pyro.contrib.gp`` model's parameters by SVI (as ``gp.util.train``), with a bar."""
    from pyro.infer import TraceMeanField_ELBO

    loss_fn = TraceMeanField_ELBO().differentiable_loss
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    bar = _progress(range(steps), desc, progress)
    for step in bar:
        opt.zero_grad()
        loss = loss_fn(model.model, model.guide)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


# ----------------------------------------------------------------------------- methods
def _source_only(net: nn.Module, data: Data, cfg: DemoConfig) -> Result:
    t0 = time.perf_counter()
    with torch.no_grad():
        mse = float((net(data.X_target).squeeze(-1) - data.y_target).square().mean())
    mean, var = _plug_in(net, data, mse)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("source network (no adaptation)", *scores, time.perf_counter() - t0, mean, var)


def _ntk_gp(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, object]:
    from pyro_ntk import NTKGPRegression

    t0 = time.perf_counter()
    gpr = NTKGPRegression(
        data.X_target,
        data.y_target,
        net,
        noise=torch.tensor(0.1, device=data.X_target.device),
        layer_variances=cfg.layer_variances,
    )
    losses = _fit_gp(gpr, cfg.svi_steps, 0.05, "NTK-GP: SVI on noise and variance", cfg.progress)
    with torch.no_grad():
        mean, var = gpr(data.X_test, noiseless=False)
    seconds = time.perf_counter() - t0
    variance = gpr.variance.detach().reshape(-1)
    shown = ", ".join(f"{v:.3g}" for v in variance.tolist())
    info = (
        f"NTK-GP fitted noise s2 = {float(gpr.noise.detach()):.3g}, variance(s) = {shown}; "
        f"SVI loss {losses[0]:.2f} -> {losses[-1]:.2f}"
        if losses
        else ""
    )
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("NTK-GP (pyro_ntk)", *scores, seconds, mean, var, info), gpr


def _fine_tune(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, nn.Module]:
    t0 = time.perf_counter()
    tuned = copy.deepcopy(net)
    mse = train_mse(
        tuned,
        tuned.parameters(),
        data.X_target,
        data.y_target,
        cfg.finetune_steps,
        1e-2,
        "fine-tuning a copy",
        cfg.progress,
    )
    mean, var = _plug_in(tuned, data, mse)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("fine-tuning", *scores, time.perf_counter() - t0, mean, var), tuned


def _last_layer(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, nn.Module]:
    t0 = time.perf_counter()
    tuned = copy.deepcopy(net)
    last = [m for m in tuned.modules() if isinstance(m, nn.Linear)][-1]
    for p in tuned.parameters():
        p.requires_grad_(False)
    for p in last.parameters():
        p.requires_grad_(True)
    mse = train_mse(
        tuned,
        last.parameters(),
        data.X_target,
        data.y_target,
        cfg.finetune_steps,
        1e-2,
        "retraining the last layer",
        cfg.progress,
    )
    mean, var = _plug_in(tuned, data, mse)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("last layer retrained", *scores, time.perf_counter() - t0, mean, var), tuned


def _rbf_gp(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, object]:
    import pyro.contrib.gp as gp

    t0 = time.perf_counter()
    D = data.X_target.shape[1]
    device = data.X_target.device
    kernel = gp.kernels.RBF(
        input_dim=D,
        variance=torch.tensor(1.0, device=device),
        lengthscale=torch.ones(D, device=device),
    )
    gpr = gp.models.GPRegression(
        data.X_target, data.y_target, kernel, noise=torch.tensor(0.1, device=device)
    )
    _fit_gp(gpr, cfg.svi_steps, 0.05, "RBF GP: SVI on its hyperparameters", cfg.progress)
    with torch.no_grad():
        mean, var = gpr(data.X_test, full_cov=False, noiseless=False)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("RBF GP (pyro.contrib.gp)", *scores, time.perf_counter() - t0, mean, var), gpr


# ----------------------------------------------------------------------------- output
def format_table(results: list[Result]) -> str:
    """The printed table: one row per method.

    Args:
        results: the scored methods.

    Returns:
        The table as a multi-line string.
    """

    def num(x: float) -> str:
        return f"{x:.3f}" if abs(x) < 1e4 else f"{x:.2e}"

    head = f"{'method':<32}{'RMSE':>10}{'NLL':>11}{'95% cover':>11}{'seconds':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.method:<32}{num(r.rmse):>10}{num(r.nll):>11}{r.coverage:>11.2f}{r.seconds:>9.2f}"
        )
    return "\n".join(lines)


def _plot(data: Data, net, methods: dict, results: list[Result], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [r for r in results if r.method != "source network (no adaptation)"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, sharey=True)
    if data.truth is not None:
        grid = torch.linspace(-5, 5, 300, device=data.X_test.device).unsqueeze(-1)
        for ax, r in zip(axes.flat, shown):
            mean, var = methods[r.method](grid)
            x = grid.squeeze(-1).cpu().numpy()
            band = Z95 * var.sqrt()
            truth = data.truth(grid.cpu()).numpy()
            ax.plot(x, truth, "k--", lw=1, label="target task")
            with torch.no_grad():
                src = net(grid).squeeze(-1).cpu().numpy()
            ax.plot(x, src, color="grey", lw=1, label="source network")
            ax.plot(x, mean.cpu().numpy(), "C0", label="predictive mean")
            ax.fill_between(
                x,
                (mean - band).cpu().numpy(),
                (mean + band).cpu().numpy(),
                color="C0",
                alpha=0.25,
                label="95% band",
            )
            ax.scatter(
                data.X_target.squeeze(-1).cpu().numpy(),
                data.y_target.cpu().numpy(),
                color="k",
                s=18,
                zorder=3,
                label=f"{data.X_target.shape[0]} target points",
            )
            ax.set_title(f"{r.method}: RMSE {r.rmse:.2f}, NLL {r.nll:.2f}", fontsize=10)
        axes[0, 0].legend(loc="upper left", fontsize=7)
        for ax in axes[1]:
            ax.set_xlabel("x")
    else:
        # tables: test points sorted by their true value; predictive mean and 95 % interval
        order = torch.argsort(data.y_test)
        idx = torch.arange(order.numel()).cpu().numpy()
        for ax, r in zip(axes.flat, shown):
            mean, var = r.mean[order], r.var[order]
            band = Z95 * var.sqrt()
            ax.fill_between(
                idx,
                (mean - band).cpu().numpy(),
                (mean + band).cpu().numpy(),
                color="C0",
                alpha=0.25,
                label="95% interval",
            )
            ax.plot(idx, mean.cpu().numpy(), "C0.", ms=3, label="predictive mean")
            ax.plot(idx, data.y_test[order].cpu().numpy(), "k-", lw=1, label="true value")
            ax.set_title(f"{r.method}: RMSE {r.rmse:.2f}, cover {r.coverage:.2f}", fontsize=10)
        axes[0, 0].legend(loc="upper left", fontsize=7)
        for ax in axes[1]:
            ax.set_xlabel("target test patients, sorted by outcome (standardized)")
    fig.suptitle(f"pyro_ntk demo ({data.name}): predictive bands on the target task")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- entry point
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"demo: --device {name!r} is not a torch device ({err}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"demo: --device {name!r} requested, but CUDA is not available here.")
    return device


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo: train (or load) the source network, adapt it four ways, print, plot.

    Runs in float64 on one thread, with Pyro's module-local parameters (two GP models are
    fitted in one process, and Pyro's global param store would otherwise tie their
    parameters of the same name, such as ``noise``, together); all three settings are
    restored afterwards. The source network is never modified while adapting.

    Args:
        cfg: the configuration (see :class:`DemoConfig`).

    Returns:
        ``{"results": [Result, ...], "table": str, "figure": Path | None, "data": Data}``.

    Raises:
        ValueError: an unknown task, a bad device or a bad number of target points.
    """
    import pyro

    if cfg.task not in TASKS:
        raise ValueError(f"demo: --task must be one of {list(TASKS)}, got {cfg.task!r}.")
    if cfg.num_target < 1:
        raise ValueError(f"demo: --num-target must be >= 1, got {cfg.num_target}.")
    device = _device(cfg.device)
    previous, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    # The networks are tiny: one thread avoids thread start-up and spin-wait costs that, on
    # a busy machine, made each training step 10-100x slower than its arithmetic.
    torch.set_num_threads(1)
    try:
        with pyro.settings.context(module_local_params=True):
            return _run(cfg, device)
    finally:
        torch.set_default_dtype(previous)
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, device: torch.device) -> dict:
    import pyro

    pyro.set_rng_seed(cfg.seed)
    data = _sine_data(cfg) if cfg.task == "sine" else _diabetes_data(cfg)
    data = _to(data, device)
    print(f"task   : {data.description}")
    net, how = source_network(cfg, data, device)
    print(f"network: {how}")
    # Warm-up: a 2-step run of every method, so that the seconds in the table measure the
    # adaptation, not one-time costs (first calls into autograd, torch.func, linear_operator).
    warm = dataclasses.replace(cfg, svi_steps=2, finetune_steps=2, progress=False)
    for method in (_ntk_gp, _fine_tune, _last_layer, _rbf_gp):
        method(net, data, warm)
    results = [_source_only(net, data, cfg)]
    ntk, gpr = _ntk_gp(net, data, cfg)
    ft, tuned = _fine_tune(net, data, cfg)
    ll, last = _last_layer(net, data, cfg)
    rbf, rbf_gp = _rbf_gp(net, data, cfg)
    results += [ntk, ft, ll, rbf]
    table = format_table(results)
    print(ntk.info)
    print()
    print(table)
    print()
    print(
        "NLL: mean negative log-likelihood of a noisy test target. The network baselines "
        "predict N(f(x), s2),\nwith s2 their mean squared training error on the target points."
    )
    figure = None
    if cfg.plot:

        def network_band(model, var):
            def predict(Xg):
                with torch.no_grad():
                    m = model(Xg).squeeze(-1)
                return m, torch.full_like(m, var)

            return predict

        def gp_band(model):
            def predict(Xg):
                with torch.no_grad():
                    return model(Xg, noiseless=False)

            return predict

        methods = {
            ntk.method: gp_band(gpr),
            ft.method: network_band(tuned, float(ft.var[0])),
            ll.method: network_band(last, float(ll.var[0])),
            rbf.method: gp_band(rbf_gp),
        }
        figure = _plot(data, net, methods, results, Path(cfg.out_dir) / f"demo_{cfg.task}.png")
        print(
            "figure : skipped (matplotlib is not installed)"
            if figure is None
            else f"figure : {figure}"
        )
    return {"results": results, "table": table, "figure": figure, "data": data}


def _to(data: Data, device: torch.device) -> Data:
    for name in ("X_source", "y_source", "X_target", "y_target", "X_test", "y_test"):
        setattr(data, name, getattr(data, name).to(device=device, dtype=torch.float64))
    return data
