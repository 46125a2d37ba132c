"""The sine task family: determinism, ranges, noise level and bad input."""

import math

import pytest
import torch

from pyro_ntk.datasets import SineTask, sample_sine_tasks


def test_tasks_are_deterministic_and_in_range():
    a = sample_sine_tasks(200, seed=3)
    b = sample_sine_tasks(200, seed=3)
    assert a == b
    assert a != sample_sine_tasks(200, seed=4)
    A = torch.tensor([t.amplitude for t in a])
    phi = torch.tensor([t.phase for t in a])
    assert A.min() >= 0.1 and A.max() <= 5.0 and phi.min() >= 0 and phi.max() <= math.pi
    # roughly uniform: the sample means are near the interval midpoints (4 standard errors)
    assert abs(float(A.mean()) - 2.55) <= 4 * 4.9 / math.sqrt(12 * 200)
    assert abs(float(phi.mean()) - math.pi / 2) <= 4 * math.pi / math.sqrt(12 * 200)


def test_sample_values_and_noise():
    task = SineTask(amplitude=2.0, phase=0.5, noise=0.1)
    X, y = task.sample(4000, seed=0)
    X2, y2 = task.sample(4000, seed=0)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert X.shape == (4000, 1) and y.shape == (4000,) and X.dtype == torch.get_default_dtype()
    assert X.min() >= -5 and X.max() <= 5
    resid = y - 2.0 * torch.sin(X[:, 0] + 0.5)
    torch.testing.assert_close(resid, y - task(X))
    sd = float(resid.std())
    assert abs(sd - 0.2) <= 4 * 0.2 / math.sqrt(2 * 4000)
    Xf, _ = task.sample(3, seed=0, dtype=torch.float32)
    assert Xf.dtype == torch.float32


def test_bad_input():
    with pytest.raises(ValueError, match="amplitude must be > 0"):
        SineTask(amplitude=0.0, phase=0.0)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        SineTask(amplitude=1.0, phase=0.0, noise=-1.0)
    with pytest.raises((ValueError, TypeError), match="num_tasks"):
        sample_sine_tasks(0, seed=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        sample_sine_tasks(2, seed=1.5)


def test_k_shot_split_partitions_the_indices():
    from pyro_ntk.datasets import k_shot_split

    labels = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(3))
    labels[:4] = torch.arange(4)  # every class present
    train, test = k_shot_split(labels, 2, seed=5)
    # k per class, class by class; train and test partition 0..n-1; test in increasing order
    assert labels[train].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(train.tolist() + test.tolist()) == list(range(60))
    assert test.tolist() == sorted(test.tolist())
    # deterministic in the seed, different across seeds; a short class gives all it has
    assert torch.equal(k_shot_split(labels, 2, seed=5)[0], train)
    assert not torch.equal(k_shot_split(labels, 2, seed=6)[0], train)
    few = torch.tensor([0, 0, 0, 1])
    assert sorted(few[k_shot_split(few, 2, seed=0)[0]].tolist()) == [0, 0, 1]
    assert k_shot_split(labels, 1, seed=0, num_classes=6)[0].numel() == 4
    with pytest.raises(ValueError, match="k_shot_split: k"):
        k_shot_split(labels, 0)
    with pytest.raises(TypeError, match="k_shot_split: labels"):
        k_shot_split(labels.double(), 1)
