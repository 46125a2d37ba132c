r"""Diagnostics of a fit: per-layer prior variances and conjugate-gradient convergence.

Per-layer variances: the fitted :math:`\sigma_g^2` of a kernel
:math:`\sum_g \sigma_g^2 J_g J_g^\top` (``layer_variances=True``). CG convergence: the
relative residual :math:`\|b - A x_k\|_2 / \|b\|_2` at each iteration ``k``.
"""

from __future__ import annotations

import numpy as np

from pyro_ntk.plot._common import FONT, array, axes


def layer_variances(names, variances, *, ax=None, ylabel: str = "prior variance σ_g²"):
    """A bar per layer (parameter group) of its variance, on a log scale.

    Args:
        names: the layers' names, a sequence of ``g`` strings.
        variances: their variances ``(g,)``, all > 0.
        ax: the matplotlib Axes to draw on; ``None`` makes a new figure.
        ylabel: the y-axis label.

    Returns:
        The matplotlib Axes drawn on.

    Raises:
        ValueError: a length mismatch or a variance <= 0; the message names the argument.

    Example:
        >>> ax = layer_variances(["0.weight", "2.weight"], torch.tensor([0.5, 2.0]))
        >>> ax.get_yscale()
        'log'
        >>> import matplotlib.pyplot as plt; plt.close("all")
    """
    where = "layer_variances"
    names = [str(n) for n in names]
    v = array(where, "variances", variances)
    if len(names) != len(v):
        raise ValueError(f"{where}: names has {len(names)} entries but variances has {len(v)}")
    if np.any(v <= 0):
        raise ValueError(f"{where}: variances must be > 0 (log scale), got min {v.min():.3g}")
    ax = axes(ax, figsize=(max(4.0, 0.8 * len(names) + 1.5), 3.6))
    pos = np.arange(len(names))
    ax.bar(pos, v, color="C0", edgecolor="k")
    ax.set_yscale("log")
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=30 if len(names) > 4 else 0, ha="right"
                       if len(names) > 4 else "center", fontsize=FONT - 1)  # fmt: skip
    ax.set_xlabel("layer (parameter group)", fontsize=FONT)
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
