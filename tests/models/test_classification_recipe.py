"""The function-space recipe: EmpiricalNTK in Pyro's VariationalGP / VariationalSparseGP."""

from __future__ import annotations

import pytest
import torch
from networks import assert_unchanged, snapshot
from pyro.contrib.gp.util import train
from torch import nn

from pyro_ntk.models.classification import gp_class_probabilities, ntk_gp_classifier


def _blobs(n, num_classes, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = 2.5 * torch.stack(
        [torch.tensor([torch.cos(a), torch.sin(a)]) for a in torch.arange(num_classes) * 2.1]
    )
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return centres[y] + 0.6 * torch.randn(n, 2, generator=gen), y


def _weak_network(O):
    """A barely trained network: its own predictions are poor, so the GP must do the work."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, O))


@pytest.mark.parametrize("num_classes, sparse", [(2, False), (3, False), (3, True)])
def test_recipe_trains_and_predicts(num_classes, sparse):
    O = 1 if num_classes == 2 else num_classes
    net = _weak_network(O)
    before = snapshot(net)
    X, y = _blobs(40, num_classes, seed=0)
    Xtest, ytest = _blobs(200, num_classes, seed=1)
    Xu = X[:12] if sparse else None
    gpc = ntk_gp_classifier(net, X, y, Xu=Xu, variance=1.0)
    names = {n for n, _ in gpc.named_parameters()}
    assert not any(n.startswith("kernel.net") or "weight" in n for n in names)
    losses = train(gpc, torch.optim.Adam(gpc.parameters(), lr=0.1), num_steps=25)
    assert losses[-1] < losses[0]
    probs = gp_class_probabilities(gpc, Xtest)
    if O == 1:
        assert probs.shape == (200,)
        pred = (probs > 0.5).long()
    else:
        assert probs.shape == (200, num_classes)
        torch.testing.assert_close(probs.sum(-1), torch.ones(200))
        pred = probs.argmax(-1)
    accuracy = (pred == ytest).double().mean()
    assert accuracy > 0.85, accuracy
    assert_unchanged(net, before)


def test_recipe_rejects_bad_labels():
    net = _weak_network(3)
    X = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"range over \[0, 3\], outside \[0, 2\]"):
        ntk_gp_classifier(net, X, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        ntk_gp_classifier(net, X, torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[-1, 1\]"):
        ntk_gp_classifier(_weak_network(1), X, torch.tensor([0.0, 1.0, -1.0, 1.0, 0.0]))
