"""Smoke test of benchmarks/bench_transfer.py's pyro_ntk part (tiny sizes; no laplace-torch)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench_transfer():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the benchmarks are scripts, not a package
    return importlib.import_module("bench_transfer")


def test_gaussian_scores_against_hand_computation():
    bt = _bench_transfer()
    mean = torch.tensor([0.0, 1.0, 2.0])
    var = torch.tensor([1.0, 4.0, 0.25])
    y = torch.tensor([0.5, 1.0, 4.0])
    scores = bt.gaussian_scores(mean, var, y)
    assert math.isclose(scores["rmse"], math.sqrt((0.25 + 0 + 4) / 3), rel_tol=1e-12)
    nll = [
        0.5 * math.log(2 * math.pi * v) + 0.5 * r * r / v for v, r in [(1, 0.5), (4, 0), (0.25, 2)]
    ]
    assert math.isclose(scores["nll"], sum(nll) / 3, rel_tol=1e-12)
    assert scores["coverage"] == 2 / 3  # |4 - 2| = 2 > 1.96 * 0.5


def test_transfer_benchmark_pyro_ntk_rows(tmp_path):
    bt = _bench_transfer()
    cfg = bt.Config(
        width=8,
        num_source=40,
        num_target={"sine": 6, "diabetes": 8},
        num_test=30,
        source_steps=30,
        finetune_steps=10,
        hyper_steps=5,
    )
    data = bt.make_data("sine", 0, cfg)
    net = bt.train_source("sine", data, 0, cfg)
    torch.save(net.state_dict(), tmp_path / "sine-0-source.pt")
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()

    results = []
    for method in ("source", "fine_tuning", "ntk_gp"):
        out = bt.evaluate(method, ["sine"], [0], cfg, str(tmp_path), measure_memory=True)
        results.append(out["sine"])
    assert (torch.get_default_dtype(), torch.get_num_threads()) == (dtype, threads)

    rows = {r["method"]: r["rows"][0] for r in results}
    with torch.no_grad():
        direct = (net(data["Xt"]).squeeze(-1) - data["yt"]).square().mean().sqrt()
    assert math.isclose(rows["source"]["rmse"], float(direct), rel_tol=1e-10)
    for method, row in rows.items():
        assert math.isfinite(row["nll"]) and row["noise"] > 0, method
        assert 0.0 <= row["coverage"] <= 1.0 and row["seconds"] >= 0.0, method
    assert rows["ntk_gp"]["variance"] > 0
    table = bt.summarize(results)
    assert "NTK-GP (pyro_ntk)" in table and table.count("\n") == len(results) + 1


def test_end_to_end_benchmark_runs_small(tmp_path):
    """benchmarks/bench_e2e.py (the GPU run at N = 10⁵) on tiny MLP and CNN problems on the CPU."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    e2e = importlib.import_module("bench_e2e")
    threads = torch.get_num_threads()
    out = tmp_path / "e2e.json"
    argv = ["--networks", "mlp,cnn", "--n", "24", "--m", "8", "--samples", "8", "--max-steps",
            "2", "--train-steps", "10", "--no-progress", "--json", str(out)]  # fmt: skip
    rows = e2e.main(argv)
    torch.set_num_threads(threads)
    assert out.exists() and [r["P"] for r in rows] == [20_097, 75_153]
    for row in rows:
        assert row["N"] == 24 and row["M"] == 8 and row["fit_steps"] >= 1
        assert row["cg_method"] in ("cg", "pcg")
        assert row["cg_residual"] <= 1e-2  # the posterior solve reached the default tolerance
        for key in ("variance", "noise", "test_rmse", "test_nll", "total_s", "peak_mib"):
            assert math.isfinite(row[key]), key


def test_end_to_end_cnn_problem_is_the_engine_benchmarks_resnet():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    e2e = importlib.import_module("bench_e2e")

    class Args:
        seed, csv, train_steps = 0, None, 0

    net, X = e2e.cnn_problem(3, 2, torch.device("cpu"), torch.float64, Args)
    assert X.shape == (5, 3, 32, 32) and net(X).shape == (5, 1)
    assert sum(p.numel() for p in net.parameters()) == 75_153
