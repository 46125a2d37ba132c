"""pyro_ntk.plot: each figure draws, labels its axes, shows the right numbers, checks inputs."""

from __future__ import annotations

import math
import re
import sys
from statistics import NormalDist

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from pyro_ntk import plot  # noqa: E402
from pyro_ntk.demo import classification_scores  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _labelled(ax) -> None:
    assert ax.get_xlabel() and ax.get_ylabel()
    assert ax.xaxis.label.get_fontsize() >= 9 and ax.yaxis.label.get_fontsize() >= 9


def _band(ax) -> np.ndarray:
    (poly,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    return poly.get_paths()[0].vertices


def test_predictive_bands_limits_are_mean_pm_z_sd():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, generator=g, dtype=torch.float64) * 6 - 3  # unsorted on purpose
    mean = torch.sin(x)
    var = 0.01 + torch.rand(30, generator=g, dtype=torch.float64)
    ax = plot.predictive_bands(
        x, mean, var, y=torch.cos(x), x_train=x[:5], y_train=mean[:5], level=0.9
    )
    _labelled(ax)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x", "y")
    z = NormalDist().inv_cdf(0.95)
    order = torch.argsort(x)
    xs, lo, hi = x[order].numpy(), (mean - z * var.sqrt())[order], (mean + z * var.sqrt())[order]
    verts = _band(ax)
    # fill_between's polygon: along the lower edge, then back along the upper edge
    for xv, yv in zip(xs, lo.numpy()):
        assert np.any(np.isclose(verts[:, 0], xv) & np.isclose(verts[:, 1], yv, atol=1e-12))
    for xv, yv in zip(xs, hi.numpy()):
        assert np.any(np.isclose(verts[:, 0], xv) & np.isclose(verts[:, 1], yv, atol=1e-12))
    line = [ln for ln in ax.get_lines() if ln.get_label() == "predictive mean"][0]
    np.testing.assert_allclose(line.get_xdata(), xs)
    np.testing.assert_allclose(line.get_ydata(), mean[order].numpy())
    assert "90% band" in ax.get_legend_handles_labels()[1]


def test_predictive_bands_two_predictives_share_one_axes():
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    ax = plot.predictive_bands(x, x, x * 0 + 0.01, y=x, label="GP", band_label="GP band",
                               reference_label="target")  # fmt: skip
    plot.predictive_bands(x, -x, x * 0 + 0.04, ax=ax, color="C3", label="net",
                          band_label="net band")  # fmt: skip
    assert ax.get_legend_handles_labels()[1] == ["target", "GP band", "GP", "net band", "net"]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    # the second band is -x ± z·0.2, in its own colour
    z = NormalDist().inv_cdf(0.975)
    top = bands[1].get_paths()[0].vertices[:, 1].max()
    assert math.isclose(top, 1.0 + z * 0.2, rel_tol=1e-12)
    assert not np.allclose(bands[0].get_facecolor(), bands[1].get_facecolor())


def test_predictive_bands_draws_on_given_axes_with_labels():
    fig, ax = plt.subplots()
    x = torch.linspace(0, 1, 5, dtype=torch.float64)
    out = plot.predictive_bands(x[:, None], x, x * 0, ax=ax, xlabel="input", ylabel="output")
    assert out is ax and (ax.get_xlabel(), ax.get_ylabel()) == ("input", "output")


def test_predicted_vs_observed_bars_and_coverage():
    y = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    mean = torch.tensor([0.1, 1.5, 1.0, 3.0], dtype=torch.float64)
    var = torch.tensor([0.01, 0.04, 1.0, 0.0], dtype=torch.float64)
    ax = plot.predicted_vs_observed(y, mean, var)
    _labelled(ax)
    half = 1.959963984540054 * var.sqrt()
    covered = ((y - mean).abs() <= half).double().mean()  # 0.1<=0.196, 0.5>0.392, 1<=1.96, 0<=0
    assert float(covered) == 0.75
    assert ax.get_title() == "95% intervals cover 0.75 of 4"
    (bars,) = [c for c in ax.collections if c.get_segments()]
    segs = np.array(bars.get_segments())
    np.testing.assert_allclose(segs[:, 0, 1], (mean - half).numpy())
    np.testing.assert_allclose(segs[:, 1, 1], (mean + half).numpy())
    np.testing.assert_allclose(segs[:, 0, 0], y.numpy())


def test_predicted_vs_observed_diagonal_spans_data_and_intervals():
    y = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    mean = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    var = torch.tensor([1.0, 0.0, 0.25], dtype=torch.float64)
    ax = plot.predicted_vs_observed(y, mean, var)
    (diag,) = [ln for ln in ax.get_lines() if ln.get_label() == "predicted = observed"]
    lo = float((mean - 1.959963984540054 * var.sqrt()).min())  # 0.5 - 1.96 = -1.46
    hi = float((mean + 1.959963984540054 * var.sqrt()).max())  # 4 + 0.98 = 4.98
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    assert xlim[0] <= lo and xlim[1] >= hi and ylim[0] <= lo and ylim[1] >= hi
    # the line has slope 1 through the data, across the whole Axes
    (px, py), slope = diag.get_xy1(), diag.get_slope()
    assert slope == 1.0 and px == py


