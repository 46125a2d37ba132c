r"""``fit``: hyperparameters by the marginal likelihood or the ELBO, with a stopping rule.

.. math::

    \hat\phi = \arg\min_\phi L(\phi),\qquad
    L = -\log p_\phi(y) \ \text{(exact, L-BFGS)}\quad\text{or}\quad
    L = -\mathrm{ELBO}(\phi) \ \text{(Monte Carlo, Adam)},

over the unconstrained parameters (``log s²``, ``log σ²``, variational parameters, ...),
stopping when the relative change of ``L`` and the gradient norm are both small
(:mod:`pyro_ntk.infer.stopping`). See :func:`fit`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pyro
import torch
from pyro.contrib.gp.models.model import GPModel
from pyro.infer.autoguide import AutoGuide
from torch import Tensor

from pyro_ntk.infer.evidence import laplace_method, run_evidence
from pyro_ntk.infer.gp_models import (
    fixed_inducing_points,
    set_initial_variance,
    warn_fixed_inducing_points,
    warn_noise_on_floor,
)
from pyro_ntk.infer.isolation import isolate, pyro_modules, register
from pyro_ntk.infer.loops import LoopOutcome, run_adam, run_lbfgs
from pyro_ntk.infer.objectives import Objective
from pyro_ntk.infer.result import FitResult, format_value
from pyro_ntk.infer.stopping import make_rule
from pyro_ntk.laplace import LinearizedLaplace

__all__ = ["fit"]

_METHODS = ("auto", "lbfgs", "adam")


def fit(
    model: Any,
    *args: Any,
    guide: Any = None,
    method: str = "auto",
    lr: float | None = None,
    max_steps: int | None = None,
    rtol: float | None = None,
    gtol: float | None = None,
    progress: bool = True,
    desc: str | None = None,
    **kwargs: Any,
) -> FitResult:
    r"""Fit a model's hyperparameters until the loss stops changing, with a progress bar.

    .. math::

        L = -\log p(y) \ \text{(no latent site: L-BFGS)},\qquad
        L = \mathbb E_q[\log q(z) - \log p(y, z)] \ \text{(otherwise: Adam)}.

    **Models.**

    * A ``pyro.contrib.gp`` model (:class:`~pyro_ntk.NTKGPRegression`, ``GPRegression``
      with :class:`~pyro_ntk.EmpiricalNTK` or any Pyro kernel, ``SparseGPRegression``,
      ``VariationalGP``, ``VariationalSparseGP``): ``L =
      TraceMeanField_ELBO().differentiable_loss(model.model, model.guide)``, the loss of
      :func:`pyro.contrib.gp.util.train` (which keeps working unchanged).
    * A Pyro model callable or ``PyroModule`` with ``guide`` (e.g. an autoguide around a
      function that uses :class:`~pyro_ntk.LinearizedModel`): ``L =
      Trace_ELBO().differentiable_loss(model, guide, *args, **kwargs)``; an autoguide is
      set up by one call first.
    * A :class:`~pyro_ntk.LinearizedLaplace` with ``args = (X, y)``: the negative Laplace
      evidence over σ², by rounds of :meth:`~pyro_ntk.LinearizedLaplace.optimize_prior`
      (:mod:`pyro_ntk.infer.evidence`).

    **Method.** ``"auto"`` traces the guide and the model once: when neither has a latent
    (unobserved) sample site, the loss is the exact negative marginal likelihood, which is
    deterministic, and L-BFGS (strong-Wolfe line search) is used; otherwise Adam on the
    ELBO. Defaults (``None`` arguments):

    ========  =====  =========  ======  ======  ===================================
    method    lr     max_steps  rtol    gtol    change measured over
    ========  =====  =========  ======  ======  ===================================
    lbfgs     1.0    500        1e-9    1e-5    consecutive iterates
    adam      0.02   5000       1e-3    off     50-step block means, last 200 steps
    laplace   0.1    20         1e-6    —       rounds of ``optimize_prior``
    ========  =====  =========  ======  ======  ===================================

    **Stopping rule.** Converged when ``Δ / max(1, |L̄|) ≤ rtol`` and ``‖ḡ‖₂ ≤ gtol ·
    max(1, |L̄|)`` (``ḡ``: gradient with respect to the unconstrained parameters; ``Δ``: the
    change of the loss, for Adam the improvement of its best block mean,
    :mod:`pyro_ntk.infer.stopping`). Otherwise it stops at ``max_steps``
    (or when L-BFGS's line search can no longer lower the loss while the gradient is above
    ``sqrt(gtol)·max(1, |L|)``, :func:`~pyro_ntk.infer.loops.run_lbfgs`) and warns
    (``UserWarning``) with the figures: call ``fit`` again to continue from there, or raise
    ``max_steps``. On the CG route of :class:`~pyro_ntk.NTKGPRegression` the gradient of
    the log-determinant is a stochastic (Hutchinson) estimate that does not vanish at the
    optimum: there the fit has also converged when L-BFGS, restarted once, finds no lower
    loss (the loss has settled).

    **Non-finite losses.** A non-finite loss at the start raises a ``ValueError`` naming the
    model and the sites whose log-probability (or value) is not finite. A loss or gradient
    that turns non-finite during the fit stops it, restores the last parameters whose loss
    was finite into the model, and warns with the step and those values.

    **Pyro's global param store** (:mod:`pyro_ntk.infer.isolation`). A ``PyroModule`` reads
    its parameters from the store by name, so a second model with the same names would
    silently start from, and share, the first model's values. ``fit`` removes such foreign
    entries before the first loss (warning with their names and values), so the model
    trains its own values, which the store then holds. It does not run in a private
    ``param_store.scope()``: leaving the scope would restore the foreign entries, and the
    fitted model's next call (its prediction) would read them. Nothing is done when
    ``pyro.settings.get("module_local_params")`` is on (Pyro then keeps parameters local).

    **NTK kernels in Pyro GP models** (:mod:`pyro_ntk.infer.gp_models`). An
    :class:`~pyro_ntk.EmpiricalNTK` built without a variance starts from the data-aware σ²
    of :func:`pyro_ntk.gp.initial_hyperparameters` (Pyro's ``GPRegression`` noise is left as
    it is: its default cannot be told apart from a chosen value). Sparse models with an NTK
    kernel keep their inducing points fixed (warned once per model): the NTK does not
    differentiate through its inputs.

    Args:
        model: the model (see above).
        *args: passed to model and guide (``X, y`` for a ``LinearizedLaplace``; none for a
            ``pyro.contrib.gp`` model, whose data are set on the model).
        guide: the guide of a plain Pyro model (required there); ``None`` otherwise.
        method: ``"auto"``, ``"lbfgs"`` or ``"adam"``.
        lr: step size (``None``: the table).
        max_steps: the step cap (``None``: the table); ``losses`` has at most this many entries.
        rtol: tolerance on the relative change of the loss (``None``: the table).
        gtol: tolerance on the gradient norm, relative to ``max(1, |L|)`` (``None``: the
            table).
        progress: show a tqdm bar with the loss on stderr.
        desc: the bar's label (default ``"fit <model>"``).
        **kwargs: passed to model and guide.

    Returns:
        A :class:`~pyro_ntk.infer.FitResult`; the model holds the fitted values.

    Raises:
        ValueError: nothing to fit, a non-finite starting loss, or a bad argument.

    Cost: per step one loss and gradient (L-BFGS: the line search's evaluations, usually
    one; the first is reused from the previous step), plus one trace of the guide and the
    model at the start.

    Example:
        >>> import torch, pyro_ntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> net, X = net.double(), torch.linspace(-2, 2, 20, dtype=torch.float64).unsqueeze(-1)
        >>> gpr = pyro_ntk.NTKGPRegression(X, torch.sin(2 * X).squeeze(-1), net)
        >>> result = pyro_ntk.fit(gpr, progress=False)
        >>> result.method, result.converged, sorted(result.hyperparameters)
        ('lbfgs', True, ['noise', 'variance'])
    """
    start = time.perf_counter()
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"fit: method must be one of {list(_METHODS)}, got {method!r}.")
    if not isinstance(progress, bool):
        raise TypeError(f"fit: progress must be True or False, got {progress!r}.")
    if desc is not None and not isinstance(desc, str):
        raise TypeError(f"fit: desc must be a string or None, got {type(desc).__name__}.")
    if isinstance(model, LinearizedLaplace):
        return _fit_laplace(model, args, guide, method, lr, max_steps, rtol, gtol, progress,
                            desc, kwargs, start)  # fmt: skip
    objective = Objective(model, args, kwargs, guide)
    name = objective.name
    fixed: list[Tensor] = []
    if isinstance(model, GPModel):
        set_initial_variance(model)
        Xu = fixed_inducing_points(model)
        if Xu is not None:
            warn_fixed_inducing_points(model, name)
            fixed.append(Xu)
    _set_up_autoguide(guide, args, kwargs)
    isolate(pyro_modules(model, guide), name)
    objective.excluded = {id(t) for t in fixed}
    with _frozen(fixed):
        with torch.no_grad():
            loss0, sites = objective.capture()
        if not bool(torch.isfinite(loss0)):
            bad = objective.non_finite_sites()
            where = ", ".join(bad) if bad else "no single site (check the guide's parameters)"
            raise ValueError(
                f"fit: the loss of {name} at its starting values is {float(loss0)}; "
                f"not finite at: {where}."
            )
        params = objective.parameters(sites)
        if not params:
            listed = sorted(sites) if sites else "none"
            raise ValueError(
                f"fit: {name} has nothing to fit: no parameter requires a gradient (param "
                f"sites of the model and guide: {listed}). Give it a PyroParam or "
                "pyro.param, or a guide with parameters."
            )
        if method == "auto":
            method = "adam" if objective.latent_sites() else "lbfgs"
        lr, rule = make_rule(method, lr, max_steps, rtol, gtol)
        label = desc or f"fit {name}"
        if method == "lbfgs":
            exact = getattr(model, "solver", None) != "cg"  # CG + SLQ: an estimated gradient
            outcome = run_lbfgs(objective.loss, params, lr, rule, progress=progress,
                                desc=label, exact_gradient=exact)  # fmt: skip
        else:
            outcome = run_adam(objective.loss, params, lr, rule, progress=progress, desc=label)
    register(pyro_modules(model, guide))
    hyperparameters = objective.hyperparameters()
    _warn(outcome, name, hyperparameters, rule.max_steps)
    if isinstance(model, GPModel):
        warn_noise_on_floor(model, name)
    return FitResult(outcome.losses, len(outcome.losses), outcome.converged, outcome.reason,
                     hyperparameters, time.perf_counter() - start, method)  # fmt: skip


def _fit_laplace(la, args, guide, method, lr, max_steps, rtol, gtol, progress, desc, kwargs,
                 start) -> FitResult:  # fmt: skip
    """The Laplace evidence route (:mod:`pyro_ntk.infer.evidence`)."""
    if len(args) != 2 or kwargs:
        raise ValueError(
            f"fit: a LinearizedLaplace is fitted on its data: fit(la, X, y); got {len(args)} "
            f"positional and {sorted(kwargs)} keyword argument(s)."
        )
    for arg, value in (("guide", guide), ("gtol", gtol)):
        if value is not None:
            raise ValueError(
                f"fit: {arg} does not apply to a LinearizedLaplace (its rounds stop on the "
                f"relative change of the evidence); got {arg}={value!r}."
            )
    X, y = args
    if la.delta is None:
        la.fit(X, y)
    used = laplace_method(la)
    if method not in ("auto", used):
        raise ValueError(
            f"fit: this LinearizedLaplace's {la.method_used!r} route optimises its evidence "
            f"with {used!r}; got method={method!r} (use 'auto')."
        )
    lr, rule = make_rule("laplace", lr, max_steps, rtol, None)
    outcome = run_evidence(la, X, y, lr, rule, progress=progress,
                           desc=desc or "fit LinearizedLaplace")  # fmt: skip
    hyperparameters = {"variance": la.variance.detach().clone()}
    _warn(outcome, "LinearizedLaplace", hyperparameters, rule.max_steps)
    return FitResult(outcome.losses, len(outcome.losses), outcome.converged, outcome.reason,
                     hyperparameters, time.perf_counter() - start, used)  # fmt: skip


def _set_up_autoguide(guide: Any, args: tuple, kwargs: dict) -> None:
    """Call an autoguide once in an empty param store, so it creates its own parameters."""
    if isinstance(guide, AutoGuide) and getattr(guide, "prototype_trace", None) is None:
        if pyro.settings.get("module_local_params"):
            guide(*args, **kwargs)
            return
        with pyro.get_param_store().scope(), torch.no_grad():
            guide(*args, **kwargs)


@contextlib.contextmanager
def _frozen(tensors: list[Tensor]) -> Iterator[None]:
    """``requires_grad`` off for ``tensors`` during the block, then as it was."""
    flags = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(False)
        yield
    finally:
        for t, flag in zip(tensors, flags, strict=True):
            t.requires_grad_(flag)


def _values(hyperparameters: dict[str, Tensor], limit: int = 6) -> str:
    items = list(hyperparameters.items())
    text = ", ".join(f"{k}={format_value(v, 3)}" for k, v in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _warn(outcome: LoopOutcome, name: str, hyperparameters: dict[str, Tensor], cap: int) -> None:
    if outcome.trouble is None:
        return
    if outcome.trouble == "cap":
        advice = (
            f"Call fit({name}) again to continue from these values, or raise max_steps (now {cap})."
        )
    elif outcome.trouble == "stalled":
        advice = (
            "The line search cannot lower the loss along its gradient: the loss is not "
            "smooth there, is at its numerical resolution (float32: use float64), or its "
            "gradient is inexact; the values are the lowest found."
        )
    else:
        advice = f"The model keeps the last finite values: {_values(hyperparameters)}."
    warnings.warn(f"fit: {name}: {outcome.reason}. {advice}", UserWarning, stacklevel=3)
