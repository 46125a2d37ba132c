r"""Diagnostics of a fit: per-layer prior variances and conjugate-gradient convergence.

Per-layer variances: the fitted :math:`\sigma_g^2` of a kernel
:math:`\sum_g \sigma_g^2 J_g J_g^\top` (``layer_variances=True``), or any per-layer series
beside each other (the variances fitted on several tasks; each layer's share of the kernel
trace :math:`\sigma_g^2 \operatorname{tr} J_g J_g^\top / \operatorname{tr} K`). Cost:
O(g·series). CG convergence: the
relative residual :math:`\|b - A x_k\|_2 / \|b\|_2` at each iteration ``k``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pyro_ntk.plot._common import FONT, array, axes


def layer_variances(
    names,
    variances,
    *,
    ax=None,
    log: bool = True,
    xlabel: str = "layer (parameter group)",
    ylabel: str = "prior variance σ_g²",
):
    """A bar per layer (parameter group) of its variance, or of several series side by side.

    Args:
        names: the layers' names, a sequence of ``g`` strings.
        variances: their variances ``(g,)``; or a mapping series name → ``(g,)`` values
            (e.g. one per task, or before and after fitting), drawn as grouped bars in the
            colours C0, C1, ... with a legend.
        ax: the matplotlib Axes to draw on; ``None`` makes a new figure.
        log: a log y-axis (values must be > 0); ``False``: a linear one from 0 (values
            must be >= 0), for shares or fractions.
        xlabel: the x-axis label.
        ylabel: the y-axis label.

    Returns:
        The matplotlib Axes drawn on.

    Raises:
        ValueError: a length mismatch, an empty mapping, or a value <= 0 (log) or < 0
            (linear); the message names the argument (and the series).

    Example:
        >>> ax = layer_variances(["0.weight", "2.weight"], torch.tensor([0.5, 2.0]))
        >>> ax.get_yscale()
        'log'
        >>> ax = layer_variances(["0", "2"], {"task A": [0.9, 0.1], "task B": [0.2, 0.8]},
        ...                      log=False, ylabel="share of the kernel trace")
        >>> [t.get_text() for t in ax.get_legend().get_texts()]
        ['task A', 'task B']
        >>> import matplotlib.pyplot as plt; plt.close("all")
    """
    where = "layer_variances"
    names = [str(n) for n in names]
    single = not isinstance(variances, Mapping)
    series = {"": variances} if single else dict(variances)
    if not series:
        raise ValueError(f"{where}: variances is an empty mapping; give name -> values")
    values = {}
    for key, vals in series.items():
        arg = "variances" if single else f"variances[{key!r}]"
        v = array(where, arg, vals)
        if len(names) != len(v):
            raise ValueError(f"{where}: names has {len(names)} entries but {arg} has {len(v)}")
        if log and np.any(v <= 0):
            raise ValueError(f"{where}: {arg} must be > 0 (log scale), got min {v.min():.3g}")
        if not log and np.any(v < 0):
            raise ValueError(f"{where}: {arg} must be >= 0, got min {v.min():.3g}")
        values[key] = v
    k = len(values)
    ax = axes(ax, figsize=(max(4.0, (0.8 + 0.3 * (k - 1)) * len(names) + 1.5), 3.6))
    pos, width = np.arange(len(names)), 0.8 / k
    for i, (key, v) in enumerate(values.items()):
        ax.bar(pos + (i - (k - 1) / 2) * width, v, width=width, color=f"C{i}", edgecolor="k",
               label=key if key else None)  # fmt: skip
    if log:
        ax.set_yscale("log")
    if not single:
        ax.legend(fontsize=FONT - 1)
    ax.set_xticks(pos)
    tilt = len(names) > 4
    ax.set_xticklabels(names, rotation=30 if tilt else 0, ha="right" if tilt else "center",
                       fontsize=FONT - 1)  # fmt: skip
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(axis="y", labelsize=FONT - 1)
    return ax


def cg_convergence(residuals: dict, *, ax=None, tol: float | None = None):
    """Relative residual against iteration, one line per method, on a log y-axis.

    Args:
        residuals: method name → its relative residuals per iteration (a sequence of
            ``k_m`` positive floats; iteration 0 first).
        ax: the matplotlib Axes to draw on; ``None`` makes a new figure.
        tol: an optional tolerance, drawn as a dotted horizontal line.

    Returns:
        The matplotlib Axes drawn on.

    Raises:
        ValueError: no methods, a method with no residuals, or a non-finite or negative
            residual; the message names the method.

    Example:
        >>> ax = cg_convergence({"CG": [1.0, 0.1, 0.01], "PCG": [1.0, 1e-3]}, tol=1e-2)
        >>> ax.get_ylabel()
        'relative residual ‖b − Ax‖ / ‖b‖'
        >>> import matplotlib.pyplot as plt; plt.close("all")
    """
    where = "cg_convergence"
    if not residuals:
        raise ValueError(f"{where}: residuals is empty; give a dict name -> residuals")
    ax = axes(ax)
    for name, values in residuals.items():
        r = array(where, f"residuals[{name!r}]", values)
        if len(r) == 0 or np.any(r < 0):
            raise ValueError(f"{where}: residuals[{name!r}] must be non-empty and >= 0")
        ax.semilogy(np.arange(len(r)), np.maximum(r, np.finfo(np.float64).tiny), marker=".",
                    label=f"{name} ({len(r) - 1} iterations)")  # fmt: skip
    if tol is not None:
        ax.axhline(tol, color="k", ls=":", lw=1, label=f"tolerance {tol:g}")
    ax.set_xlabel("iteration", fontsize=FONT)
    ax.set_ylabel("relative residual ‖b − Ax‖ / ‖b‖", fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    ax.legend(fontsize=FONT - 1)
    return ax
