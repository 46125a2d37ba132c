"""The record of one fit: the loss curve, why it stopped, and the fitted values.

``losses[k]`` is the loss at the parameters after ``k`` updates, so ``losses[-1]`` is the loss
at the values the model holds when :func:`~pyro_ntk.infer.fit` returns and ``steps ==
len(losses)`` (a step evaluates the loss and its gradient, checks the stopping rule, and
updates unless it stops). Building one costs nothing beyond the copies of the final values.

Example:
    >>> import torch
    >>> r = FitResult([3.0, 2.0, 1.9], 3, True, "converged", {"noise": torch.tensor(0.1)},
    ...               0.01, "lbfgs")
    >>> r.loss, r.steps
    (1.9, 3)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["FitResult"]


def format_value(value: Tensor, width: int = 4) -> str:
    """A short text for a fitted value: the number for a scalar, a few entries otherwise."""
    flat = value.detach().reshape(-1).tolist()
    if value.dim() == 0:
        return f"{flat[0]:.4g}"
    shown = ", ".join(f"{v:.4g}" for v in flat[:width])
    more = ", ..." if len(flat) > width else ""
    return f"[{shown}{more}] (shape {tuple(value.shape)})"


@dataclass(frozen=True)
class FitResult:
    """What :func:`~pyro_ntk.infer.fit` did.

    Attributes:
        losses: the loss at every step (``losses[k]`` after ``k`` updates; the last entry is
            the loss at the returned values).
        steps: the number of steps, ``len(losses)``.
        converged: whether the stopping rule was met (``False``: step cap, a stalled line
            search or a non-finite loss; :func:`~pyro_ntk.infer.fit` then warned).
        reason: why it stopped, with the figures of the rule.
        hyperparameters: the final constrained values, by parameter (site) name.
        seconds: wall-clock time of the fit.
        method: ``"lbfgs"`` or ``"adam"``.
    """

    losses: list[float]
    steps: int
    converged: bool
    reason: str
    hyperparameters: dict[str, Tensor]
    seconds: float
    method: str

    @property
    def loss(self) -> float:
        """The loss at the returned values, ``losses[-1]`` (``nan`` when there is none)."""
        return self.losses[-1] if self.losses else float("nan")

    def summary(self) -> str:
        """A few lines: method, steps, time, first and last loss, the reason, the values."""
        state = "converged" if self.converged else "NOT converged"
        first = f"{self.losses[0]:.6g} -> " if self.losses else ""
        lines = [
            f"fit ({self.method}): {state} after {self.steps} steps in {self.seconds:.3g} s, "
            f"loss {first}{self.loss:.6g}",
            f"  {self.reason}",
        ]
        lines += [f"  {k} = {format_value(v)}" for k, v in self.hyperparameters.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={format_value(v, 3)}" for k, v in self.hyperparameters.items())
        return (
            f"FitResult(method={self.method!r}, converged={self.converged}, steps={self.steps}, "
            f"loss={self.loss:.6g}, seconds={self.seconds:.3g}, hyperparameters={{{values}}})"
        )
