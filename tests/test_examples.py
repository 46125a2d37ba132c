"""Smoke tests of the examples: each runs end to end at reduced sizes."""

import importlib.util
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sine_transfer():
    return load("sine_transfer")


def test_sine_transfer_smoke(sine_transfer, tmp_path, capsys):
    out = sine_transfer.main(smoke_test=True, out_dir=str(tmp_path), progress=False)
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    for rmse, nll, coverage in out["scores"].values():
        assert math.isfinite(rmse) and math.isfinite(nll) and 0 <= coverage <= 1
    assert out["losses"][-1] < out["losses"][0]
    assert out["noise"] > 0 and out["variance"] > 0
    printed = capsys.readouterr().out
    assert "NTK-GP" in printed and "fine-tuning" in printed


def test_digits_transfer_smoke(tmp_path, capsys):
    digits_transfer = load("digits_transfer")
    # lin. SVI runs fit with a step budget (10 steps here): fit says it stopped unconverged
    with pytest.warns(UserWarning, match="stopped at the step cap max_steps=10, unconverged"):
        out = digits_transfer.main(smoke_test=True, out_dir=str(tmp_path))
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    for accuracy, nll, ece, seconds in out["table"].values():
        assert 0 <= accuracy <= 1 and math.isfinite(nll) and 0 <= ece <= 1 and seconds > 0
    printed = capsys.readouterr().out
    assert "lin. Laplace" in printed and "fine-tuning" in printed
    assert "tempered Laplace" in printed and "T (CV) =" in printed
    assert set(out["wins"]) == {5} and 0 <= out["wins"][5] <= 1
    assert "better than fine-tuning on both NLL and ECE: k=5:" in printed
    assert "lin. SVI: pyro_ntk.fit, Adam (lr 0.02), a budget of 10 steps per draw" in printed


def test_tabular_transfer_smoke(tmp_path, capsys):
    tabular_transfer = load("tabular_transfer")
    out = tabular_transfer.main(
        smoke_test=True, out_dir=str(tmp_path), seeds=2, num_target=10, progress=False
    )
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    assert set(out["table"]) == set(tabular_transfer.METHODS)
    for method, per_seed in out["scores"].items():
        assert len(per_seed) == 2
        for rmse, nll, coverage in per_seed:
            assert rmse > 0 and math.isfinite(nll) and 0 <= coverage <= 1
        (rmse_mean, rmse_sd), _, _ = out["table"][method]
        assert rmse_mean == pytest.approx(sum(s[0] for s in per_seed) / 2) and rmse_sd >= 0
    printed = capsys.readouterr().out
    assert "NTK-GP (pyro_ntk)" in printed and "mean ± sd over 2 seeds" in printed


def test_layer_relevance_smoke(tmp_path, capsys):
    layer_relevance = load("layer_relevance")
    out = layer_relevance.main(smoke_test=True, out_dir=str(tmp_path), progress=False)
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    assert set(out["results"]) == {"new readout", "input warp"}
    for r in out["results"].values():
        assert list(r["variances"]) == ["0", "2", "4"]  # the three nn.Linear layers
        assert all(v > 0 for v in r["variances"].values()) and r["noise"] > 0
        for shares in (r["shares"], r["shares_before"]):
            assert sum(shares.values()) == pytest.approx(1.0)
            assert all(0 <= c <= 1 for c in shares.values())
        assert r["losses"][-1] < r["losses"][0]
    printed = capsys.readouterr().out
    assert "share fitted" in printed and "layer 3 (40→1)" in printed


def test_linearization_quality_smoke(tmp_path, capsys):
    linearization_quality = load("linearization_quality")
    out = linearization_quality.main(smoke_test=True, out_dir=str(tmp_path), progress=False)
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    rows = out["rows"]
    assert [r["phase"] for r in rows] == [0.25, 1.0]
    for r in rows:
        # both adaptations move towards the target: the two curves are closer to each other
        # than the unadapted source network is to the target
        assert r["lin_vs_ft"] < r["source_vs_truth"]
        assert r["ft_distance"] > 0 and r["lin_distance"] > 0
    assert rows[1]["lin_distance"] > rows[0]["lin_distance"]  # a farther target, a larger δ
    assert "lin vs ft" in capsys.readouterr().out


def test_linearization_quality_delta_is_the_gp_mean():
    """f(x; θ*) + J(x) δ with the script's MAP δ reproduces the NTK-GP posterior mean."""
    import pyro
    import torch

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
