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
    assert "NTK-GP (SVI)" in printed and "fine-tuning" in printed


def test_digits_transfer_smoke(tmp_path, capsys):
    digits_transfer = load("digits_transfer")
    out = digits_transfer.main(smoke_test=True, out_dir=str(tmp_path))
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    for accuracy, nll, ece, seconds in out["table"].values():
        assert 0 <= accuracy <= 1 and math.isfinite(nll) and 0 <= ece <= 1 and seconds > 0
    printed = capsys.readouterr().out
    assert "lin. Laplace" in printed and "fine-tuning" in printed
