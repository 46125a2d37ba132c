"""Smoke tests of ``python -m pyro_ntk demo`` at tiny sizes (the figures are not meaningful)."""

from __future__ import annotations

import argparse
import math
import sys

import pytest
import torch
from networks import assert_unchanged, snapshot

from pyro_ntk.__main__ import build_parser, main, program_name
from pyro_ntk.demo import (
    DemoConfig,
    diabetes_data,
    fine_tune,
    gaussian_scores,
    last_layer,
    ntk_gp,
    rbf_gp,
    run_demo,
    run_settings,
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


def test_run_settings_sets_and_restores_threads_dtype_and_pyro_settings():
    import pyro

    torch.set_num_threads(2)
    torch.set_default_dtype(torch.float32)
    try:
        local = pyro.settings.get("module_local_params")
        with run_settings(1, dtype=torch.float64, module_local_params=not local):
            assert torch.get_num_threads() == 1 and torch.zeros(1).dtype == torch.float64
            assert pyro.settings.get("module_local_params") is (not local)
        assert (torch.get_num_threads(), torch.get_default_dtype()) == (2, torch.float32)
        assert pyro.settings.get("module_local_params") is local
        # restored when the block raises, too
        with pytest.raises(KeyError, match="inside"):
            with run_settings(1, dtype=torch.float64, module_local_params=not local):
                raise KeyError("inside")
        assert (torch.get_num_threads(), torch.get_default_dtype()) == (2, torch.float32)
        assert pyro.settings.get("module_local_params") is local
        # None leaves a setting as it is: a float32 script keeps float32
        with run_settings(None, dtype=None, module_local_params=None):
            assert (torch.get_num_threads(), torch.get_default_dtype()) == (2, torch.float32)
        with pytest.raises(RuntimeError):
            with run_settings(1, dtype=None):
                assert torch.zeros(1).dtype == torch.float32 and torch.get_num_threads() == 1
                raise RuntimeError
        assert (torch.get_num_threads(), torch.get_default_dtype()) == (2, torch.float32)
        for bad, name in ((0, "num_threads"), (torch.int64, "dtype"), ("float64", "dtype")):
            kwargs = {"dtype": bad} if name == "dtype" else {"num_threads": bad}
            with pytest.raises(ValueError, match=f"run_settings: {name} must be"):
                with run_settings(**kwargs):
                    pass  # pragma: no cover
        assert (torch.get_num_threads(), torch.get_default_dtype()) == (2, torch.float32)
    finally:
        torch.set_default_dtype(torch.float64)


def test_adaptation_never_modifies_the_source_network(tmp_path):
    cfg = tiny(tmp_path, cache_dir="")
    data = sine_data(cfg)
    net, how = source_network(cfg, data, torch.device("cpu"))
    assert "cached" not in how  # cache disabled
    before = snapshot(net)
    with run_settings():  # as run_demo runs them: float64, module-local Pyro parameters
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
    args += ["--no-progress", "--no-plot", "--cache-dir", ""]
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


def test_cli_quick_runs_without_scikit_learn_or_matplotlib(tmp_path, capsys, monkeypatch):
    """``pyro-ntk demo --quick``, as CI runs it from a wheel: the cache off, no extras."""
    monkeypatch.setitem(sys.modules, "sklearn", None)  # importing them raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = ["demo", "--quick", "--no-progress", "--cache-dir", "", "--out-dir", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    q = DemoConfig.quick()
    assert f"quick  : smoke-check sizes ({q.num_source} source points" in printed
    assert f"from 10 points, {q.num_test} test points" in printed
    assert "source network trained in" in printed and "cached" not in printed
    assert "RMSE        NLL  95% cover  seconds" in printed
    assert all(m in printed for m in METHODS)
    assert "figure : skipped (matplotlib is not installed)" in printed
    assert not list(tmp_path.iterdir())  # no PNG, and no cache entry

    with pytest.raises(SystemExit) as err:  # the tasks that need scikit-learn say so
        main(["demo", "--quick", "--task", "diabetes", "--no-progress", "--cache-dir", ""])
    assert err.value.code == 2
    assert "--task diabetes needs scikit-learn" in capsys.readouterr().err


def test_quick_is_smaller_and_explicit_options_take_precedence():
    d, q = DemoConfig(), DemoConfig.quick()
    assert q.num_test < d.num_test and q.num_source < d.num_source
    assert q.resolved_source_steps() < d.resolved_source_steps()
    assert q.finetune_steps < d.finetune_steps and q.fit_steps is not None
    assert DemoConfig.quick(source_steps=20, num_test=7).resolved_source_steps() == 20
    parsed = build_parser().parse_args(["demo", "--quick", "--finetune-steps", "3"])
    assert parsed.quick and parsed.finetune_steps == 3
    assert not hasattr(build_parser().parse_args(["demo"]), "finetune_steps")  # default: cfg's


def test_program_name_is_the_console_command_when_run_through_it(monkeypatch):
    assert program_name("/venv/bin/pyro-ntk") == "pyro-ntk"
    assert program_name("/venv/Scripts/pyro-ntk.exe") == "pyro-ntk"
    assert program_name("/src/pyro_ntk/__main__.py") == "python -m pyro_ntk"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pyro-ntk", "demo"])
    assert build_parser().prog == "pyro-ntk"
    assert build_parser().format_usage().startswith("usage: pyro-ntk ")
    monkeypatch.setattr(sys, "argv", ["/src/pyro_ntk/__main__.py"])
    assert build_parser().prog == "python -m pyro_ntk"
