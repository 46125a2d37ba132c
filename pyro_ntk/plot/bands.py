r"""Predictive bands: a Gaussian predictive ``N(mean, var)`` against inputs or observations.

One predictive over a 1-D input (:func:`predictive_bands`), one against the observations of
a table (:func:`predicted_vs_observed`), or several methods' side by side on shared axes
(:func:`predicted_vs_observed_grid`). For a level :math:`\ell` the central interval is
:math:`\mu \pm z\,\sigma` with :math:`z = \Phi^{-1}\big(\tfrac{1+\ell}{2}\big)` (1.96 at
95 %). Cost: O(n log n) (a sort).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from pyro_ntk.plot._common import (
    FONT,
    array,
    axes,
    percent,
    pyplot,
    quantile,
    same_length,
    variance,
)


def predictive_bands(
    x,
    mean,
    var,
    *,
    y=None,
    x_train=None,
    y_train=None,
    level: float = 0.95,
    ax=None,
    label: str = "predictive mean",
    band_label: str | None = None,
    reference_label: str = "reference",
    xlabel: str = "x",
    ylabel: str = "y",
    color: str = "C0",
):
    r"""The predictive mean and its central ``level`` band over a 1-D input.

    Draws, sorted by ``x``: the line ``mean`` and the band ``mean ± z·sqrt(var)``
    (:math:`z = \Phi^{-1}((1+\text{level})/2)`); optionally the curve ``y`` (e.g. the true
    function, dashed) and the training points ``(x_train, y_train)`` (black dots).

    Args:
        x: inputs ``(n,)`` (or ``(n, 1)``).
        mean: predictive means ``(n,)``.
        var: predictive variances ``(n,)``, >= 0 (include the noise for a band of
            observations).
        y: optional reference values at ``x`` ``(n,)``, drawn as a dashed line.
        x_train: optional training inputs ``(m,)``, drawn with ``y_train``.
        y_train: optional training targets ``(m,)``.
        level: the band's probability, in (0, 1).
        ax: the matplotlib Axes to draw on; ``None`` makes a new figure.
        label: the legend entry of the mean line.
        band_label: the legend entry of the band (default ``"<level> band"``); name the
            method when several predictives share one Axes.
        reference_label: the legend entry of ``y``.
        xlabel: the x-axis label.
        ylabel: the y-axis label.
        color: the colour of the line and the band.

    Returns:
        The matplotlib Axes drawn on.

    Raises:
        ValueError: shapes that differ, non-finite entries, a negative variance, or a level
            outside (0, 1); the message names the argument.

    Example:
        >>> x = torch.linspace(-3, 3, 50)
        >>> ax = predictive_bands(x, torch.sin(x), 0.1 * torch.ones(50), y=torch.sin(x))
        >>> ax.get_xlabel(), ax.get_ylabel()
        ('x', 'y')

        Two predictives on one Axes, each with its own colour and legend entries:

        >>> ax = predictive_bands(x, torch.sin(x), torch.full((50,), 0.01), label="GP mean",
        ...                       band_label="GP 95% band")
        >>> ax = predictive_bands(x, torch.cos(x), torch.full((50,), 0.04), ax=ax, color="C3",
        ...                       label="net", band_label="net 95% band")
        >>> ax.get_legend_handles_labels()[1]
        ['GP 95% band', 'GP mean', 'net 95% band', 'net']
        >>> import matplotlib.pyplot as plt; plt.close("all")
    """
    where = "predictive_bands"
    xs, mu, v = array(where, "x", x), array(where, "mean", mean), variance(where, var)
    same_length(where, x=xs, mean=mu, var=v)
    z = quantile(where, level)
    ref = None if y is None else array(where, "y", y)
    if ref is not None:
        same_length(where, x=xs, y=ref)
    order = np.argsort(xs, kind="stable")
    xs, mu, half = xs[order], mu[order], z * np.sqrt(v[order])
    ax = axes(ax)
    if ref is not None:
        ax.plot(xs, ref[order], "k--", lw=1, label=reference_label)
    band = f"{percent(level)} band" if band_label is None else band_label
    ax.fill_between(xs, mu - half, mu + half, color=color, alpha=0.25, lw=0, label=band)
    ax.plot(xs, mu, color=color, lw=1.5, label=label)
    if x_train is not None or y_train is not None:
        if x_train is None or y_train is None:
            raise ValueError(f"{where}: give both x_train and y_train, or neither")
        xt, yt = array(where, "x_train", x_train), array(where, "y_train", y_train)
        same_length(where, x_train=xt, y_train=yt)
        ax.scatter(xt, yt, color="k", s=18, zorder=3, label=f"{len(xt)} training points")
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    return ax


def predicted_vs_observed(
    y,
    mean,
    var,
    *,
    level: float = 0.95,
    ax=None,
    xlabel: str = "observed",
    ylabel: str = "predicted mean",
    color: str = "C0",
):
    r"""Predicted means against observed values, with ``level`` intervals: for tables.

    Draws one point ``(y_i, mean_i)`` per case with a vertical error bar
    ``mean_i ± z·sqrt(var_i)``, the line ``predicted = observed`` (across the whole Axes,
    so that it stays whole on shared axes), and the title
    ``"<level> intervals cover <c> of <n>"``, where the coverage ``c`` is the fraction of
    cases with ``|y_i - mean_i| <= z·sqrt(var_i)``. A calibrated predictive has ``c`` close
    to ``level``; a good mean keeps the points near the line.

    Args:
        y: observed values ``(n,)``.
        mean: predictive means ``(n,)``.
        var: predictive variances of an observation ``(n,)``, >= 0.
        level: the intervals' probability, in (0, 1).
        ax: the matplotlib Axes to draw on; ``None`` makes a new figure.
        xlabel: the x-axis label.
        ylabel: the y-axis label.
        color: the colour of the points and bars.

    Returns:
        The matplotlib Axes drawn on.

    Raises:
        ValueError: shapes that differ, non-finite entries, a negative variance, or a level
            outside (0, 1); the message names the argument.

    Example:
        >>> y = torch.randn(40)
        >>> ax = predicted_vs_observed(y, y + 0.1 * torch.randn(40), 0.02 * torch.ones(40))
        >>> ax.get_title()[:15]
        '95% intervals c'
        >>> import matplotlib.pyplot as plt; plt.close("all")
    """
    where = "predicted_vs_observed"
    obs, mu, v = array(where, "y", y), array(where, "mean", mean), variance(where, var)
    n = same_length(where, y=obs, mean=mu, var=v)
    half = quantile(where, level) * np.sqrt(v)
    cover = float(np.mean(np.abs(obs - mu) <= half)) if n else float("nan")
    ax = axes(ax, figsize=(4.2, 4.0))
    ax.errorbar(
        obs, mu, yerr=half, fmt="o", ms=3, color=color, ecolor=color, elinewidth=0.8,
        alpha=0.7, label=f"mean ± {percent(level)} interval",
    )  # fmt: skip
    if n:
        lo, hi = min(obs.min(), (mu - half).min()), max(obs.max(), (mu + half).max())
        ax.update_datalim([(lo, lo), (hi, hi)])  # both axes span the data and intervals
        ax.autoscale_view()
        ax.axline((lo, lo), slope=1.0, color="k", ls="--", lw=1, label="predicted = observed")
    ax.set_title(f"{percent(level)} intervals cover {cover:.2f} of {n}", fontsize=FONT)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    return ax


def predicted_vs_observed_grid(
    y,
    predictions,
    *,
    level: float = 0.95,
    columns: int = 2,
    figsize: tuple[float, float] | None = None,
    xlabel: str = "observed",
    ylabel: str = "predicted mean",
    title: str | None = None,
):
    r"""One :func:`predicted_vs_observed` panel per method, on shared axes: for tables.

    A grid of ``columns`` columns (and as many rows as needed), one panel per entry of
    ``predictions``, in its order, all with the same limits, so that the methods' errors and
    intervals compare at a glance. Each panel's title is
    ``"<name>: RMSE <r>\n<level> intervals cover <c> of <n>"``, with
    :math:`r = \sqrt{\tfrac1n\sum_i (y_i - \mu_i)^2}` and ``c`` as in
    :func:`predicted_vs_observed`. Axis labels and tick labels are kept on the outer panels
    only (the x label under the lowest panel of each column, the y label left of the first
    column); the legend is drawn in the first panel. Panels the last row leaves empty are
    removed.

    Args:
        y: observed values ``(n,)``, shared by all methods.
        predictions: method name → ``(mean, var)``, the predictive means and variances of
            an observation ``(n,)`` each (var >= 0); at least one method.
        level: the intervals' probability, in (0, 1).
        columns: the number of columns, >= 1 (fewer when there are fewer methods).
        figsize: the figure's size in inches (``None``: 4.2 × 3.9 per panel).
        xlabel: the x-axis label.
        ylabel: the y-axis label.
        title: an optional title above the grid (``Figure.suptitle``).

    Returns:
        The matplotlib Figure; ``fig.axes`` holds one Axes per method, in the order of
        ``predictions``.

    Raises:
        ValueError: ``predictions`` empty or not a mapping of ``(mean, var)`` pairs,
            shapes that differ, non-finite entries, a negative variance, a level outside
            (0, 1), or ``columns < 1``; the message names the argument (and the method).

    Cost: O(M·n) for ``M`` methods, plus matplotlib's drawing.

    Example:
        >>> y = torch.randn(40)
        >>> fig = predicted_vs_observed_grid(y, {
        ...     "GP": (y + 0.1 * torch.randn(40), torch.full((40,), 0.02)),
        ...     "net": (y + 0.3 * torch.randn(40), torch.full((40,), 0.01)),
        ...     "prior": (torch.zeros(40), torch.ones(40)),
        ... })
        >>> len(fig.axes), fig.axes[0].get_title().splitlines()[0][:10]
        (3, 'GP: RMSE 0')
        >>> [ax.get_xlabel() for ax in fig.axes], [ax.get_ylabel() for ax in fig.axes]
        (['', 'observed', 'observed'], ['predicted mean', '', 'predicted mean'])
        >>> import matplotlib.pyplot as plt; plt.close("all")
    """
    where = "predicted_vs_observed_grid"
    obs = array(where, "y", y)
    if not isinstance(predictions, Mapping) or not predictions:
        got = type(predictions).__name__ if not isinstance(predictions, Mapping) else "empty"
        raise ValueError(
            f"{where}: predictions must be a non-empty mapping of method name → (mean, var), "
            f"got {got}"
        )
    checked = {}
    for name, pair in predictions.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            shown = f" of length {len(pair)}" if isinstance(pair, (tuple, list)) else ""
            raise ValueError(
                f"{where}: predictions[{name!r}] must be a pair (mean, var), got "
                f"{type(pair).__name__}{shown}"
            )
        mu = array(where, f"predictions[{name!r}] mean", pair[0])
        v = array(where, f"predictions[{name!r}] var", pair[1])
        if np.any(v < 0):
            raise ValueError(
                f"{where}: predictions[{name!r}] var must be >= 0, got a minimum of {v.min():.3g}"
            )
        named = {f"predictions[{name!r}] mean": mu, f"predictions[{name!r}] var": v}
        same_length(where, y=obs, **named)
        checked[name] = (mu, v)
    quantile(where, level)
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"{where}: columns must be an integer >= 1, got {columns!r}")
    cols = min(columns, len(checked))
    rows = -(-len(checked) // cols)
    size = (4.2 * cols, 3.9 * rows) if figsize is None else figsize
    fig, grid = pyplot().subplots(rows, cols, figsize=size, sharex=True, sharey=True,
                                  squeeze=False)  # fmt: skip
    panels = list(grid.flat)
    for ax in panels[len(checked) :]:
        fig.delaxes(ax)
    for i, (ax, (name, (mu, v))) in enumerate(zip(panels, checked.items())):
        predicted_vs_observed(obs, mu, v, level=level, ax=ax, xlabel=xlabel, ylabel=ylabel)
        rmse = math.sqrt(float(np.mean((obs - mu) ** 2))) if len(obs) else float("nan")
        ax.set_title(f"{name}: RMSE {rmse:.2f}\n{ax.get_title()}", fontsize=FONT)
        lowest = i + cols >= len(checked)  # no panel under it in its column
        if not lowest:
            ax.set_xlabel("")
        ax.xaxis.set_tick_params(labelbottom=lowest)
        if i % cols:
            ax.set_ylabel("")
    panels[0].legend(loc="upper left", fontsize=FONT - 1)
    if title is not None:
        fig.suptitle(title, fontsize=FONT)
    fig.tight_layout()
    return fig
