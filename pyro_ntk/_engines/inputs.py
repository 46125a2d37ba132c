"""The one gate every input passes: checks, the preflight per signature, and eval mode.

:class:`InputGate` validates inputs ``X (N, ...)`` for a network (tensor, device, dtype,
finite values, the network's feature shape) and runs the preflight
(:mod:`pyro_ntk._engines.preflight`) on the first input of each feature shape and dtype,
proving the engine's routes on it; an input validated before and unchanged since passes
with no further pass over its values (:class:`ValidatedInputs`). Cost: one finiteness
reduction per new input; the preflight once per signature (a few forward and backward
passes on three examples).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from pyro_ntk._checks import check_inputs as check_input_tensor
from pyro_ntk._engines.base import Engine
from pyro_ntk._engines.preflight import (
    Reference,
    Report,
    forward_checks,
    probe_rows,
    reference,
    scan_ops,
)
from pyro_ntk._engines.routes import full_precision, reference_kernels
from pyro_ntk.parameters import ParameterSpace


@contextlib.contextmanager
def eval_mode(network: nn.Module) -> Iterator[None]:
    """Evaluate ``network`` in eval mode; every module's train flag is restored afterwards."""
    flags = [(m, m.training) for m in network.modules()]
    if not any(flag for _, flag in flags):  # already in eval mode: nothing to toggle
        yield
        return
    network.train(False)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def check_backward_hooks(where: str, network: nn.Module) -> None:
    """Refuse backward hooks (module or global): ``torch.func`` transforms cannot run them.

    ``register_full_backward_hook`` / ``register_full_backward_pre_hook`` wrap the module
    call in an ``autograd.Function`` that ``vmap``/``jvp``/``vjp`` reject with an obscure
    message; legacy ``register_backward_hook`` hooks would fire in the reverse-mode products
    only (and could change them), so the NTK would depend on the engine. The NTK is defined
    by the forward pass alone, so no backward hook belongs in it. The network is only read.
    """
    if not (
        torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
        or any(m._backward_hooks or m._backward_pre_hooks for m in network.modules())
    ):
        return  # the common case: one pass over the modules, no names built
    found = []
    if torch_module._global_backward_hooks:
        found.append(
            "a global module backward hook (torch.nn.modules.module."
            "register_module_full_backward_hook or register_module_backward_hook)"
        )
    if torch_module._global_backward_pre_hooks:
        found.append(
            "a global module backward pre-hook "
            "(torch.nn.modules.module.register_module_full_backward_pre_hook)"
        )
    for name, module in network.named_modules():
        kind_name = type(module).__name__
        label = f"module {name!r} ({kind_name})" if name else f"the network itself ({kind_name})"
        if module._backward_hooks:
            full = getattr(module, "_is_full_backward_hook", None)
            kind = "register_full_backward_hook" if full else "register_backward_hook"
            found.append(f"{label}: {len(module._backward_hooks)} {kind} hook(s)")
        if module._backward_pre_hooks:
            found.append(
                f"{label}: {len(module._backward_pre_hooks)} register_full_backward_pre_hook "
                "hook(s)"
            )
    if found:
        raise ValueError(
            f"{where}: network has backward hooks, which the Jacobian products cannot run "
            f"through: {'; '.join(found)}. torch.func (vmap, jvp, vjp) rejects modules with "
            "backward hooks, and the NTK depends on the forward pass only. Remove each hook "
            "(call .remove() on the handle its register_* call returned) while the "
            "Linearization is in use, or linearize a hook-free copy: clone = "
            "copy.deepcopy(network), then for m in clone.modules(): "
            "m._backward_hooks.clear(); m._backward_pre_hooks.clear(). Forward hooks are fine."
        )


