"""Smoke tests of ``python -m pyro_ntk demo --task digits`` at tiny sizes, and its pieces."""

from __future__ import annotations

import math

import pytest
import torch
from networks import assert_unchanged, snapshot

from pyro_ntk.__main__ import main
from pyro_ntk.adaptation import head_prior_mean
from pyro_ntk.demo import (
    DemoConfig,
    classification_scores,
    format_table,
    load_task,
    run_demo,
    source_network,
)
from pyro_ntk.demo.classification import (
    fine_tune_classifier,
    laplace_classifier,
    last_layer_classifier,
    rbf_gp_classifier,
    tempered_laplace_classifier,
)

pytest.importorskip("sklearn")

METHODS = [
    "NTK / lin. Laplace (pyro_ntk)",
    "NTK / tempered Laplace (pyro_ntk)",
    "fine-tuning",
    "last layer retrained",
    "RBF GP (pyro.contrib.gp)",
]


def tiny(tmp_path, **kw) -> DemoConfig:
    sizes = dict(
        task="digits",
        num_target=2,
        source_steps=20,
        finetune_steps=5,
        progress=False,
        plot=False,
        out_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
    )
    sizes.update(kw)
    return DemoConfig(**sizes)


def _reference_ece(probs, y, bins=15):
    """Calibration error by a plain loop over the examples (independent of the vectorized one)."""
    total = [0.0] * bins
    hits = [0.0] * bins
    count = [0] * bins
    for p, label in zip(probs.tolist(), y.tolist()):
        conf = max(p)
        b = min(int(conf * bins), bins - 1)
        total[b] += conf
        hits[b] += float(p.index(conf) == label)
        count[b] += 1
    n = len(y)
    return sum(abs(hits[b] - total[b]) / n for b in range(bins) if count[b])


def test_classification_scores_match_references():
    probs = torch.softmax(3 * torch.randn(200, 5), -1)
    y = torch.randint(0, 5, (200,))
    acc, nll, ece = classification_scores(probs, y)
    assert math.isclose(acc, sum(int(p.argmax() == t) for p, t in zip(probs, y)) / 200)
    cat = torch.distributions.Categorical(probs=probs)
    assert math.isclose(nll, float(-cat.log_prob(y).mean()), rel_tol=1e-12)
    assert math.isclose(ece, _reference_ece(probs, y), abs_tol=1e-12)
    # a perfectly confident, always right classifier is perfectly calibrated
    onehot = torch.nn.functional.one_hot(y, 5).to(torch.float64)
    assert classification_scores(onehot, y) == (1.0, 0.0, 0.0)


def test_digits_transfer_split():
    from sklearn.datasets import load_digits

    from pyro_ntk.datasets import digits_transfer

    d = digits_transfer(3, seed=1)
    X, y = load_digits(return_X_y=True)
    assert d.X_source.shape == (int((y < 5).sum()), 1, 8, 8)
    assert (
        d.X_target.shape == (15, 1, 8, 8)
        and d.y_target.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    )
    assert d.X_test.shape[0] == int((y >= 5).sum()) - 15
    assert d.X_source.dtype == torch.get_default_dtype() and d.y_test.dtype == torch.int64
    assert 0 <= float(d.X_source.min()) and float(d.X_source.max()) <= 1
    assert torch.bincount(d.y_test, minlength=5).tolist() == [
        int((y == c).sum()) - 3 for c in range(5, 10)
    ]
    # adaptation and test images are disjoint rows of the original table
    rows = {tuple(r) for r in (X[y >= 5] / 16.0).tolist()}
    flat_t = [tuple(r) for r in d.X_target.flatten(1).tolist()]
    flat_s = {tuple(r) for r in d.X_test.flatten(1).tolist()}
    assert set(flat_t) <= rows and not (set(flat_t) & flat_s)
    # deterministic in the seed, different across seeds
    assert torch.equal(digits_transfer(3, seed=1).X_target, d.X_target)
    assert not torch.equal(digits_transfer(3, seed=2).X_target, d.X_target)
    with pytest.raises(ValueError, match="digits_transfer: k must be below"):
        digits_transfer(500)
    with pytest.raises(ValueError, match="k"):
        digits_transfer(0)


