r"""Figures of predictive uncertainty: bands, reliability diagrams and fit diagnostics.

Every function draws on a matplotlib Axes (``ax=``, or a new figure when ``None``), labels
both axes with text of at least 9 pt, and returns the Axes (a grid returns its Figure).
matplotlib is imported only when a function is called (``pip install matplotlib``, or the
``examples`` extra); inputs may be tensors (detached and moved to the CPU) or arrays.

* :func:`predictive_bands`: mean and central band over a 1-D input (call it again on the
  same Axes, with another ``color`` and ``band_label``, to compare predictives).
* :func:`predicted_vs_observed`: for tables, predicted means against observed values with
  interval bars, and the intervals' coverage; :func:`predicted_vs_observed_grid` draws
  one such panel per method on shared axes.
* :func:`reliability_diagram`: a classifier's accuracy against its confidence, with the
  bin counts and the ECE (:func:`reliability_bins` returns the figures).
* :func:`layer_variances`: per-layer prior variances :math:`\sigma_g^2`, or several
  per-layer series side by side (e.g. per task; linear scale for shares).
* :func:`cg_convergence`: relative residuals of iterative solves.

Example:
    >>> from pyro_ntk.plot import predictive_bands
    >>> x = torch.linspace(-3, 3, 50)
    >>> ax = predictive_bands(x, torch.sin(x), torch.full((50,), 0.05), level=0.9)
    >>> ax.get_legend_handles_labels()[1]
    ['90% band', 'predictive mean']
    >>> import matplotlib.pyplot as plt; plt.close("all")
"""

from pyro_ntk.plot.bands import (
    predicted_vs_observed,
    predicted_vs_observed_grid,
    predictive_bands,
)
from pyro_ntk.plot.calibration import ReliabilityBins, reliability_bins, reliability_diagram
from pyro_ntk.plot.diagnostics import cg_convergence, layer_variances

__all__ = [
    "predictive_bands",
    "predicted_vs_observed",
    "predicted_vs_observed_grid",
    "reliability_diagram",
    "reliability_bins",
    "ReliabilityBins",
    "layer_variances",
    "cg_convergence",
]
