r"""Reliability diagrams: how often a classifier is right against how confident it is.

The confidence of a prediction is its largest class probability. With equal-width bins
:math:`B_1, \dots, B_b` on :math:`[0, 1]` (a confidence on an inner edge goes to the upper
bin, 1 to the last),

.. math::

    \mathrm{acc}(B) = \frac{1}{|B|}\sum_{i \in B} [\hat y_i = y_i],\qquad
    \mathrm{conf}(B) = \frac{1}{|B|}\sum_{i \in B} \max_c p_{ic},\qquad
    \mathrm{ECE} = \sum_b \frac{|B_b|}{n}\,\big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|.

Cost: O(n·C).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyro_ntk.plot._common import FONT, array, axes


@dataclass(frozen=True)
class ReliabilityBins:
    """The per-bin figures of a reliability diagram (empty bins hold 0 and count 0).

    Attributes:
        edges: the bin edges ``(bins + 1,)`` on [0, 1].
        accuracy: the fraction of correct predictions per bin ``(bins,)``.
        confidence: the mean confidence per bin ``(bins,)``.
        counts: the number of predictions per bin ``(bins,)``.
        ece: the expected calibration error.
    """

    edges: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    counts: np.ndarray
    ece: float


def reliability_bins(probs, labels, *, bins: int = 15) -> ReliabilityBins:
    """Accuracy, mean confidence and count per equal-width confidence bin, and the ECE.

    Args:
        probs: predictive class probabilities ``(n, C)``, entries in [0, 1].
        labels: integer labels ``(n,)`` in ``0..C-1``.
        bins: number of bins, >= 1.

    Returns:
        A :class:`ReliabilityBins`.

    Raises:
        ValueError: ``probs`` not 2-D or outside [0, 1], ``labels`` of another length or
            out of range, or ``bins < 1``; the message names the argument.

    Example:
        >>> r = reliability_bins([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]], [0, 1, 1], bins=5)
        >>> r.counts.tolist(), r.accuracy.tolist(), round(r.ece, 3)
        ([0, 0, 0, 1, 2], [0.0, 0.0, 0.0, 1.0, 1.0], 0.2)
    """
    where = "reliability_diagram"
    p = array(where, "probs", probs, ndim=2)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(
            f"{where}: probs must lie in [0, 1], got entries in [{p.min():.3g}, {p.max():.3g}]"
        )
    y = array(where, "labels", labels)
    if len(y) != len(p):
        raise ValueError(f"{where}: labels has {len(y)} entries but probs has {len(p)} rows (n, C)")
    if np.any(y != np.round(y)) or (len(y) and (y.min() < 0 or y.max() >= p.shape[1])):
        raise ValueError(f"{where}: labels must be integers in 0..{p.shape[1] - 1}")
    if int(bins) != bins or bins < 1:
        raise ValueError(f"{where}: bins must be a positive integer, got {bins}")
    bins = int(bins)
    conf, correct = p.max(-1), (p.argmax(-1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], conf, side="right")
    counts = np.bincount(which, minlength=bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    acc = np.bincount(which, weights=correct, minlength=bins) / safe
    mean_conf = np.bincount(which, weights=conf, minlength=bins) / safe
    ece = float(np.sum(counts * np.abs(acc - mean_conf)) / max(len(y), 1))
    return ReliabilityBins(edges, acc, mean_conf, counts.astype(np.int64), ece)


def reliability_diagram(
    probs, labels, *, bins: int = 15, ax=None, title: str | None = None, legend: bool = True
):
    """Accuracy against confidence per bin, with the bin counts shown.

    Draws, for each non-empty bin, a light blue bar from 0 to the bin's accuracy and a red
    tick at its mean confidence (the gap between them is the bin's miscalibration), the
    diagonal (perfect calibration: bars below it are over-confident, above it
    under-confident), and, as narrow grey bars on a right-hand axis filling the lowest
    third, the number of predictions per bin (a bin with few says little). The legend names
    all four; the title gives the ECE (``title`` is put above it).

    Args:
        probs: predictive class probabilities ``(n, C)``, entries in [0, 1].
        labels: integer labels ``(n,)``.
        bins: number of equal-width confidence bins (as in the ECE).
        ax: the matplotlib Axes to draw on; ``None`` makes a new figure.
        title: an optional first title line (e.g. the method's name).
        legend: draw the legend (turn off on all but one panel of a grid).

    Returns:
        The matplotlib Axes drawn on (the counts are on ``ax``'s twin, drawn underneath).

    Raises:
        ValueError: as :func:`reliability_bins`.

    Example:
        >>> probs = torch.softmax(3 * torch.randn(200, 10, dtype=torch.float64), -1)
        >>> ax = reliability_diagram(probs, torch.randint(0, 10, (200,)), bins=10)
        >>> ax.get_xlabel(), ax.get_title().startswith("ECE")
        ('confidence (largest class probability)', True)
        >>> import matplotlib.pyplot as plt; plt.close("all")
    """
    r = reliability_bins(probs, labels, bins=bins)
    ax = axes(ax, figsize=(4.2, 4.0))
    width, seen = np.diff(r.edges), r.counts > 0
    counts_ax = ax.twinx()
    counts_ax.bar(r.edges[:-1] + width / 4, r.counts, width=width / 2, align="edge", color="0.45")
    counts_ax.set_ylim(0, 3.0 * max(int(r.counts.max()), 1))  # the histogram: lowest third
    counts_ax.set_ylabel("predictions in the bin (grey)", fontsize=FONT - 1, color="0.35")
    counts_ax.tick_params(labelsize=FONT - 1, colors="0.35")
    ax.set_zorder(counts_ax.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.bar(r.edges[:-1][seen], r.accuracy[seen], width=width[seen], align="edge", color="C0",
           edgecolor="C0", alpha=0.35, label="accuracy in the bin")  # fmt: skip
    ax.plot(r.confidence[seen], r.confidence[seen], "_", color="C3", ms=10, mew=2,
            ls="none", label="mean confidence in the bin")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    if legend:
        from matplotlib.patches import Patch

        handles, labels = ax.get_legend_handles_labels()
        handles.append(Patch(color="0.45", label="predictions per bin (right axis)"))
        ax.legend(handles=handles, loc="upper left", fontsize=FONT - 1, framealpha=0.9)
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.set_xlabel("confidence (largest class probability)", fontsize=FONT)
    ax.set_ylabel("accuracy in the bin", fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    head = f"ECE {r.ece:.3f}, {int(r.counts.sum())} predictions, {len(r.counts)} bins"
    ax.set_title(head if title is None else f"{title}\n{head}", fontsize=FONT)
    return ax
