"""Smoke tests of the examples: each runs its ``--quick`` mode end to end, silently.

``progress=False`` (``--no-progress``) must silence every bar: nothing goes to stderr.
The digits example has its own file, tests/test_example_digits.py.
"""

import math
import pathlib

import pytest
import torch
from example_modules import load_example as load


@pytest.fixture
def sine_transfer():
    return load("sine_transfer")


def test_sine_transfer_smoke(sine_transfer, tmp_path, capsys):
    out = sine_transfer.main(quick=True, out_dir=str(tmp_path), progress=False)
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    for rmse, nll, coverage in out["scores"].values():
        assert math.isfinite(rmse) and math.isfinite(nll) and 0 <= coverage <= 1
    assert out["losses"][-1] < out["losses"][0]
    assert out["noise"] > 0 and out["variance"] > 0
    printed, err = capsys.readouterr()
    assert "NTK-GP" in printed and "fine-tuning" in printed and err == ""


def test_tabular_transfer_smoke(tmp_path, capsys):
    tabular_transfer = load("tabular_transfer")
    out = tabular_transfer.main(
        quick=True, out_dir=str(tmp_path), seeds=2, num_target=10, progress=False
    )
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    assert set(out["table"]) == set(tabular_transfer.METHODS)
    for method, per_seed in out["scores"].items():
        assert len(per_seed) == 2
        for rmse, nll, coverage in per_seed:
            assert rmse > 0 and math.isfinite(nll) and 0 <= coverage <= 1
        (rmse_mean, rmse_sd), _, _ = out["table"][method]
        assert rmse_mean == pytest.approx(sum(s[0] for s in per_seed) / 2) and rmse_sd >= 0
    printed, err = capsys.readouterr()
    assert "NTK-GP (pyro_ntk)" in printed and "mean ± sd over 2 seeds" in printed and err == ""


def test_layer_relevance_smoke(tmp_path, capsys):
    layer_relevance = load("layer_relevance")
    out = layer_relevance.main(quick=True, out_dir=str(tmp_path), progress=False)
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    assert set(out["results"]) == {"new readout", "input warp"}
    for r in out["results"].values():
        assert list(r["variances"]) == ["0", "2", "4"]  # the three nn.Linear layers
        assert all(v > 0 for v in r["variances"].values()) and r["noise"] > 0
        for shares in (r["shares"], r["shares_before"]):
            assert sum(shares.values()) == pytest.approx(1.0)
            assert all(0 <= c <= 1 for c in shares.values())
        assert r["losses"][-1] < r["losses"][0]
    printed, err = capsys.readouterr()
    assert "share fitted" in printed and "layer 3 (40→1)" in printed and err == ""
    # built to know: a new readout moves the last layer, an input warp the first
    shares = {name: r["shares"] for name, r in out["results"].items()}
    assert shares["new readout"]["4"] > 0.9 and shares["input warp"]["0"] > 0.9
    # integrated out, the posterior mean of the shares still names the layer, with its sd
    for name, layer in (("new readout", "4"), ("input warp", "0")):
        integrated = out["results"][name]["shares_integrated"]
        assert sum(m for m, _ in integrated.values()) == pytest.approx(1.0)
        assert all(sd >= 0 for _, sd in integrated.values())
        assert max(integrated, key=lambda g: integrated[g][0]) == layer


def test_linearization_quality_smoke(tmp_path, capsys):
    linearization_quality = load("linearization_quality")
    out = linearization_quality.main(quick=True, out_dir=str(tmp_path), progress=False)
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    rows = out["rows"]
    assert [r["phase"] for r in rows] == [0.25, 1.0, 2.0]
    for r in rows:
        # both adaptations move towards the target: the two curves are closer to each other
        # than the unadapted source network is to the target
        assert r["lin_vs_ft"] < r["source_vs_truth"]
        assert r["ft_distance"] > 0 and r["lin_distance"] > 0
    # a farther target, a larger δ
    assert rows[0]["lin_distance"] < rows[1]["lin_distance"] < rows[2]["lin_distance"]
    printed, err = capsys.readouterr()
    assert "lin vs ft" in printed and err == ""


def test_distributed_regression_quick_single_process(capsys):
    distributed_regression = load("distributed_regression")
    # --quick sets the sizes it names; options given explicitly take precedence
    threads = torch.get_num_threads()
    summary = distributed_regression.main(["--quick", "--no-progress", "--n-train", "200"])
    assert torch.get_num_threads() == threads  # --threads 1 for the run only
    assert summary["world_size"] == 1 and summary["n_train"] == 200
    assert summary["converged"] and summary["test_rmse"] < summary["network_rmse"]
    assert 0 <= summary["coverage_95"] <= 1
    printed, err = capsys.readouterr()
    assert "test RMSE" in printed and err == ""


def test_linearization_quality_delta_is_the_gp_mean():
    """f(x; θ*) + J(x) δ with the script's MAP δ reproduces the NTK-GP posterior mean."""
    import pyro

    linearization_quality = load("linearization_quality")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    X = torch.linspace(-2, 2, 7).unsqueeze(-1)
    y = torch.sin(X).squeeze(-1)
    with pyro.settings.context(module_local_params=True):
        gp, delta = linearization_quality.linearized_fit(net, X, y)
        Xnew = torch.linspace(-3, 3, 5).unsqueeze(-1)
        with torch.no_grad():
            gp_mean = gp(Xnew)[0]
    lin = gp.linearization
    linear = lin(Xnew).squeeze(-1) + lin.jvp(Xnew, delta).squeeze(-1)
    torch.testing.assert_close(linear, gp_mean, rtol=1e-8, atol=1e-10)
