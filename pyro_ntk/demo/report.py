"""What the demo shows: the printed table and the PNG (predictive bands, reliability diagrams)."""

from __future__ import annotations

from pathlib import Path

import torch

from pyro_ntk.demo.classification import ECE_BINS
from pyro_ntk.demo.config import Z95, ClassificationResult, Data, Result


def format_table(results: list[Result] | list[ClassificationResult]) -> str:
    """The printed table: one row per method.

    Regression: RMSE, NLL, 95 % coverage, seconds. Classification: accuracy, NLL, ECE,
    seconds.

    Args:
        results: the scored methods (all of one kind).

    Returns:
        The table as a multi-line string.
    """

    def num(x: float) -> str:
        return f"{x:.3f}" if abs(x) < 1e4 else f"{x:.2e}"

    w = max([32] + [len(r.method) + 1 for r in results])  # the method column
    if results and isinstance(results[0], ClassificationResult):
        head = f"{'method':<{w}}{'accuracy':>10}{'NLL':>11}{'ECE':>11}{'seconds':>9}"
        lines = [head, "-" * len(head)]
        for r in results:
            lines.append(
                f"{r.method:<{w}}{r.accuracy:>10.3f}{num(r.nll):>11}{r.ece:>11.3f}{r.seconds:>9.2f}"
            )
        return "\n".join(lines)
    head = f"{'method':<{w}}{'RMSE':>10}{'NLL':>11}{'95% cover':>11}{'seconds':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.method:<{w}}{num(r.rmse):>10}{num(r.nll):>11}{r.coverage:>11.2f}{r.seconds:>9.2f}"
        )
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_bands(data: Data, net, methods: dict, results: list[Result], path: Path) -> Path | None:
    """Predictive means and 95 % bands of the four regression adaptations (a 2×2 PNG).

    1-D tasks: over a grid, with the target function, the source network and the target
    points. Tables: the test points sorted by their true value.

    Args:
        data: the transfer problem.
        net: the source network.
        methods: method name → ``predict(X) -> (mean, var)`` (used on the 1-D grid).
        results: the scored methods (the unadapted source network is left out).
        path: the PNG's path.

    Returns:
        ``path``, or ``None`` when matplotlib is not installed.
    """
    plt = _pyplot()
    if plt is None:
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
    return _save(fig, plt, path)


def plot_reliability(
    data: Data, results: list[ClassificationResult], path: Path, bins: int = ECE_BINS
) -> Path | None:
    """One reliability diagram per classification method (a 1×4 PNG).

    Bars: the accuracy of the test predictions in each equal-width confidence bin (shaded by
    how many fall in it); the diagonal is perfect calibration, bars below it are
    over-confident and bars above it under-confident.

    Args:
        data: the transfer problem (its test labels).
        results: the scored methods.
        path: the PNG's path.
        bins: number of confidence bins (as in the ECE).

    Returns:
        ``path``, or ``None`` when matplotlib is not installed.
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.8), sharey=True)
    y = data.y_test.cpu()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    for ax, r in zip(axes.flat, results):
        conf, pred = r.probs.detach().cpu().to(torch.float64).max(-1)
        correct = (pred == y).to(torch.float64)
        which = torch.bucketize(conf, edges[1:-1], right=True)
        counts = torch.bincount(which, minlength=bins).to(torch.float64)
        acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct)
        acc = torch.where(counts > 0, acc / counts.clamp_min(1), torch.zeros_like(acc))
        alpha = (0.25 + 0.75 * counts / counts.max()).numpy()
        for b in range(bins):
            if counts[b] > 0:
                ax.bar(float(edges[b]), float(acc[b]), width=1 / bins, align="edge",
                       color="C0", edgecolor="k", alpha=float(alpha[b]))  # fmt: skip
        ax.plot([0, 1], [0, 1], "r--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence")
        ax.set_title(f"{r.method}\nacc {r.accuracy:.3f}  NLL {r.nll:.3f}  ECE {r.ece:.3f}",
                     fontsize=9)  # fmt: skip
    axes.flat[0].set_ylabel("accuracy in the bin")
    fig.suptitle(f"pyro_ntk demo ({data.name}): reliability on {len(y)} test images")
    return _save(fig, plt, path)