def test_predicted_vs_observed_grid_one_panel_per_method_shared_axes_outer_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    predictions = {
        "GP": (y + 0.1 * torch.randn(30, generator=g, dtype=torch.float64), y * 0 + 0.02),
        "net": (y + 0.5 * torch.randn(30, generator=g, dtype=torch.float64), y * 0 + 0.01),
        "prior": (y * 0 + 3.0, y * 0 + 4.0),  # the widest: sets the shared limits
    }
    fig = plot.predicted_vs_observed_grid(y, predictions, level=0.9, xlabel="obs", title="T")
    assert len(fig.axes) == 3 and fig.get_suptitle() == "T"
    z = NormalDist().inv_cdf(0.95)
    lo = min(float(y.min()), *(float((m - z * v.sqrt()).min()) for m, v in predictions.values()))
    hi = max(float(y.max()), *(float((m + z * v.sqrt()).max()) for m, v in predictions.values()))
    for ax, (name, (mean, var)) in zip(fig.axes, predictions.items()):
        # the same limits everywhere, spanning every method's data and intervals
        assert ax.get_xlim() == fig.axes[0].get_xlim() and ax.get_ylim() == fig.axes[0].get_ylim()
        assert ax.get_xlim()[0] <= lo and ax.get_xlim()[1] >= hi
        assert ax.get_ylim()[0] <= lo and ax.get_ylim()[1] >= hi
        rmse = float((mean - y).square().mean().sqrt())
        cover = float(((y - mean).abs() <= z * var.sqrt()).double().mean())
        assert ax.get_title() == f"{name}: RMSE {rmse:.2f}\n90% intervals cover {cover:.2f} of 30"
        (bars,) = [c for c in ax.collections if c.get_segments()]
        segs = np.array(bars.get_segments())
        np.testing.assert_allclose(segs[:, 1, 1], (mean + z * var.sqrt()).numpy(), rtol=1e-12)
    # 2 columns: "GP" "net" / "prior"; labels and tick labels on the outer panels only
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "obs", "obs"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["predicted mean", "", "predicted mean"]
    ticks = [ax.xaxis.get_tick_params()["labelbottom"] for ax in fig.axes]
    assert ticks == [False, True, True]
    yticks = [ax.yaxis.get_tick_params()["labelleft"] for ax in fig.axes]
    assert yticks == [True, False, True]
    _labelled(fig.axes[2])
    assert [ax.get_legend() is not None for ax in fig.axes] == [True, False, False]
    # one column: one panel per row, x labels on the last only
    fig = plot.predicted_vs_observed_grid(y, predictions, columns=1)
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "", "observed"]
    assert all(ax.get_ylabel() == "predicted mean" for ax in fig.axes)


def test_reliability_bins_by_hand_and_ece_formula():
    probs = torch.tensor(
        [[0.95, 0.05], [0.85, 0.15], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8], [0.62, 0.38]],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    r = plot.reliability_bins(probs, labels, bins=4)  # edges 0, .25, .5, .75, 1
    # confidences .95 .85 .7 .55 .8 .62; correct 1 0 1 0 1 1
    # bin 2 (.5-.75): .7 .55 .62 -> acc 2/3, conf .62333; bin 3: .95 .85 .8 -> acc 2/3, conf .8667
    np.testing.assert_array_equal(r.counts, [0, 0, 3, 3])
    np.testing.assert_allclose(r.accuracy, [0, 0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r.confidence, [0, 0, 1.87 / 3, 2.6 / 3])
    ece = (3 * abs(2 / 3 - 1.87 / 3) + 3 * abs(2 / 3 - 2.6 / 3)) / 6
    assert math.isclose(r.ece, ece, rel_tol=1e-12)
    assert math.isclose(r.ece, classification_scores(probs, labels, bins=4)[2], rel_tol=1e-12)


def test_reliability_diagram_shows_accuracy_counts_and_ece():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(300, 5, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, 5, (300,), generator=g)
    ax = plot.reliability_diagram(probs, labels, bins=10, title="net")
    _labelled(ax)
    r = plot.reliability_bins(probs, labels, bins=10)
    assert f"ECE {r.ece:.3f}" in ax.get_title() and ax.get_title().startswith("net\n")
    seen = r.counts > 0
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, r.accuracy[seen])
    (twin,) = [a for a in ax.figure.axes if a is not ax]
    np.testing.assert_allclose([p.get_height() for p in twin.patches], r.counts)
    assert twin.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("per bin" in t for t in legend) and any("accuracy" in t for t in legend)


