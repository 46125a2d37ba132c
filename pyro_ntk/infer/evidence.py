r"""The Laplace evidence route of :func:`~pyro_ntk.infer.fit`: rounds of ``optimize_prior``.

For a :class:`~pyro_ntk.LinearizedLaplace` the loss is the negative Laplace evidence

.. math:: L(\sigma^2) = -\Big[\log p(y\mid\delta^*) - \tfrac12 (\delta^* - m)^\top D
    (\delta^* - m) - \tfrac12 \log\det(I + S F S)\Big],

maximised over σ² (one or one per layer) by
:meth:`~pyro_ntk.LinearizedLaplace.optimize_prior`, one round per step (``kernel`` route:
L-BFGS on ``log σ²`` with δ* refitted at every σ², ``method = "lbfgs"``; ``dense`` and
``lanczos``: Adam on ``log σ²``, then a refit, ``method = "adam"``). ``losses[0]`` is ``L`` at
the starting σ² (after ``fit(X, y)`` when the model is not fitted yet), ``losses[k]`` after
round ``k``. It stops when the relative change of ``L`` between two rounds is at most ``rtol``
(the inner L-BFGS has its own gradient tolerance, so ``gtol`` does not apply). Cost: a round
is ``num_steps`` evaluations of the evidence and a refit.

Example:
    >>> import torch
    >>> from pyro_ntk import LinearizedLaplace
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> X = torch.randn(20, 2, dtype=torch.float64)
    >>> la = LinearizedLaplace(net.double(), "gaussian", noise=0.1)
    >>> out = run_evidence(la, X, X[:, 0], 0.1, StoppingRule(1e-6, 0.0, 5), progress=False)
    >>> out.losses[-1] <= out.losses[0]
    True
"""

from __future__ import annotations

import math

from torch import Tensor
from tqdm import tqdm

from pyro_ntk.infer.loops import LoopOutcome, close_bar
from pyro_ntk.infer.result import format_value
from pyro_ntk.infer.stopping import StoppingRule
from pyro_ntk.laplace import LinearizedLaplace

__all__ = ["laplace_method", "run_evidence"]


def laplace_method(la: LinearizedLaplace) -> str:
    """``"lbfgs"`` on a fitted Laplace's ``kernel`` route, ``"adam"`` on ``dense``/``lanczos``."""
    return "lbfgs" if la.method_used == "kernel" else "adam"


def run_evidence(
    la: LinearizedLaplace,
    X: Tensor,
    y: Tensor,
    lr: float,
    rule: StoppingRule,
    *,
    progress: bool = True,
    desc: str = "fit",
) -> LoopOutcome:
    """Rounds of ``la.optimize_prior(X, y, rounds=1)`` until the evidence settles (module doc).

    Raises:
        ValueError: the evidence at the starting σ² is not finite.
    """
    if la.delta is None:
        la.fit(X, y)
    start = -float(la.log_marginal_likelihood())
    if not math.isfinite(start):
        raise ValueError(
            f"fit: the negative Laplace evidence of LinearizedLaplace at its starting variance "
            f"{format_value(la.variance)} is {start}; check the data (X, y) and the noise."
        )
    bar = tqdm(total=rule.max_steps, desc=desc, disable=not progress, dynamic_ncols=True)
    losses = [start]
    bar.update(1)
    bar.set_postfix(loss=f"{start:.6g}", refresh=False)
    while True:
        rel = rule.relative_change(losses)
        if rel is not None and rel <= rule.rtol:
            reason = (
                f"converged after {len(losses)} steps: relative change of the negative "
                f"evidence {rel:.3g} (rtol {rule.rtol:.3g}), loss {losses[-1]:.8g}"
            )
            return _close(bar, LoopOutcome(losses, True, reason, None))
        if len(losses) >= rule.max_steps:
            rel_text = "n/a" if rel is None else f"{rel:.3g}"
            reason = (
                f"stopped at the step cap max_steps={rule.max_steps}, unconverged: relative "
                f"change of the negative evidence {rel_text} (rtol {rule.rtol:.3g}), loss "
                f"{losses[-1]:.8g}"
            )
            return _close(bar, LoopOutcome(losses, False, reason, "cap"))
        variance = la.variance.clone()
        evidence = la.optimize_prior(X, y, rounds=1, lr=lr)[-1]
        if not math.isfinite(evidence):
            la.variance = variance
            la.fit(X, y)
            reason = (
                f"the evidence became {evidence} at step {len(losses)}; stopped, the variance "
                f"of step {len(losses) - 1} is restored and the model refitted "
                f"(loss {losses[-1]:.8g})"
            )
            return _close(bar, LoopOutcome(losses, False, reason, "nan"))
        losses.append(-evidence)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.6g}", refresh=False)


def _close(bar: tqdm, outcome: LoopOutcome) -> LoopOutcome:
    close_bar(bar)
    return outcome
