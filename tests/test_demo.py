"""Smoke tests of ``python -m pyro_ntk demo`` at tiny sizes (the figures are not meaningful)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from networks import assert_unchanged, snapshot

from pyro_ntk.__main__ import build_parser, main
from pyro_ntk.demo import (
    DemoConfig,
    diabetes_data,
    fine_tune,
    gaussian_scores,
    last_layer,
    ntk_gp,
    rbf_gp,
    run_demo,
    sine_data,
    source_network,
)

METHODS = [
    "source network (no adaptation)",
    "NTK-GP (pyro_ntk)",
    "fine-tuning",
    "last layer retrained",
    "RBF GP (pyro.contrib.gp)",
]


def tiny(tmp_path, **kw) -> DemoConfig:
    sizes = dict(
        num_target=6,
        num_source=40,
        num_test=25,
        source_steps=30,
        finetune_steps=10,
        svi_steps=4,
        progress=False,
        plot=False,
        out_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
    )
    sizes.update(kw)
    return DemoConfig(**sizes)


def test_gaussian_scores_match_torch_normal():
    mean, var, y = torch.randn(50), torch.rand(50) + 0.1, torch.randn(50)
    rmse, nll, cover = gaussian_scores(mean, var, y)
    normal = torch.distributions.Normal(mean, var.sqrt())
    assert math.isclose(nll, float(-normal.log_prob(y).mean()), rel_tol=1e-12)
    assert math.isclose(rmse, float((mean - y).square().mean().sqrt()), rel_tol=1e-12)
    lo, hi = normal.icdf(torch.tensor(0.025)), normal.icdf(torch.tensor(0.975))
    assert math.isclose(cover, float(((y >= lo) & (y <= hi)).double().mean()), abs_tol=1e-12)


def test_demo_sine_runs_plots_and_caches(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    dtype = torch.get_default_dtype()
    torch.set_num_threads(2)  # run_demo uses one thread and restores the setting
    out = run_demo(tiny(tmp_path, plot=True))
    printed = capsys.readouterr().out
    assert [r.method for r in out["results"]] == METHODS
    for r in out["results"]:
        assert math.isfinite(r.rmse) and math.isfinite(r.nll) and 0 <= r.coverage <= 1
        assert r.mean.shape == r.var.shape == (25,) and (r.var > 0).all()
        assert r.method in printed
    assert "source network trained" in printed and "cached in" in printed
    assert out["figure"].exists() and out["figure"].stat().st_size > 1000
    # the settings the demo changes are restored
    assert torch.get_default_dtype() == dtype and torch.get_num_threads() == 2

    # a second run loads the cached source network and reproduces the table
    again = run_demo(tiny(tmp_path))
    assert "loaded from" in capsys.readouterr().out
    for a, b in zip(out["results"], again["results"]):
        assert (a.rmse, a.nll, a.coverage) == pytest.approx((b.rmse, b.nll, b.coverage))


def test_demo_diabetes_runs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = run_demo(tiny(tmp_path, task="diabetes", num_target=15))
    n_test = out["data"].X_test.shape[0]
    assert n_test > 100  # the older half of 442 patients, less the 15 used for adaptation
    assert [r.method for r in out["results"]] == METHODS
    assert all(math.isfinite(r.nll) for r in out["results"])
    assert "diabetes" in capsys.readouterr().out


def test_adaptation_never_modifies_the_source_network(tmp_path):
    cfg = tiny(tmp_path, cache_dir="")
    data = sine_data(cfg)
    net, how = source_network(cfg, data, torch.device("cpu"))
    assert "cached" not in how  # cache disabled
    before = snapshot(net)
    ntk_gp(net, data, cfg)
    fine_tune(net, data, cfg)
    last_layer(net, data, cfg)
    rbf_gp(net, data, cfg)
    assert_unchanged(net, before)


def test_diabetes_split_is_by_age_and_standardized_on_the_source(tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_diabetes

    data = diabetes_data(tiny(tmp_path, num_target=10))
    X, _ = load_diabetes(return_X_y=True)
    assert data.X_source.shape[0] + data.X_target.shape[0] + data.X_test.shape[0] == X.shape[0]
    # standardized with source statistics: the source has mean 0, the older target does not
    assert data.X_source.mean(0).abs().max() < 1e-10
    assert data.X_target[:, 0].min() > data.X_source[:, 0].max()


def test_every_cli_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    demo = sub.choices["demo"]
    options = [a for a in demo._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"task", "num_target", "seed", "device", "out_dir"}
    for action in options:
        assert action.help and len(action.help) > 10, action.option_strings
    assert set(next(a for a in options if a.dest == "task").choices) == {
        "sine",
        "diabetes",
        "digits",
    }


def test_cli_runs_and_rejects_bad_input(tmp_path, capsys):
    args = ["demo", "--num-target", "5", "--source-steps", "20", "--finetune-steps", "5"]
    args += ["--svi-steps", "3", "--no-progress", "--no-plot", "--cache-dir", ""]
    args += ["--out-dir", str(tmp_path)]
    assert main(args) == 0
    assert "NTK-GP (pyro_ntk)" in capsys.readouterr().out

    with pytest.raises(SystemExit) as err:
        main(["demo", "--task", "mnist"])
    assert err.value.code == 2
    assert "invalid choice" in capsys.readouterr().err

    with pytest.raises(SystemExit) as err:
        main(["demo", "--num-target", "0", "--no-progress"])
    assert err.value.code == 2
    assert "--num-target must be >= 1, got 0" in capsys.readouterr().err

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["demo", "--device", "cuda", "--no-progress"])
        assert "CUDA is not available" in capsys.readouterr().err