def test_layer_variances_and_cg_convergence():
    ax = plot.layer_variances(["0.weight", "2.weight", "4.bias"], [0.5, 2.0, 1e-3])
    _labelled(ax)
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [0.5, 2.0, 1e-3])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.weight", "2.weight", "4.bias"]
    ax = plot.layer_variances(["a", "b"], {"before": [0.5, 0.5], "after": [1.0, 0.0]}, log=False)
    _labelled(ax)
    assert ax.get_yscale() == "linear"
    bars = ax.patches
    np.testing.assert_allclose([p.get_height() for p in bars], [0.5, 0.5, 1.0, 0.0])
    # grouped: series i of layer j centred at j + (i - 1/2)·0.4, its own colour, in the legend
    np.testing.assert_allclose([p.get_x() + p.get_width() / 2 for p in bars], [-0.2, 0.8, 0.2, 1.2])
    assert bars[0].get_facecolor() != bars[2].get_facecolor()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["before", "after"]
    ax = plot.cg_convergence({"CG": [1.0, 0.1, 0.01], "PCG": torch.tensor([1.0, 1e-4])}, tol=1e-3)
    _labelled(ax)
    assert ax.get_yscale() == "log"
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[:2] == ["CG (2 iterations)", "PCG (1 iterations)"]


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: plot.predictive_bands([0, 1, 2], [0, 1], [1, 1, 1]), "mean has 2"),
        (lambda: plot.predictive_bands([0, 1], [0, 1], [1, -1]), "var must be >= 0"),
        (lambda: plot.predictive_bands([0, 1], [0, 1], [1, 1], level=1.5), "level"),
        (lambda: plot.predictive_bands([0, 1], [0, 1], [1, 1], x_train=[0]), "y_train"),
        (lambda: plot.predicted_vs_observed([0, 1], [0, 1, 2], [1, 1, 1]), "y has 2"),
        (lambda: plot.predicted_vs_observed([0, 1], [0, 1], [1, -0.5]), "var"),
        (
            lambda: plot.predicted_vs_observed_grid([0, 1], {"a": ([0, 1, 2], [1, 1, 1])}),
            "predicted_vs_observed_grid: the arguments must have one length; y has 2, "
            "predictions['a'] mean has 3",
        ),
        (
            lambda: plot.predicted_vs_observed_grid([0, 1], {"a": ([0, 1], [1, -1])}),
            "predicted_vs_observed_grid: predictions['a'] var must be >= 0",
        ),
        (
            lambda: plot.predicted_vs_observed_grid([0, 1], {"a": ([0, 1], [1, float("inf")])}),
            "predictions['a'] var has non-finite",
        ),
        (lambda: plot.predicted_vs_observed_grid([0, 1], {}), "predictions must be a non-empty"),
        (
            lambda: plot.predicted_vs_observed_grid([0, 1], [([0, 1], [1, 1])]),
            "predictions must be a non-empty mapping of method name → (mean, var), got list",
        ),
        (
            lambda: plot.predicted_vs_observed_grid([0, 1], {"a": ([0, 1],)}),
            "predictions['a'] must be a pair (mean, var), got tuple of length 1",
        ),
        (
            lambda: plot.predicted_vs_observed_grid([0, 1], {"a": ([0, 1], [1, 1])}, columns=0),
            "columns must be an integer >= 1, got 0",
        ),
        (
            lambda: plot.predicted_vs_observed_grid([0, 1], {"a": ([0, 1], [1, 1])}, level=1.0),
            "predicted_vs_observed_grid: level",
        ),
        (
            lambda: plot.predicted_vs_observed_grid([[0, 1], [2, 3]], {"a": ([0, 1], [1, 1])}),
            "predicted_vs_observed_grid: y must have 1 dimension",
        ),
        (lambda: plot.reliability_diagram([[1.2, -0.2]], [0]), "probs must lie in [0, 1]"),
        (lambda: plot.reliability_diagram([[0.5, 0.5]], [0, 1]), "labels has 2"),
        (lambda: plot.reliability_diagram([0.5, 0.5], [0]), "probs must have 2"),
        (lambda: plot.reliability_diagram([[0.5, 0.5]], [2]), "labels must be integers"),
        (lambda: plot.layer_variances(["a"], [1.0, 2.0]), "names has 1"),
        (lambda: plot.layer_variances(["a"], [0.0]), "variances must be > 0"),
        (lambda: plot.layer_variances(["a"], [-1.0], log=False), "variances must be >= 0"),
        (lambda: plot.layer_variances(["a"], {"t": [1.0, 2.0]}), "variances['t'] has 2"),
        (lambda: plot.layer_variances(["a"], {"t": [0.0]}), "variances['t'] must be > 0"),
        (lambda: plot.layer_variances(["a"], {}), "empty mapping"),
        (lambda: plot.cg_convergence({"CG": [1.0, float("nan")]}), "residuals['CG']"),
    ],
)
def test_bad_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        call()


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib.*examples"):
        plot.predictive_bands([0.0, 1.0], [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot.reliability_diagram([[0.6, 0.4]], [0])
