r"""Keep Pyro's global parameter store from handing one model's values to another.

**The mechanism.** A ``PyroParam`` attribute of a :class:`~pyro.nn.PyroModule` read inside a
Pyro call (``model.model()``, ``model(X)``, an autoguide) is looked up in the global param
store under its full name (``"noise"``, ``"kernel.variance"``, ``"AutoNormal.locs.delta"``).
If the store already holds a *different* tensor under that name, the module replaces its own
parameter by the store's (``pyro/nn/module.py``, ``PyroModule.__getattr__``). Two models
with the same parameter names therefore share one tensor: the second starts from the first's
values, and training either moves both (an optimiser built from ``model.parameters()``
before that first read even trains an orphan). Pyro documents this sharing; its remedies are
``pyro.clear_param_store()``, ``param_store.scope()`` and
``pyro.settings.set(module_local_params=True)``.

**What fit does.** Before the first loss it lists the ``PyroParam``\ s of the modules it is
given (the model, the guide, a bound method's module, the modules a model function names in
its closure or globals) and compares each with the store's entry of the same name:

* a *different* tensor there (another module's, or a ``pyro.param`` of that name) is removed
  from the store, with a warning naming it: the model then registers, trains and keeps its
  own values, and the store ends up holding them (as after any Pyro call of that model);
* a module whose own parameter *is* a tensor that ``fit`` has seen belonging to another live
  module (the model was called before ``fit`` and the store had already handed it the other
  model's tensor) gets a copy of its own, again with a warning (it starts from the inherited
  values: Pyro has overwritten its initial ones).

A ``fresh param_store.scope()`` alone is not enough: it isolates the optimisation, but on
leaving it the old entry comes back and the next call of the fitted model (its prediction)
would read the *other* model's values. With ``module_local_params=True`` Pyro keeps every
module's parameters local, and nothing here is needed (nothing is done). Cost: ``O(#params)``.

Example:
    >>> import pyro, pyro.contrib.gp as gp, torch
    >>> X = torch.linspace(0, 1, 5).unsqueeze(-1)
    >>> m = gp.models.GPRegression(X, X.squeeze(-1), gp.kernels.RBF(1))
    >>> sorted(owned_parameters(pyro_modules(m)))
    ['kernel.lengthscale', 'kernel.variance', 'noise']
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import pyro
from pyro.nn import PyroModule
from torch import Tensor, nn

from pyro_ntk.infer.result import format_value

__all__ = ["isolate", "owned_parameters", "pyro_modules", "register"]

# id(parameter) -> (weak reference to it, weak reference to the module that owns it)
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _visit(obj: Any, found: dict[int, PyroModule], depth: int) -> None:
    if isinstance(obj, nn.Module):
        for m in obj.modules():
            if isinstance(m, PyroModule):
                found.setdefault(id(m), m)
        return
    if depth > 1:
        return
    owner = getattr(obj, "__self__", None)
    if owner is not None:
        _visit(owner, found, depth + 1)
    fn = getattr(obj, "__func__", obj)
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            _visit(cell.cell_contents, found, depth + 1)
        except ValueError:  # an empty cell
            continue
    namespace = getattr(fn, "__globals__", {})
    for name in code.co_names:
        value = namespace.get(name)
        if isinstance(value, nn.Module):
            _visit(value, found, depth + 1)


def pyro_modules(*objs: Any) -> list[PyroModule]:
    """The PyroModules of ``objs``, their closures' and the globals their code names.

    Modules and submodules, a bound method's module, the modules a function holds in its
    closure or names from its globals.
    """
    found: dict[int, PyroModule] = {}
    for obj in objs:
        if obj is not None:
            _visit(obj, found, 0)
    return list(found.values())


def _fullname(module: PyroModule, name: str) -> str:
    prefix = module.__dict__.get("_pyro_name", "")
    return f"{prefix}.{name}" if prefix else name


def owned_parameters(modules: list[PyroModule]) -> dict[str, tuple[PyroModule, str, Tensor]]:
    """``{store name: (module, attribute, the module's own unconstrained tensor)}``."""
    owned = {}
    for m in modules:
        for name in m.__dict__.get("_pyro_params", {}):
            own = m._parameters.get(name + "_unconstrained")
            if own is not None:
                owned[_fullname(m, name)] = (m, name, own)
    return owned


def _owner(tensor: Tensor) -> nn.Module | None:
    entry = _OWNERS.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    return entry[1]()


def register(modules: list[PyroModule]) -> None:
    """Remember which module owns each of its parameters (for the shared-tensor check)."""
    for _, (m, _, own) in owned_parameters(modules).items():
        _OWNERS[id(own)] = (weakref.ref(own), weakref.ref(m))
    for key in [k for k, (t, m) in _OWNERS.items() if t() is None or m() is None]:
        del _OWNERS[key]


def isolate(modules: list[PyroModule], name: str) -> None:
    """Give ``modules`` their own parameters in Pyro's store (module docstring); warn on fixes.

    Args:
        modules: the PyroModules of the model and guide (:func:`pyro_modules`).
        name: the model's name, for the warning.
    """
    if pyro.settings.get("module_local_params"):
        return
    store = pyro.get_param_store()
    owned = owned_parameters(modules)
    shared, copied = [], set()
    for full, (m, attr, own) in owned.items():
        other = _owner(own)
        if other is not None and other is not m:
            copy = nn.Parameter(own.detach().clone(), requires_grad=own.requires_grad)
            m._parameters[attr + "_unconstrained"] = copy
            owned[full] = (m, attr, copy)
            copied.add(full)
            shared.append(f"{full!r} (shared with a {type(other).__name__})")
    stale, held_params = [], store.get_state()["params"]
    for full, (_, _, own) in owned.items():
        held = held_params.get(full)
        if held is not None and held is not own:
            if full not in copied:  # a copied tensor's entry is the other module's: said above
                stale.append(f"{full!r} = {format_value(store[full])}")
            del store[full]
    register(modules)
    if shared:
        warnings.warn(
            f"fit: {name} holds the same parameter tensors as another module: "
            f"{', '.join(shared)}. Pyro's param store hands a module the tensor stored under "
            "its parameter's name when the module is called, so calling the model before fit "
            "gave it the other module's values. fit now trains a copy, which starts from those "
            "inherited values. To start from the model's own values, build it after "
            "pyro.clear_param_store() or fit it before calling it.",
            UserWarning,
            stacklevel=3,
        )
    if stale:
        warnings.warn(
            f"fit: Pyro's param store held {', '.join(stale)} under the parameter names of "
            f"{name}, from another module or a pyro.param. Pyro would have handed these "
            f"values to {name} and shared them; fit removed them, so {name} starts from and "
            "trains its own values, which the store now holds. A module of the same names "
            "called later reads these values: call pyro.clear_param_store() between models, "
            "or set pyro.settings.set(module_local_params=True) before building them.",
            UserWarning,
            stacklevel=3,
        )
