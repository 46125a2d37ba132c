r"""The loss that :func:`~pyro_ntk.infer.fit` minimises, built on Pyro's own ELBOs.

.. math::

    L(\phi) = -\mathrm{ELBO}(\phi)
      = \mathbb E_{q_\phi(z)}\big[\log q_\phi(z) - \log p_\phi(y, z)\big],

``TraceMeanField_ELBO().differentiable_loss(model.model, model.guide)`` for a
``pyro.contrib.gp`` model (what :func:`pyro.contrib.gp.util.train` minimises) and
``Trace_ELBO().differentiable_loss(model, guide, *args, **kwargs)`` for a Pyro model with a
guide. When neither the guide nor the model (replayed against it) has a latent sample site,
``z`` is empty and ``L = −log p(y)`` is the exact negative (log) marginal likelihood:
deterministic, so L-BFGS applies. The parameters are those of every ``param`` site (captured
as :class:`pyro.infer.SVI` does, their unconstrained tensors) and of the model and guide when
they are modules. Cost: one model and guide evaluation per loss.

Example:
    >>> import pyro.contrib.gp as gp, torch
    >>> X = torch.linspace(0, 1, 5).unsqueeze(-1)
    >>> obj = Objective(gp.models.GPRegression(X, X.squeeze(-1), gp.kernels.RBF(1)), (), {}, None)
    >>> obj.latent_sites(), sorted(obj.capture()[1])
    ([], ['kernel.lengthscale', 'kernel.variance', 'noise'])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.contrib.gp.models.model import GPModel
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor, nn

__all__ = ["Objective", "describe"]


def describe(obj: object) -> str:
    """A name for messages: the class of a module, the qualified name of a function.

    A function defined inside another is named by its own name (``model``, not
    ``main.<locals>.model``).
    """
    if isinstance(obj, nn.Module):
        return type(obj).__name__
    self_ = getattr(obj, "__self__", None)
    if self_ is not None and hasattr(obj, "__name__"):
        return f"{type(self_).__name__}.{obj.__name__}"
    qualname = getattr(obj, "__qualname__", None)
    if qualname and "<locals>" not in qualname:
        return qualname
    return getattr(obj, "__name__", None) or qualname or repr(obj)


def _unconstrained(value: Tensor) -> Tensor:
    ref = getattr(value, "unconstrained", None)
    return ref() if callable(ref) else value


class Objective:
    """The ELBO of a Pyro model and guide (module docstring), with the checks ``fit`` needs.

    Args:
        model: a ``pyro.contrib.gp`` model (its ``model``/``guide`` methods take no
            arguments), or a Pyro model callable (or ``PyroModule``).
        args, kwargs: passed to model and guide (plain models only).
        guide: the guide of a plain model (required); ``None`` for a ``pyro.contrib.gp`` model.
    """

    def __init__(self, model: Any, args: tuple, kwargs: dict, guide: Any):
        self.name = describe(model)
        if isinstance(model, GPModel):
            if args or kwargs:
                raise ValueError(
                    f"fit: {self.name} is a pyro.contrib.gp model, whose model() and guide() "
                    f"take no arguments (set its data with set_data); got {len(args)} positional "
                    f"and {sorted(kwargs)} keyword argument(s)."
                )
            if guide is not None:
                raise ValueError(
                    f"fit: {self.name} is a pyro.contrib.gp model and fits with its own guide "
                    f"({self.name}.guide; priors via autoguide()); got guide={describe(guide)}."
                )
            self.model_fn: Callable = model.model
            self.guide_fn: Callable = model.guide
            self.elbo = TraceMeanField_ELBO()
        else:
            if not callable(model):
                raise TypeError(
                    "fit: model must be a pyro.contrib.gp model, a Pyro model callable with a "
                    f"guide, or a LinearizedLaplace; got {type(model).__name__}."
                )
            if guide is None or not callable(guide):
                raise ValueError(
                    f"fit: {self.name} is a plain Pyro model: pass its guide, e.g. "
                    f"guide=pyro.infer.autoguide.AutoNormal({self.name}); got guide={guide!r}."
                )
            self.model_fn, self.guide_fn = model, guide
            self.elbo = Trace_ELBO()
        self.model, self.guide = model, guide
        self.args, self.kwargs = args, kwargs
        self.modules = [m for m in (model, guide) if isinstance(m, nn.Module)]
        self.excluded: set[int] = set()

    # ------------------------------------------------------------------ the loss
    def loss(self) -> Tensor:
        """``−ELBO`` (a scalar tensor, differentiable in the parameters)."""
        return self.elbo.differentiable_loss(
            self.model_fn, self.guide_fn, *self.args, **self.kwargs
        )

    def capture(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and every ``param`` site's constrained value, by site name."""
        with poutine.trace(param_only=True) as capture:
            loss = self.loss()
        sites = {
            name: site["value"]
            for name, site in capture.trace.nodes.items()
            if site["type"] == "param"
        }
        return loss, sites

    def parameters(self, sites: dict[str, Tensor]) -> list[Tensor]:
        """The tensors to optimise: the sites' unconstrained values and the modules' parameters."""
        found: dict[int, Tensor] = {}
        for value in sites.values():
            u = _unconstrained(value)
            found.setdefault(id(u), u)
        for module in self.modules:
            for p in module.parameters():
                found.setdefault(id(p), p)
        return [p for i, p in found.items() if p.requires_grad and i not in self.excluded]

    def hyperparameters(self) -> dict[str, Tensor]:
        """The final constrained values of the ``param`` sites, detached copies."""
        with torch.no_grad():
            _, sites = self.capture()
        return {name: value.detach().clone() for name, value in sites.items()}

    # ------------------------------------------------------------------ traces
    def _traces(self) -> tuple:
        guide_tr = poutine.trace(self.guide_fn).get_trace(*self.args, **self.kwargs)
        replayed = poutine.replay(self.model_fn, trace=guide_tr)
        model_tr = poutine.trace(replayed).get_trace(*self.args, **self.kwargs)
        return guide_tr, model_tr

    def latent_sites(self) -> list[str]:
        """The unobserved sample sites of the guide and the model (subsampling plates included)."""
        with torch.no_grad():
            traces = self._traces()
        names: list[str] = []
        for tr in traces:
            for name, site in tr.nodes.items():
                if site["type"] == "sample" and not site["is_observed"] and name not in names:
                    names.append(name)
        return names

    def non_finite_sites(self) -> list[str]:
        """Sites whose log-probability (sample sites) or value (param sites) is not finite."""
        with torch.no_grad():
            traces = self._traces()
        bad: list[str] = []
        for tr, where in zip(traces, ("guide", "model"), strict=True):
            for name, site in tr.nodes.items():
                if site["type"] == "sample":
                    try:
                        lp = site["fn"].log_prob(site["value"])
                    except (ValueError, RuntimeError) as err:
                        bad.append(f"{where} site {name!r} (log_prob raised {err})")
                        continue
                    if not bool(torch.isfinite(lp).all()):
                        bad.append(f"{where} site {name!r} (log_prob {_short(lp)})")
                elif site["type"] == "param" and not bool(torch.isfinite(site["value"]).all()):
                    bad.append(f"param site {name!r} (value {_short(site['value'])})")
        return bad


def _short(t: Tensor) -> str:
    t = t.detach()
    if t.numel() == 1:
        return f"{float(t):.4g}"
    finite = torch.isfinite(t)
    return f"non-finite in {int((~finite).sum())} of {t.numel()} entries"
