"""What the demo shows: the printed table and the PNG (predictive bands, reliability diagrams)."""

from __future__ import annotations

from pathlib import Path

import torch

from pyro_ntk.demo.classification import ECE_BINS
from pyro_ntk.demo.config import ClassificationResult, Data, Result
from pyro_ntk.plot import predicted_vs_observed_grid, predictive_bands, reliability_diagram


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
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_bands(data: Data, net, methods: dict, results: list[Result], path: Path) -> Path | None:
    """Predictive means and 95 % bands of the four regression adaptations (a 2×2 PNG).

    1-D tasks: :func:`pyro_ntk.plot.predictive_bands` over a grid, with the target function,
    the source network and the target points. Tables:
    :func:`pyro_ntk.plot.predicted_vs_observed_grid` on the test points (predicted mean and
    95 % interval against the observed value).

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
    if data.truth is not None:
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, sharey=True)
        grid = torch.linspace(-5, 5, 300, device=data.X_test.device).unsqueeze(-1)
        with torch.no_grad():
            src = net(grid).squeeze(-1)
        for ax, r in zip(axes.flat, shown):
            mean, var = methods[r.method](grid)
            ax.plot(grid.squeeze(-1).cpu(), src.cpu(), color="grey", lw=1, label="source network")
            predictive_bands(
                grid, mean, var, y=data.truth(grid.cpu()), x_train=data.X_target,
                y_train=data.y_target, level=0.95, ax=ax,
            )  # fmt: skip
            ax.set_title(f"{r.method}: RMSE {r.rmse:.2f}, NLL {r.nll:.2f}", fontsize=10)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        labels = ["target task" if lab == "reference" else lab for lab in labels]
        axes[0, 0].legend(handles, labels, loc="upper left", fontsize=9)
        for ax in axes[0]:
            ax.set_xlabel("")
        for ax in axes[:, 1]:
            ax.set_ylabel("")
    else:
        fig = predicted_vs_observed_grid(
            data.y_test, {r.method: (r.mean, r.var) for r in shown}, level=0.95,
            figsize=(9, 8.5), xlabel="observed outcome (standardized)", ylabel="predicted mean",
        )  # fmt: skip
    fig.suptitle(f"pyro_ntk demo ({data.name}): predictive bands on the target task")
    return _save(fig, plt, path)


def plot_reliability(
    data: Data, results: list[ClassificationResult], path: Path, bins: int = ECE_BINS
) -> Path | None:
    """One reliability diagram per classification method (a grid of two columns).

    :func:`pyro_ntk.plot.reliability_diagram`: blue bars give the accuracy of the test
    predictions in each equal-width confidence bin, red ticks their mean confidence, narrow
    grey bars (right axis) how many predictions fall in each bin (legend on the first
    panel); the diagonal is perfect calibration, bars below it are over-confident and bars
    above it under-confident.

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
    cols = min(2, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 4.4 * rows), squeeze=False)
    y = data.y_test.cpu()
    for i, (ax, r) in enumerate(zip(axes.flat, results)):
        title = f"{r.method}\nacc {r.accuracy:.3f}, NLL {r.nll:.3f}"
        reliability_diagram(r.probs, y, bins=bins, ax=ax, title=title, legend=i == 0)
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    fig.suptitle(f"pyro_ntk demo ({data.name}): reliability on {len(y)} test images")
    return _save(fig, plt, path)
