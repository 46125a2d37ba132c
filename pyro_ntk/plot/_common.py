"""What every figure shares: the lazy matplotlib import, input checks, the normal quantile."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

FONT = 10  # pt: titles, labels and legends stay readable at the demo's figure sizes


def pyplot():
    """``matplotlib.pyplot``, imported on first use.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``, or the
            ``examples`` extra: ``pip install "pyro_ntk[examples]"``).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "pyro_ntk.plot needs matplotlib, which is not installed: "
            'pip install matplotlib (or pip install "pyro_ntk[examples]")'
        ) from err
    return plt


def axes(ax, figsize: tuple[float, float] = (5.0, 3.6)):
    """``ax``, or the axes of a new figure of ``figsize`` inches when it is ``None``."""
    if ax is not None:
        return ax
    _, new = pyplot().subplots(figsize=figsize)
    return new


def array(where: str, name: str, value: Any, ndim: int | None = 1) -> np.ndarray:
    """``value`` as a finite float64 NumPy array (a tensor is detached and moved to the CPU).

    Raises:
        ValueError: it has the wrong number of dimensions or non-finite entries; the message
            names ``where`` (the entry point) and ``name`` (the argument).
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    out = np.asarray(value, dtype=np.float64)
    if ndim is not None and out.ndim != ndim:
        if ndim == 1 and out.ndim == 2 and 1 in out.shape:
            out = out.reshape(-1)
        else:
            raise ValueError(
                f"{where}: {name} must have {ndim} dimension(s), got shape {tuple(out.shape)}"
            )
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{where}: {name} has non-finite entries")
    return out


def same_length(where: str, **arrays: np.ndarray) -> int:
    """The common length of ``arrays``; a ``ValueError`` naming them when they differ."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k} has {v}" for k, v in lengths.items())
        raise ValueError(f"{where}: the arguments must have one length; {shown} entries")
    return next(iter(lengths.values()))


def variance(where: str, var: Any) -> np.ndarray:
    """``var`` as a float64 array, with a ``ValueError`` when an entry is negative."""
    out = array(where, "var", var)
    if np.any(out < 0):
        raise ValueError(f"{where}: var must be >= 0, got a minimum of {out.min():.3g}")
    return out


def quantile(where: str, level: float) -> float:
    """``z`` with ``P(|Z| <= z) = level`` for a standard normal ``Z`` (1.96 at 0.95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"{where}: level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def percent(level: float) -> str:
    """``0.95`` → ``"95%"`` (``0.995`` → ``"99.5%"``)."""
    p = 100.0 * level
    return f"{p:.0f}%" if math.isclose(p, round(p)) else f"{p:g}%"
