"""Smoke test of examples/digits_transfer.py: its quick mode, end to end, at reduced budgets."""

import math
import pathlib

import pytest
from example_modules import load_example


def test_digits_transfer_smoke(tmp_path, capsys):
    digits_transfer = load_example("digits_transfer")
    assert digits_transfer.QUICK.ks == (5,) and digits_transfer.QUICK.seeds <= 2
    # quick mode (k = 5) at the smallest budgets, one draw, 120 test images: a few seconds.
    # lin. SVI runs fit with a step budget (10 steps here): fit says it stopped unconverged
    small = dict(seeds=1, source_epochs=1, fine_tune_steps=10, evidence_steps=5, cv_folds=2,
                 svi_steps=10, test_points=120)  # fmt: skip
    with pytest.warns(UserWarning, match="stopped at the step cap max_steps=10, unconverged"):
        out = digits_transfer.main(quick=True, out_dir=str(tmp_path), progress=False, **small)
    assert pathlib.Path(out["figure"]).parent == tmp_path
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    assert set(out["table"]) == {(5, m) for m in digits_transfer.METHODS}
    for accuracy, nll, ece, seconds in out["table"].values():
        assert 0 <= accuracy <= 1 and math.isfinite(nll) and 0 <= ece <= 1 and seconds > 0
    assert all(len(rows) == 1 for rows in out["scores"][5].values())
    assert len(out["temperatures"][5]) == 1
    assert out["temperatures"][5][0] in digits_transfer.TEMPERATURES
    printed = capsys.readouterr().out
    assert "lin. Laplace" in printed and "fine-tuning" in printed
    assert "tempered Laplace" in printed and "T (CV) =" in printed
    assert set(out["wins"]) == {5} and 0 <= out["wins"][5] <= 1
    assert "better than fine-tuning on both NLL and ECE: k=5:" in printed
    assert "lin. SVI: pyro_ntk.fit, Adam (lr 0.02), a budget of 10 steps per draw" in printed


def test_digits_transfer_sizes():
    digits_transfer = load_example("digits_transfer")
    full, quick = digits_transfer.FULL, digits_transfer.QUICK
    assert (full.seeds, full.ks, full.svi_steps, full.cv_folds) == (10, (1, 5, 10), 200, 5)
    # quick mode: fewer draws, the same methods and budgets
    same = ("source_epochs", "fine_tune_steps", "evidence_steps", "cv_folds", "svi_steps")
    assert all(getattr(quick, f) == getattr(full, f) for f in same)
    with pytest.raises(TypeError, match=r"main: unknown size\(s\) \[.seed.\]"):
        digits_transfer.main(quick=True, seed=3)
