"""cross_validate_temperature: folds, held-out NLL against a hand-written loop, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_ntk import LinearizedLaplace, cross_validate_temperature
from pyro_ntk.laplace import TEMPERATURES, TemperatureCV

TEMPS = (1.0, 0.25, 1e-3)


def _data(O: int, counts=(6, 4, 5), seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, O))
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    y = y[torch.randperm(len(y))]  # classes interleaved, not sorted
    X = torch.randn(len(y), 2) + y[:, None].double()
    return net, X, (y if O > 1 else y.double())


def _fit(net, likelihood):
    def fit(X, y):
        return LinearizedLaplace(net, likelihood, variance=2.0, method="kernel").fit(X, y)

    return fit


def _reference_nll(net, likelihood, X, y, folds):
    """Folds written out by hand (position within class mod folds); a fresh fit per (fold, T)."""
    nll = torch.zeros(len(TEMPS), dtype=torch.float64)
    seen = {}
    fold = torch.empty(len(y), dtype=torch.long)
    for n, label in enumerate(y.long().tolist()):
        fold[n] = seen.get(label, 0) % folds
        seen[label] = seen.get(label, 0) + 1
    for j in range(folds):
        kept, held = fold != j, fold == j
        for i, T in enumerate(TEMPS):
            la = LinearizedLaplace(net, likelihood, variance=2.0, method="kernel", temperature=T)
            p = la.fit(X[kept], y[kept]).predict(X[held])
            yh = y[held].long()
            if likelihood == "categorical":
                p = p[torch.arange(len(yh)), yh]
            else:
                p = torch.where(yh == 1, p, 1 - p)
            nll[i] -= torch.maximum(p, torch.tensor(1e-12)).log().sum()  # the documented floor
    return nll / len(y)


@pytest.mark.parametrize(
    "likelihood, O, counts", [("categorical", 3, (6, 4, 5)), ("bernoulli", 1, (7, 5))]
)
def test_held_out_nll_equals_a_hand_written_cross_validation(likelihood, O, counts):
    net, X, y = _data(O, counts)
    cv = cross_validate_temperature(_fit(net, likelihood), X, y, TEMPS, folds=3)
    assert isinstance(cv, TemperatureCV) and cv.temperatures == TEMPS
    expected = _reference_nll(net, likelihood, X, y, folds=3)
    torch.testing.assert_close(cv.nll, expected, rtol=1e-9, atol=1e-12)
    assert cv.temperature == TEMPS[int(expected.argmin())]


def test_every_fold_holds_out_each_class_in_turn_and_fit_never_sees_it():
    net, X, y = _data(3, (6, 4, 5))
    calls = []

    def fit(Xk, yk):
        calls.append(Xk.clone())
        return _fit(net, "categorical")(Xk, yk)

    cross_validate_temperature(fit, X, y, (1.0,), folds=2)
    assert len(calls) == 2
    held_sets = []
    for Xk in calls:
        kept = {tuple(r.tolist()) for r in Xk}
        held = [n for n in range(len(y)) if tuple(X[n].tolist()) not in kept]
        held_sets.append(set(held))
        # half of every class (the 1st, 3rd, … or 2nd, 4th, … of it) is held out
        for c, size in enumerate((6, 4, 5)):
            assert sum(int(y[n]) == c for n in held) in (size // 2, (size + 1) // 2)
    assert held_sets[0].isdisjoint(held_sets[1])
    assert held_sets[0] | held_sets[1] == set(range(len(y)))


def test_default_candidates_run_from_the_bayes_posterior_down():
    assert TEMPERATURES[0] == 1.0 and len(TEMPERATURES) == 11
    assert all(a / b == 4.0 for a, b in zip(TEMPERATURES, TEMPERATURES[1:]))


def test_bad_input_names_the_argument():
    net, X, y = _data(3, (6, 4, 5))
    fit = _fit(net, "categorical")
    where = "cross_validate_temperature"
    with pytest.raises(ValueError, match=f"{where}: folds must be between 2 and .* \\(4\\), got 5"):
        cross_validate_temperature(fit, X, y, folds=5)
    with pytest.raises(ValueError, match="folds must be between 2"):
        cross_validate_temperature(fit, X, y, folds=1)
    for bad in ((), (1.0, 0.0), (float("nan"),), ("cold",)):
        with pytest.raises(ValueError, match=f"{where}: temperatures must be .*got"):
            cross_validate_temperature(fit, X, y, bad)
    with pytest.raises(ValueError, match=r"y must be \(N,\) = \(15,\) class labels"):
        cross_validate_temperature(fit, X, y[:, None])
    with pytest.raises(
        ValueError, match="y must be .* got shape \\(15,\\) and dtype torch.float64"
    ):
        cross_validate_temperature(fit, X, y.double() + 0.5)
    with pytest.raises(TypeError, match=f"{where}: fit must be a callable"):
        cross_validate_temperature("fit", X, y)
    gaussian = lambda Xk, yk: LinearizedLaplace(net, "gaussian", noise=1.0)  # noqa: E731
    with pytest.raises(TypeError, match="fit must return a LinearizedLaplace with a 'categorical'"):
        cross_validate_temperature(gaussian, X, y, folds=2)
