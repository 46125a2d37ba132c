r"""The stopping rule of :func:`~pyro_ntk.infer.fit`, and each method's defaults.

A fit has converged when both

.. math::

    \frac{\Delta}{\max(1, |\bar L|)} \le \mathrm{rtol}
    \qquad\text{and}\qquad
    \|\bar g\|_2 \le \mathrm{gtol}\cdot\max(1, |\bar L|),

with :math:`\bar g` the gradient of the loss with respect to the *unconstrained* parameters
(``log s²``, ``log σ²``, ...). Both tolerances are relative to the loss's scale, so
multiplying the loss by a constant leaves the rule unchanged.

* **Deterministic loss (L-BFGS, ``window = 1``):** :math:`\Delta = |L_{k-1} - L_k|`, the
  change between consecutive iterates, :math:`\bar L = L_k` and :math:`\bar g = g_k`. (When
  the line search can no longer lower the loss, :func:`~pyro_ntk.infer.loops.run_lbfgs`
  stops and accepts ``‖g‖ ≤ sqrt(gtol)·max(1, |L|)``.)
* **Noisy ELBO (Adam, ``window = w``):** the losses are averaged over blocks of ``w`` steps;
  :math:`\Delta` is how much the best block mean of the last ``patience`` blocks improves on
  the best block mean before them (0 when it does not), :math:`\bar L` the last block mean:
  the ELBO has *stopped improving* at the resolution of its Monte Carlo noise. The gradient
  of a Monte Carlo ELBO does not vanish at the optimum, so Adam's default ``gtol`` is ``inf``
  (off); given one, :math:`\bar g` is an exponential average of the gradients with memory
  ``w`` (``β = 1 − 1/w``).

Cost: ``O(1)`` per check (``O(#steps)`` at a block boundary).

Example:
    >>> rule = StoppingRule(rtol=1e-6, gtol=1e-4, max_steps=100)
    >>> rule.check([10.0, 8.0], grad_norm=1.0)
    (False, 0.25)
    >>> rule.check([8.0, 8.0 - 1e-7], grad_norm=1e-4)
    (True, 1.25...e-08)
    >>> noisy = StoppingRule(rtol=1e-3, gtol=math.inf, max_steps=1000, window=2, patience=2)
    >>> noisy.check([9.0, 7.0, 5.0, 6.0, 6.0, 5.0], grad_norm=3.0)  # blocks 8, 5.5, 5.5
    (False, 0.4545...)
    >>> noisy.check([9.0, 7.0, 5.0, 6.0, 6.0, 5.0, 6.0, 5.0], grad_norm=3.0)  # 8, 5.5, 5.5, 5.5
    (True, 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULTS", "Defaults", "StoppingRule", "make_rule"]


@dataclass(frozen=True)
class Defaults:
    """One method's defaults: step size, step cap, tolerances and the averaging blocks."""

    lr: float
    max_steps: int
    rtol: float
    gtol: float
    window: int = 1
    patience: int = 1


#: The defaults of each method (``"laplace"``: rounds of
#: :meth:`~pyro_ntk.LinearizedLaplace.optimize_prior`, which stop on ``rtol`` alone).
DEFAULTS = {
    "lbfgs": Defaults(lr=1.0, max_steps=500, rtol=1e-9, gtol=1e-5),
    "adam": Defaults(lr=0.02, max_steps=5000, rtol=1e-3, gtol=math.inf, window=50, patience=4),
    "laplace": Defaults(lr=0.1, max_steps=20, rtol=1e-6, gtol=math.inf),
}


@dataclass(frozen=True)
class StoppingRule:
    """Relative loss change ≤ ``rtol`` and gradient norm ≤ ``gtol`` (module docstring)."""

    rtol: float
    gtol: float
    max_steps: int
    window: int = 1
    patience: int = 1

    def _block_means(self, losses: list[float]) -> list[float]:
        w = self.window
        return [sum(losses[i * w : (i + 1) * w]) / w for i in range(len(losses) // w)]

    def relative_change(self, losses: list[float]) -> float | None:
        """``Δ / max(1, |L̄|)`` (module docstring); ``None`` when not yet defined.

        With blocks it is defined at block boundaries once ``patience + 1`` blocks are done.
        """
        if self.window == 1:
            if len(losses) < 2:
                return None
            return abs(losses[-2] - losses[-1]) / max(1.0, abs(losses[-1]))
        if len(losses) % self.window or len(losses) < (self.patience + 1) * self.window:
            return None
        means = self._block_means(losses)
        before, recent = min(means[: -self.patience]), min(means[-self.patience :])
        return max(0.0, before - recent) / max(1.0, abs(means[-1]))

    def scale(self, losses: list[float]) -> float:
        """``max(1, |L̄|)``, the loss scale that both tolerances are relative to."""
        w = min(self.window, len(losses))
        return max(1.0, abs(sum(losses[-w:]) / w)) if w else 1.0

    def check(self, losses: list[float], grad_norm: float) -> tuple[bool, float | None]:
        """``(converged, relative change)`` after the latest loss."""
        rel = self.relative_change(losses)
        if rel is None:
            return False, None
        return rel <= self.rtol and grad_norm <= self.gtol * self.scale(losses), rel


def _check_tolerance(name: str, value: float | None, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"fit: {name} must be a number >= 0, got {value!r}.")
    return float(value)


def make_rule(
    method: str, lr: float | None, max_steps: int | None, rtol: float | None, gtol: float | None
) -> tuple[float, StoppingRule]:
    """The step size and stopping rule of ``method`` with the user's overrides, validated."""
    d = DEFAULTS[method]
    if lr is None:
        lr = d.lr
    elif isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise ValueError(f"fit: lr must be a finite number > 0, got {lr!r}.")
    if max_steps is None:
        max_steps = d.max_steps
    elif isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"fit: max_steps must be an integer >= 1, got {max_steps!r}.")
    rule = StoppingRule(
        rtol=_check_tolerance("rtol", rtol, d.rtol),
        gtol=_check_tolerance("gtol", gtol, d.gtol),
        max_steps=max_steps,
        window=d.window,
        patience=d.patience,
    )
    return float(lr), rule
