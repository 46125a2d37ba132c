r"""The optimisation loops of :func:`~pyro_ntk.infer.fit`: L-BFGS and Adam, one step at a time.

Each step evaluates the loss ``L`` and its gradient ``g`` with respect to the unconstrained
parameters, records ``L``, checks the stopping rule (:mod:`pyro_ntk.infer.stopping`), and
unless it stops, updates the parameters:

* **L-BFGS** (``torch.optim.LBFGS``, strong-Wolfe line search, history 10): one iteration per
  step. The loss and gradient at the accepted point of the line search are reused for the
  next step's check (an exact match of the parameters), so a step costs its line search's
  evaluations and nothing more (usually one).
* **Adam** (``torch.optim.Adam``): one stochastic gradient per step.

A non-finite loss or gradient, or a ``ValueError``/``RuntimeError`` raised by the loss (Pyro's
validation of a NaN argument, a failed factorisation), stops the loop and puts the last
parameters whose loss was finite back into the model (their values are copied every step: ``O(P)``).

Example:
    >>> import torch
    >>> x = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    >>> rule = StoppingRule(rtol=1e-12, gtol=1e-8, max_steps=50)
    >>> out = run_lbfgs(lambda: (x - 1).square().sum(), [x], 1.0, rule, progress=False)
    >>> out.converged, round(float(x.detach()), 6)
    (True, 1.0)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from pyro_ntk.infer.stopping import StoppingRule

__all__ = ["LoopOutcome", "close_bar", "run_adam", "run_lbfgs"]


@dataclass(frozen=True)
class LoopOutcome:
    """The losses of a loop, whether it converged, why it stopped, and (if so) what went wrong.

    ``trouble`` is ``None`` when converged; otherwise one of ``"cap"``, ``"stalled"``,
    ``"nan"``, with ``reason`` giving the figures.
    """

    losses: list[float]
    converged: bool
    reason: str
    trouble: str | None


def close_bar(bar: tqdm) -> None:
    """Close a progress bar, shown as complete (the step cap is only an upper bound)."""
    if not bar.disable:
        bar.total = bar.n
        bar.refresh()
    bar.close()


def _flat_grad(params: list[Tensor]) -> Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )


class _Tracker:
    """Records losses, keeps the last finite values, drives the progress bar."""

    def __init__(self, params: list[Tensor], rule: StoppingRule, progress: bool, desc: str):
        self.params, self.rule, self.losses = params, rule, []
        self.saved: list[Tensor] | None = None
        self.bar = tqdm(total=rule.max_steps, desc=desc, disable=not progress, dynamic_ncols=True)

    def record(self, loss: float) -> None:
        self.losses.append(loss)
        self.saved = [p.detach().clone() for p in self.params]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.6g}", refresh=False)

    def restore(self) -> None:
        if self.saved is not None:
            with torch.no_grad():
                for p, s in zip(self.params, self.saved, strict=True):
                    p.copy_(s)

    def figures(self, rel: float | None, gnorm: float) -> str:
        rule, scale = self.rule, self.rule.scale(self.losses)
        rel_text = "n/a" if rel is None else f"{rel:.3g}"
        if rule.window == 1:
            change = f"relative loss change {rel_text}"
        else:
            change = (
                f"relative improvement {rel_text} of the best {rule.window}-step mean loss over "
                f"the last {rule.window * rule.patience} steps"
            )
        limit = "off" if math.isinf(rule.gtol) else f"gtol·max(1, |loss|) = {rule.gtol * scale:.3g}"
        return (
            f"{change} (rtol {rule.rtol:.3g}), gradient norm {gnorm:.3g} ({limit}), "
            f"loss {self.losses[-1]:.8g}"
        )

    def done(self, converged: bool, reason: str, trouble: str | None) -> LoopOutcome:
        close_bar(self.bar)
        return LoopOutcome(list(self.losses), converged, reason, trouble)

    def converged(self, rel: float | None, gnorm: float) -> LoopOutcome:
        n = len(self.losses)
        return self.done(True, f"converged after {n} steps: {self.figures(rel, gnorm)}", None)

    def capped(self, rel: float | None, gnorm: float) -> LoopOutcome:
        reason = (
            f"stopped at the step cap max_steps={self.rule.max_steps}, unconverged: "
            f"{self.figures(rel, gnorm)}"
        )
        return self.done(False, reason, "cap")

    def non_finite(self, what: str, step: int, errors: list[str] | None = None) -> LoopOutcome:
        self.restore()
        cause = f" ({errors[-1]})" if errors else ""
        if self.losses:
            kept = f"the values of step {step - 1} (loss {self.losses[-1]:.8g}) are restored"
        else:
            kept = "no finite values to restore"
        reason = f"the {what} became non-finite at step {step}{cause}; stopped, {kept}"
        return self.done(False, reason, "nan")


def evaluate(loss_fn: Callable[[], Tensor], errors: list[str]) -> Tensor:
    """``loss_fn()``, or a NaN loss when it raises a numerical error (message kept in ``errors``).

    Numerical errors: ``ValueError`` or ``RuntimeError`` (Pyro's validation of a NaN
    argument, a failed factorisation).
    """
    try:
        return loss_fn()
    except (ValueError, RuntimeError) as err:
        errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
        return torch.tensor(math.nan)


class _NonFinite(Exception):
    """A non-finite loss or gradient inside the L-BFGS closure: the step is abandoned."""


class _MemoClosure:
    """The L-BFGS closure: loss and gradients, remembered for the last few parameter points.

    A non-finite loss or gradient raises :class:`_NonFinite` (torch's line search cannot
    continue from one): the fit stops there.
    """

    def __init__(self, loss_fn: Callable[[], Tensor], params: list[Tensor], size: int = 8):
        self.loss_fn, self.params = loss_fn, params
        self.errors: list[str] = []
        self.memo: deque[tuple[Tensor, Tensor, list[Tensor | None]]] = deque(maxlen=size)

    def __call__(self) -> Tensor:
        with torch.no_grad():
            x = torch.cat([p.reshape(-1) for p in self.params])
        for mx, loss, grads in reversed(self.memo):
            if torch.equal(mx, x):
                for p, g in zip(self.params, grads, strict=True):
                    p.grad = None if g is None else g.clone()
                return loss
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = evaluate(self.loss_fn, self.errors)
            if not bool(torch.isfinite(loss)):
                raise _NonFinite("loss")
            if loss.requires_grad:
                loss.backward()
        loss = loss.detach()
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            raise _NonFinite("gradient")
        self.memo.append((x.clone(), loss, grads))
        return loss


def run_lbfgs(
    loss_fn: Callable[[], Tensor],
    params: list[Tensor],
    lr: float,
    rule: StoppingRule,
    *,
    progress: bool = True,
    desc: str = "fit",
    exact_gradient: bool = True,
) -> LoopOutcome:
    """L-BFGS with a strong-Wolfe line search, one iteration per step (module docstring).

    When two steps in a row do not lower the loss, the curvature history is dropped once
    (the next step is steepest descent with a line search); when that happens again the loss is
    at its numerical resolution (rounding, or an ill-conditioned kernel matrix) and the loop
    stops: converged if ``‖g‖ ≤ sqrt(gtol)·max(1, |L|)`` (a quadratic model then predicts a
    remaining relative decrease of at most ``gtol / 2``), ``"stalled"`` otherwise. With
    ``exact_gradient=False`` (a stochastic estimate of the gradient, which does not vanish at
    the optimum) that stop counts as converged: the loss has settled.
    """
    closure = _MemoClosure(loss_fn, params)
    opt = torch.optim.LBFGS(
        params, lr=lr, max_iter=1, max_eval=25, tolerance_grad=0.0, tolerance_change=0.0,
        history_size=10, line_search_fn="strong_wolfe",
    )  # fmt: skip
    run = _Tracker(params, rule, progress, desc)
    stalls, restarted = 0, False
    for step in range(rule.max_steps):
        try:
            loss = float(closure())
        except _NonFinite as err:
            return run.non_finite(str(err), step, closure.errors)
        gnorm = float(_flat_grad(params).norm())
        run.record(loss)
        converged, rel = rule.check(run.losses, gnorm)
        if converged:
            return run.converged(rel, gnorm)
        stalls = stalls + 1 if step > 0 and loss >= run.losses[-2] else 0
        if stalls == 2 and not restarted:  # forget the curvature pairs, go downhill once more
            opt.state.clear()
            restarted, stalls = True, 0
        elif stalls >= 2:
            limit = math.sqrt(rule.gtol) * rule.scale(run.losses)
            resolved = gnorm <= limit
            if not exact_gradient:
                reason = (
                    f"converged after {step + 1} steps: the loss has settled (no lower loss "
                    "found twice in a row, after a restart; the gradient is a stochastic "
                    f"estimate, so gtol does not apply): {run.figures(rel, gnorm)}"
                )
                return run.done(True, reason, None)
            reason = (
                f"{'converged' if resolved else 'stalled'} after {step + 1} steps at the loss's "
                f"numerical resolution (no lower loss found twice in a row, after a restart; "
                f"gradient norm {'within' if resolved else 'above'} sqrt(gtol)·max(1, |loss|) "
                f"= {limit:.3g}): {run.figures(rel, gnorm)}"
            )
            return run.done(resolved, reason, None if resolved else "stalled")
        if step == rule.max_steps - 1:
            return run.capped(rel, gnorm)
        try:
            opt.step(closure)
        except _NonFinite as err:  # in the line search towards step + 1
            return run.non_finite(str(err), step + 1, closure.errors)
    raise AssertionError("unreachable")  # pragma: no cover


def run_adam(
    loss_fn: Callable[[], Tensor],
    params: list[Tensor],
    lr: float,
    rule: StoppingRule,
    *,
    progress: bool = True,
    desc: str = "fit",
) -> LoopOutcome:
    """Adam, one stochastic gradient per step, windowed stopping rule (module docstring).

    The gradient in the rule is an exponential average with ``β = 1 − 1/window``.
    """
    opt = torch.optim.Adam(params, lr=lr)
    run = _Tracker(params, rule, progress, desc)
    errors: list[str] = []
    beta = 1.0 - 1.0 / rule.window
    average: Tensor | None = None
    last_rel: float | None = None
    for step in range(rule.max_steps):
        opt.zero_grad(set_to_none=True)
        loss_t = evaluate(loss_fn, errors)
        loss = float(loss_t.detach())
        if not math.isfinite(loss):
            return run.non_finite("loss", step, errors)
        if loss_t.requires_grad:
            loss_t.backward()
        g = _flat_grad(params)
        if not bool(torch.isfinite(g).all()):
            return run.non_finite("gradient", step)
        run.record(loss)
        average = (
            g.detach().clone() if average is None else average.mul_(beta).add_(g, alpha=1 - beta)
        )
        gnorm = float(average.norm())
        converged, rel = rule.check(run.losses, gnorm)
        last_rel = last_rel if rel is None else rel
        if converged:
            return run.converged(rel, gnorm)
        if step == rule.max_steps - 1:
            return run.capped(last_rel, gnorm)
        opt.step()
    raise AssertionError("unreachable")  # pragma: no cover