def test_demo_digits_runs_plots_and_caches(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = run_demo(tiny(tmp_path, plot=True))
    printed = capsys.readouterr().out
    n_test = out["data"].X_test.shape[0]
    assert [r.method for r in out["results"]] == METHODS
    for r in out["results"]:
        assert 0 <= r.accuracy <= 1 and math.isfinite(r.nll) and 0 <= r.ece <= 1
        assert r.probs.shape == (n_test, 5)
        assert torch.allclose(r.probs.sum(-1), r.probs.new_ones(n_test))
        assert r.method in printed
    header = out["table"].splitlines()[0].split()
    assert header == ["method", "accuracy", "NLL", "ECE", "seconds"]
    assert "RMSE" not in printed
    assert "source network trained" in printed and "cached in" in printed
    assert "tempered Laplace: T = " in printed and "by 2-fold cross-validation" in printed
    assert out["figure"].name == "demo_digits.png" and out["figure"].stat().st_size > 1000

    again = run_demo(tiny(tmp_path))
    assert "loaded from" in capsys.readouterr().out
    for a, b in zip(out["results"], again["results"]):
        assert (a.accuracy, a.nll, a.ece) == pytest.approx((b.accuracy, b.nll, b.ece))


def test_digits_adaptation_never_modifies_the_source_network(tmp_path):
    cfg = tiny(tmp_path, cache_dir="")
    data = load_task(cfg)
    net, _ = source_network(cfg, data, torch.device("cpu"))
    before = snapshot(net)
    last, start = last_layer_classifier(net, data, cfg)
    start_before = snapshot(start.network)
    _, la = laplace_classifier(start, data, cfg)
    tempered_laplace_classifier(net, la, 0.0, data, cfg)  # refits a head per fold on copies of net
    fine_tune_classifier(start, data, cfg)
    rbf_gp_classifier(data, cfg)
    assert_unchanged(net, before)
    assert_unchanged(start.network, start_before)
    # the NTK method linearizes the dense layers; its prior is centred at the source
    # weights there and at a zero new head
    dense = [m for m in start.network if isinstance(m, torch.nn.Linear)]
    assert la.lin.space.names == [f"{i}.{p}" for i in (5, 7) for p in ("weight", "bias")]
    head = dense[-1]
    expected = torch.cat(
        [torch.zeros(sum(p.numel() for p in dense[0].parameters()))]
        + [-p.detach().reshape(-1) for p in head.parameters()]
    )
    assert torch.equal(head_prior_mean(la.lin), expected)
    # the new head is not the source head (new classes), the body is the source body
    assert not torch.equal(head.weight, net[-1].weight)
    assert torch.equal(start.network[0].weight, net[0].weight)


def test_format_table_columns_by_kind(tmp_path):
    from pyro_ntk.demo import ClassificationResult, Result

    cls = ClassificationResult("m", 0.5, 0.7, 0.1, 1.0, torch.ones(2, 2) / 2)
    reg = Result("m", 0.5, 0.7, 0.9, 1.0, torch.zeros(2), torch.ones(2))
    assert format_table([cls]).splitlines()[0].split() == [
        "method",
        "accuracy",
        "NLL",
        "ECE",
        "seconds",
    ]
    assert format_table([reg]).splitlines()[0].split()[1:3] == ["RMSE", "NLL"]


def test_cli_digits_help_and_bad_k(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--help"])
    assert err.value.code == 0
    assert "digits" in capsys.readouterr().out

    args = ["demo", "--task", "digits", "--num-target", "1", "--source-steps", "10"]
    args += ["--finetune-steps", "3", "--no-progress", "--no-plot"]
    args += ["--cache-dir", "", "--out-dir", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "NTK / lin. Laplace (pyro_ntk)" in printed and "ECE" in printed
    assert "T = 1 (one image per class: nothing to cross-validate)" in printed

    with pytest.raises(SystemExit) as err:
        main(["demo", "--task", "digits", "--num-target", "500", "--no-progress"])
    assert err.value.code == 2
    assert "images per class" in capsys.readouterr().err
