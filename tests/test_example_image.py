"""Smoke test of examples/image_transfer.py: a ResNet-style CNN end to end, at tiny sizes."""

import math
import pathlib

from example_modules import load_example


def test_image_transfer_smoke(tmp_path):
    image_transfer = load_example("image_transfer")
    # k = 1 (no temperature CV), one draw, one source epoch, 60 test images; main asserts the
    # source network's state is unchanged after every method ran on it
    out = image_transfer.main(quick=True, out_dir=str(tmp_path), progress=False, seeds=1,
                              ks=(1,), epochs=1, test_points=60)  # fmt: skip
    assert pathlib.Path(out["figure"]).stat().st_size > 0
    assert (tmp_path / "image_transfer.txt").stat().st_size > 0
    assert set(out["table"]) == {(1, m) for m in image_transfer.METHODS}
    for accuracy, nll, ece in out["table"].values():
        assert 0 <= accuracy <= 1 and math.isfinite(nll) and 0 <= ece <= 1
