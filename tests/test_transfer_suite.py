"""The transfer suite's scores and paired rule, against hand computations and scipy."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def scores():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the suite lives beside the benchmark scripts
    return importlib.import_module("transfer_suite.scores")


def test_gaussian_scores_by_hand(scores):
    mean = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    var = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    y = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    s = scores.gaussian_scores(mean, var, y)
    nll = [0.5 * math.log(2 * math.pi * v) + 0.5 * (t - m) ** 2 / v
           for m, v, t in zip([0, 1, 2], [1, 4, 0.25], [0.5, 1, 4])]  # fmt: skip
    assert s["nll"] == pytest.approx(sum(nll) / 3, rel=1e-12)
    assert s["rmse"] == pytest.approx(math.sqrt((0.25 + 0 + 4) / 3), rel=1e-12)
    assert s["coverage"] == pytest.approx(2 / 3)  # |4 − 2| = 2 > 1.96 · 0.5


def test_classification_scores_by_hand(scores):
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 1])
    s = scores.classification_scores(probs, y)
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["nll"] == pytest.approx(
        -(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4
    )
    # bins (k/15, (k+1)/15]: 0.6 and 0.7 fall in bins 8 and 10, 0.8 in 11, 0.9 in 13: one point each
    ece = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(1 - 0.8)) / 4
    assert s["ece"] == pytest.approx(ece, rel=1e-12)


def test_count_scores_against_scipy(scores):
    stats = pytest.importorskip("scipy.stats")
    rates = torch.tensor([0.5, 3.0, 10.0, 40.0], dtype=torch.float64)
    y = torch.tensor([0.0, 7.0, 10.0, 20.0], dtype=torch.float64)
    s = scores.count_scores(rates, y)
    lam, t = rates.numpy(), y.numpy()
    assert s["nll"] == pytest.approx(float(-stats.poisson.logpmf(t, lam).mean()), rel=1e-10)
    lo, hi = stats.poisson.ppf(0.025, lam), stats.poisson.ppf(0.975, lam)
    assert s["coverage"] == pytest.approx(float(((t >= lo) & (t <= hi)).mean()))
    assert s["rmse"] == pytest.approx(float(((lam - t) ** 2).mean() ** 0.5), rel=1e-12)


def test_paired_rule_by_hand(scores):
    # d = (−1, −1, −1.5): mean −7/6, paired se = sd(d)/√3 = 1/6 → a win
    mean, se = scores.paired_difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.5])
    assert mean == pytest.approx(-7 / 6) and se == pytest.approx(1 / 6)
    assert scores.paired_outcome([1.0, 2.0, 3.0], [2.0, 3.0, 4.5]) == "win"
    assert scores.paired_outcome([2.0, 3.0, 4.5], [1.0, 2.0, 3.0]) == "loss"
    # d = (−0.1, 0.1, 0): mean 0 within one se → a tie
    assert scores.paired_outcome([1.0, 2.0, 3.0], [1.1, 1.9, 3.0]) == "tie"