class ValidatedInputs:
    """Inputs that passed :meth:`pyro_ntk.Linearization.check_inputs`, until they change .

    An entry is keyed like the engines' chunk cache: the tensor object (held by a weak
    reference, so a dead tensor whose ``id`` is reused never matches), its storage offset,
    shape, strides, dtype and device, and it is valid only while the tensor's version
    counter is unchanged. Every in-place write through the tensor or any view of its
    storage bumps that counter, so ``X[0, 0] = nan`` makes the next call validate ``X``
    again and reject it. A CG solve that calls ``ntk_mvm(X, X, V)`` a hundred times pays the
    finiteness pass over ``X`` and the feature-shape check once. Like the chunk cache, it
    cannot see writes that bypass the version counter (``X.data``, a NumPy array sharing
    the memory); inference tensors have no version counter and are validated every time.
    At most ``capacity`` entries are kept (oldest dropped first); pickling drops them.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._entries: dict[tuple, tuple[weakref.ref, int]] = {}

    @staticmethod
    def _key(X: Tensor) -> tuple:
        return (id(X), X.storage_offset(), tuple(X.shape), X.stride(), X.dtype, X.device)

    def __contains__(self, X: Tensor) -> bool:
        if X.is_inference():
            return False
        entry = self._entries.get(self._key(X))
        return entry is not None and entry[0]() is X and entry[1] == X._version

    def add(self, X: Tensor) -> None:
        """Remember ``X`` as validated at its current version."""
        if X.is_inference():
            return
        key = self._key(X)
        self._entries.pop(key, None)
        while len(self._entries) >= self.capacity:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (weakref.ref(X), X._version)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity, "_entries": {}}


class InputGate:
    """Validated inputs, preflight references and proven dense routes of one network.

    Args:
        network: the user's network.
        space: the linearized parameter space.
        engine: the engine whose routes the preflight proves.
        report: where every decision is recorded.
    """

    def __init__(self, network: nn.Module, space: ParameterSpace, engine: Engine, report: Report):
        self.network, self.space, self.engine, self.report = network, space, engine, report
        self.output_dim: int | None = None
        self.accepted: set[tuple] = set()
        self.validated = ValidatedInputs()
        self.references: dict[tuple, Reference] = {}  # input signature → preflight reference
        self.dense_proven: set[tuple] = set()

    def __getstate__(self) -> dict:
        # The preflight's references hold closures over the probe: pickling drops them with
        # the accepted signatures, so the preflight runs again on first use after loading.
        state = self.__dict__.copy()
        state["references"], state["dense_proven"], state["accepted"] = {}, set(), set()
        return state

    def check(self, where: str, name: str, X: object) -> Tensor:
        """Validate ``X``; see :meth:`pyro_ntk.Linearization.check_inputs`."""
        # Inputs are data: one that requires grad is accepted and detached (no gradient
        # reaches X on any engine, consistently).
        if isinstance(X, Tensor) and X.requires_grad:
            X = X.detach()
        # An input validated before and unchanged since (same tensor, same version counter)
        # passes without another finiteness pass; see ValidatedInputs.
        if isinstance(X, Tensor) and X in self.validated:
            return X
        check_backward_hooks(where, self.network)  # also those registered after construction
        X = check_input_tensor(where, name, X, self.space.dtype, self.space.device)
        feature_shape = tuple(X.shape[1:])
        key = (feature_shape, str(X.dtype))  # integer inputs (token ids) vary in dtype
        if key not in self.accepted:
            try:  # two rows (one repeated when N = 1): a batch, as every product sends
                out = self._forward(probe_rows(X, 2))
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                seen = f" (accepted so far: {sorted(self.accepted)})" if self.accepted else ""
                raise ValueError(
                    self._shape_hint(where, name, X)
                    or f"{where}: {name} has shape {tuple(X.shape)} and dtype {X.dtype}, whose "
                    f"feature shape {feature_shape} or dtype the network rejects{seen}: {exc}"
                ) from exc
            self._check_differentiable(where, X[:1].clone())
            self.references[key] = self._preflight(where, X)
            o = out.shape[-1]
            if self.output_dim is not None and o != self.output_dim:
                raise ValueError(
                    f"{where}: {name} with feature shape {feature_shape} gives {o} outputs per "
                    f"example; earlier inputs gave {self.output_dim}."
                )
            self.output_dim = o
            self.accepted.add(key)
        self.validated.add(X)
        return X

    def _forward(self, rows: Tensor) -> Tensor:
        with eval_mode(self.network):
            return self.engine.forward(rows)  # rows is a private copy: a forward may write it

    def _shape_hint(self, where: str, name: str, X: Tensor) -> str:
        """The message for a 1-D ``X`` that a missing feature or batch dim explains, else ``""``.

        ``(N,)`` for a network of one input feature (``X.unsqueeze(-1)`` runs), or one
        example of ``k`` features without its batch dim (``X.unsqueeze(0)`` runs).
        """
        if X.dim() != 1:
            return ""
        N = X.shape[0]
        modules = self.network.modules()
        first = next((m for m in modules if isinstance(getattr(m, "in_features", None), int)), None)
        layer = "" if first is None else f"first layer ({type(first).__name__}) "
        for fix, rows, shape, k in (
            ("unsqueeze(-1)", probe_rows(X, 2).unsqueeze(-1), f"({N}, 1)", 1),
            ("unsqueeze(0)", X[None].clone(), f"(1, {N})", N),
        ):
            if first is not None and first.in_features != k:
                continue
            try:
                self._forward(rows)
            except (RuntimeError, ValueError, TypeError, IndexError):
                continue
            what = "1 feature" if k == 1 else f"{k} features"
            return (
                f"{where}: {name} has shape ({N},); the network's {layer}takes {what} per "
                f"example, so {name} should be {shape}"
                + (" (one example)" if k == N > 1 else "")
                + f": use {name}.{fix}."
            )
        return ""

    def _preflight(self, where: str, X: Tensor) -> Reference:
        """Establish what holds for this input signature; prove the engine's routes on it."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self._preflight(where, X.clone())
        if X.is_inference():
            X = X.clone()
        engine, report, space = self.engine, self.report, self.space
        report.signatures.append(f"{tuple(X.shape[1:])} {X.dtype}")
        with eval_mode(self.network), torch.enable_grad(), full_precision():
            writes, mutable, random = forward_checks(
                where, self.network, space, engine.f_plain, X, report
            )
            if writes:
                engine.copy_inputs = True
            ref = reference(where, self.network, space, engine.f_plain, probe_rows(X, 3), report)
            if ref.kernels:  # the ops that will run are those of the reference kernels
                with reference_kernels():
                    mutable, random = scan_ops(lambda: engine.f_plain(space.theta, ref.X))
            first = len(report.signatures) == 1
            engine.routes.inplace = bool(mutable) or (engine.routes.inplace and not first)
            report.mutable_ops |= mutable
            report.random_ops |= random
            cache = getattr(engine, "cache", None)
            if (mutable or random) and cache is not None:
                engine.routes.cache_linearize = False
                report.add(
                    "linearize closure",
                    "off",
                    f"the forward runs in-place or random-number ops {sorted(mutable | random)}, "
                    "which a torch.func.linearize graph replays on every call (its answer "
                    "drifts)",
                )
            engine.prepare(where, ref, report)
        engine.clear_cache()  # the probe's entries
        if cache is not None:  # counters count products on the caller's rows
            cache.reset_counts()
        return ref

    def prove_dense(self, where: str, *inputs: Tensor) -> None:
        """Prove the engine's dense route for the signatures of ``inputs`` (once each)."""
        for X in inputs:
            key = (tuple(X.shape[1:]), str(X.dtype))
            if key in self.dense_proven:
                continue
            with eval_mode(self.network), torch.enable_grad(), full_precision():
                self.engine.prove_dense(where, self.references[key], self.report)
            cache = getattr(self.engine, "cache", None)
            if cache is not None:
                cache.reset_counts()
            self.dense_proven.add(key)

    def _check_differentiable(self, where: str, X1: Tensor) -> None:
        """Refuse a network whose output has no gradient path to θ (argmax, round, detach).

        One forward of one example with autograd, once per accepted feature shape.
        """
        if torch.is_inference_mode_enabled():
            return
        if X1.is_inference():  # created under inference_mode: a normal copy of one row
            X1 = X1.clone()
        theta = {k: v.detach().requires_grad_(True) for k, v in self.space.theta.items()}
        with torch.enable_grad(), eval_mode(self.network):
            out = self.engine.f(theta, X1)
        if not out.requires_grad:
            raise ValueError(
                f"{where}: network output does not depend differentiably on the linearized "
                f"parameters (its forward has no gradient path to θ, e.g. argmax, round or "
                f"detach), so its Jacobian is undefined; network = {type(self.network).__name__}."
            )
