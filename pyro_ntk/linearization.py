r"""The linearization engine: Jacobian and NTK products of a trained network at θ*.

.. math::

    f_{\mathrm{lin}}(x; \theta) = f(x; \theta^*) + J(x)(\theta - \theta^*),
    \qquad J(x) = \partial f(x; \theta) / \partial \theta \,\big|_{\theta^*},

    K(x, x') = J(x)\, \mathrm{diag}(\sigma^2)\, J(x')^\top.

Layout conventions shared by the whole package: ``N`` inputs, ``O`` outputs per input,
``P`` linearized parameters; function-space vectors are flat of length ``N·O`` with row
index ``n·O + o`` (sample-major, as gpytorch's interleaved multitask layout).
"""

from __future__ import annotations

import contextlib
import enum
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pyro_ntk._checks import (
    check_finite,
    check_positive_int,
    check_tensor,
    check_vector,
)
from pyro_ntk._checks import (
    check_inputs as check_input_tensor,
)
from pyro_ntk._engines import CachedEngine, Engine, FuncTorchEngine, StructuredEngine, make_plan
from pyro_ntk._engines.preflight import Report, forward_checks, probe_rows, reference, scan_ops
from pyro_ntk._engines.routes import full_precision, reference_kernels
from pyro_ntk._memory import check_dense_memory
from pyro_ntk.parameters import ParameterSpace, ParamSelector


class NTKImplementation(str, enum.Enum):
    """How :class:`Linearization` computes Jacobian products."""

    FUNCTORCH = "functorch"
    """``torch.func`` vjp + jvp under ``vmap``: generic, any network (the reference path)."""

    CACHED = "cached"
    """``torch.func`` closures (vjp pullback, ``linearize``) built once per (chunk, θ*) and
    reused by every later product on the same rows; generic, any network."""

    STRUCTURED = "structured"
    """Cached per-layer factors (inputs and output sensitivities) of ``nn.Linear`` and
    ``nn.Conv2d`` layers: about two forward-sized matrix products per layer per product and a
    Jacobian-free dense kernel; other parameters go through cached ``torch.func`` closures."""

    AUTO = "auto"
    """``structured`` when any Linear/Conv2d layer can be factored, else ``cached``: a rule
    measured on the engine zoo (``benchmarks/bench_engine.py --zoo``), where the structured
    engine's dense products are the fastest or within 1.06× of them and its K·v within
    1.12× of the best on every zoo network (wide layers with many outputs are the known
    exception: 1.36× on a 32-256-256-10 MLP); see ``implementation_reason``."""


_ENGINES: dict[NTKImplementation, type[Engine]] = {
    NTKImplementation.FUNCTORCH: FuncTorchEngine,
    NTKImplementation.CACHED: CachedEngine,
    NTKImplementation.STRUCTURED: StructuredEngine,
}


def _check_backward_hooks(where: str, network: nn.Module) -> None:
    """Refuse backward hooks (module or global): ``torch.func`` transforms cannot run them.

    ``register_full_backward_hook`` / ``register_full_backward_pre_hook`` wrap the module
    call in an ``autograd.Function`` that ``vmap``/``jvp``/``vjp`` reject with an obscure
    message; legacy ``register_backward_hook`` hooks would fire in the reverse-mode products
    only (and could change them), so the NTK would depend on the engine. The NTK is defined
    by the forward pass alone, so no backward hook belongs in it. The network is only read.
    """
    from torch.nn.modules import module as torch_module

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


class _ValidatedInputs:
    """Inputs that passed :meth:`Linearization.check_inputs`, until they change (internal).

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


class Linearization:
    r"""A trained network, linearized at its weights θ*, with matrix-free NTK products.

    θ* is a detached copy of the network's parameters (and its buffers), taken at
    construction: the network is never mutated, and later changes to it do not leak in.
    Every call evaluates the network in eval mode (BatchNorm uses running statistics,
    Dropout is off) and restores each module's train/eval flag afterwards. Inputs are data:
    an ``X`` that requires grad is accepted and detached, so no gradient reaches it (on
    every implementation); gradients flow to ``V``/``v``/``u`` and to ``variance``.
    Forward (pre-)hooks, the module's or global, are part of ``f`` and honoured; backward
    hooks (``register_full_backward_hook``, ``register_full_backward_pre_hook``,
    ``register_backward_hook``, or global ones) are refused at construction with a
    ``ValueError`` naming the module and the hook kind: ``torch.func`` cannot run through
    them and the NTK depends on the forward pass only (the hooks are left registered).

    Cost per chunk of ``n`` inputs (generic ``functorch`` engine): ``jvp`` ≈ 2–3 forward
    passes and ``vjp`` ≈ one forward + backward, for all ``k`` right-hand sides in one
    ``vmap``-ed pass; ``ntk_mvm`` = one ``vjp`` over ``X2`` + one ``jvp`` over ``X1``.
    Memory is bounded by ``chunk_size`` × activations, never ``N × P``, except for
    :meth:`jacobian` and :meth:`ntk_dense`, which are meant for small problems.

    Args:
        network: the trained ``nn.Module``; any input shape it accepts.
        params: which parameters to linearize: ``None`` (all with ``requires_grad``), a
            list of names, or a predicate ``(name, parameter) -> bool`` (e.g. the last
            layer only). The others stay fixed at θ*.
        chunk_size: inputs per chunk (``None``: all at once).
        implementation: an :class:`NTKImplementation` or its string value.
        example: optional inputs ``(N, ...)`` to run the preflight on at construction
            (otherwise it runs on the first input of each feature shape). A network whose
            forward is random in eval mode, whose examples interact, or whose products no
            route computes exactly is refused there with a ``ValueError`` naming the module.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> lin = Linearization(net)
        >>> X = torch.randn(5, 3)
        >>> lin(X).shape, lin.num_params, lin.output_dim(X)
        (torch.Size([5, 2]), 50, 2)
        >>> lin.ntk_mvm(X, X, torch.randn(10, 4)).shape
        torch.Size([10, 4])
    """

    def __init__(
        self,
        network: nn.Module,
        params: ParamSelector = None,
        *,
        chunk_size: int | None = None,
        implementation: str | NTKImplementation = "auto",
        example: Tensor | None = None,
    ):
        self.space = ParameterSpace(network, params, where="Linearization")
        _check_backward_hooks("Linearization", network)
        self.network = network
        self.chunk_size = check_positive_int(
            "Linearization", "chunk_size", chunk_size, allow_none=True
        )
        try:
            requested = NTKImplementation(implementation)
        except ValueError:
            choices = [i.value for i in NTKImplementation]
            raise ValueError(
                f"Linearization: implementation must be one of {choices}, got {implementation!r}."
            ) from None
        self.requested = requested
        """The implementation asked for (``auto`` stays ``auto``; see :attr:`implementation`)."""
        self.implementation = self._choose(requested)
        """The engine in use (``auto`` resolved)."""
        self.engine: Engine = _ENGINES[self.implementation](network, self.space)
        self._output_dim: int | None = None
        self._accepted: set[tuple[int, ...]] = set()
        self._validated = _ValidatedInputs()
        self._references: dict[tuple, object] = {}  # input signature → preflight reference
        self._dense_proven: set[tuple] = set()
        self.plan = Report()
        """Every decision made for this network (routes, fast paths, demotions, fallbacks)
        with its reason; :meth:`explain` renders it."""
        if example is not None:
            self.check_inputs("Linearization", "example", example)

    def __getstate__(self) -> dict:
        # The preflight's references hold closures over the probe: pickling drops them with
        # the accepted signatures, so the preflight runs again on first use after loading.
        state = self.__dict__.copy()
        state["_references"], state["_dense_proven"], state["_accepted"] = {}, set(), set()
        return state

    def explain(self) -> str:
        """How products are computed for this network, and why: one line per decision.

        The preflight runs on the first input of each feature shape (or on ``example`` at
        construction): determinism and independence checks, the reference route, and every
        fast path proven against it or demoted.
        """
        head = f"engine {self.implementation.value!r} ({self.implementation_reason})"
        return f"{head}\n{self.plan.explain()}"

    def _choose(self, requested: NTKImplementation) -> NTKImplementation:
        """Resolve ``auto`` by the measured rule; record why in ``implementation_reason``."""
        if requested is not NTKImplementation.AUTO:
            self.implementation_reason = f"requested {requested.value!r}"
            return requested
        plan = make_plan(self.network, self.space)
        if not plan.layers:
            self.implementation_reason = (
                f"auto: no Linear/Conv2d layer can be factored ({len(plan.generic)} parameter "
                "tensors); generic closures cached per chunk"
            )
            return NTKImplementation.CACHED
        share = plan.structured_fraction(self.space)
        self.implementation_reason = (
            f"auto: factored layers hold {share:.0%} of the {self.num_params} linearized "
            "parameters; the structured engine (on the engine zoo its dense products are the "
            "fastest or within 1.06× of them, and its K·v within 1.12× of the best)"
        )
        return NTKImplementation.STRUCTURED

    def clear_cache(self) -> None:
        """Release the engine's per-chunk cache (activations or factors), if it keeps one."""
        clear = getattr(self.engine, "clear_cache", None)
        if clear is not None:
            clear()

    # ------------------------------------------------------------------ properties
    @property
    def num_params(self) -> int:
        """P, the number of linearized scalar parameters."""
        return self.space.num_params

    @property
    def dtype(self) -> torch.dtype:
        """The network parameters' dtype; inputs and vectors must match it."""
        return self.space.dtype

    @property
    def device(self) -> torch.device:
        """The network parameters' device; inputs and vectors must live there."""
        return self.space.device

    @property
    def theta(self) -> dict[str, Tensor]:
        """θ*: detached copies of the linearized parameters (do not modify in place)."""
        return self.space.theta

    @property
    def groups(self) -> list[str]:
        """Parameter groups (owning modules, i.e. layers), the index set of σ_g²."""
        return self.space.groups

    def output_dim(self, X: Tensor) -> int:
        """O, the number of outputs per example (validates ``X``)."""
        self.check_inputs("Linearization.output_dim", "X", X)
        return self._output_dim

    # ------------------------------------------------------------------ validation
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        flags = [(m, m.training) for m in self.network.modules()]
        if not any(flag for _, flag in flags):  # already in eval mode: nothing to toggle
            yield
            return
        self.network.train(False)
        try:
            yield
        finally:
            for m, flag in flags:
                m.training = flag

    def check_inputs(self, where: str, name: str, X: object) -> Tensor:
        """Validate inputs ``X`` ``(N, ...)`` for this network; the one check of every public entry.

        A tensor of the network's device, a floating dtype equal to the network's (integer
        inputs such as token ids pass as they are), finite, with at least one row. The first
        input of each feature shape and dtype also runs the preflight (the network's
        determinism, independence of examples, state writes, the proven product routes);
        a tensor validated before and unchanged since passes without another pass.

        Args:
            where: the public entry point, first in every message.
            name: the argument's name, for the message.
            X: the candidate inputs.

        Returns:
            ``X`` (detached when it requires grad: no gradient reaches the inputs).

        Raises:
            TypeError, ValueError: naming ``where``, ``name``, what was given and what was expected.
        """
        # Inputs are data: one that requires grad is accepted and detached (no gradient
        # reaches X on any engine, consistently; see the class docstring).
        if isinstance(X, Tensor) and X.requires_grad:
            X = X.detach()
        # An input validated before and unchanged since (same tensor, same version counter)
        # passes without another finiteness pass; see _ValidatedInputs.
        if isinstance(X, Tensor) and X in self._validated:
            return X
        _check_backward_hooks(where, self.network)  # also those registered after construction
        X = check_input_tensor(where, name, X, self.dtype, self.device)
        feature_shape = tuple(X.shape[1:])
        key = (feature_shape, str(X.dtype))  # integer inputs (token ids) vary in dtype
        if key not in self._accepted:
            try:
                with self._eval_mode():
                    out = self.engine.forward(X[:1].clone())  # a forward may write its input
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                seen = f" (accepted so far: {sorted(self._accepted)})" if self._accepted else ""
                raise ValueError(
                    f"{where}: {name} has shape {tuple(X.shape)} and dtype {X.dtype}, whose "
                    f"feature shape {feature_shape} or dtype the network rejects{seen}: {exc}"
                ) from exc
            self._check_differentiable(where, X[:1].clone())
            self._references[key] = self._preflight(where, X)
            o = out.shape[-1]
            if self._output_dim is not None and o != self._output_dim:
                raise ValueError(
                    f"{where}: {name} with feature shape {feature_shape} gives {o} outputs per "
                    f"example; earlier inputs gave {self._output_dim}."
                )
            self._output_dim = o
            self._accepted.add(key)
        self._validated.add(X)
        return X

    def _preflight(self, where: str, X: Tensor):
        """Establish what holds for this input signature; prove the engine's routes on it."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self._preflight(where, X.clone())
        if X.is_inference():
            X = X.clone()
        engine = self.engine
        report = self.plan
        report.signatures.append(f"{tuple(X.shape[1:])} {X.dtype}")
        with self._eval_mode(), torch.enable_grad(), full_precision():
            writes, mutable, random = forward_checks(
                where, self.network, self.space, engine.f_plain, X, report
            )
            if writes:
                engine.copy_inputs = True
            ref = reference(
                where, self.network, self.space, engine.f_plain, probe_rows(X, 3), report
            )
            if ref.kernels:  # the ops that will run are those of the reference kernels
                with reference_kernels():
                    mutable, random = scan_ops(lambda: engine.f_plain(self.space.theta, ref.X))
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

    def _dense_ready(self, where: str, *inputs: Tensor) -> None:
        """Prove the engine's dense route for the signatures of ``inputs`` (once each)."""
        for X in inputs:
            key = (tuple(X.shape[1:]), str(X.dtype))
            if key in self._dense_proven:
                continue
            with self._eval_mode(), torch.enable_grad(), full_precision():
                self.engine.prove_dense(where, self._references[key], self.plan)
            cache = getattr(self.engine, "cache", None)
            if cache is not None:
                cache.reset_counts()
            self._dense_proven.add(key)

    def _check_differentiable(self, where: str, X1: Tensor) -> None:
        """Refuse a network whose output has no gradient path to θ (argmax, round, detach).

        One forward of one example with autograd, once per accepted feature shape.
        """
        if torch.is_inference_mode_enabled():
            return
        if X1.is_inference():  # created under inference_mode: a normal copy of one row
            X1 = X1.clone()
        theta = {k: v.detach().requires_grad_(True) for k, v in self.space.theta.items()}
        with torch.enable_grad(), self._eval_mode():
            out = self.engine.f(theta, X1)
        if not out.requires_grad:
            raise ValueError(
                f"{where}: network output does not depend differentiably on the linearized "
                f"parameters (its forward has no gradient path to θ, e.g. argmax, round or "
                f"detach), so its Jacobian is undefined; network = {type(self.network).__name__}."
            )

    def _scale(self, where: str, variance: Tensor | float | None) -> Tensor | None:
        """Per-parameter σ² of shape ``(P,)`` from a scalar or per-group ``(G,)`` value."""
        if variance is None:
            return None
        if not isinstance(variance, Tensor):
            if isinstance(variance, bool) or not isinstance(variance, (int, float)):
                raise TypeError(
                    f"{where}: variance must be None, a number or a tensor, "
                    f"got {type(variance).__name__}."
                )
            variance = torch.as_tensor(variance, dtype=self.dtype, device=self.device)
        G = self.space.num_groups
        if variance.dim() > 1 or (variance.dim() == 1 and variance.shape[0] != G):
            raise ValueError(
                f"{where}: variance has shape {tuple(variance.shape)}; expected a scalar or "
                f"({G},), one per parameter group {self.groups}."
            )
        if variance.dtype != self.dtype:
            raise TypeError(f"{where}: variance has dtype {variance.dtype}, expected {self.dtype}.")
        if variance.device != self.device:
            raise ValueError(
                f"{where}: variance is on device {variance.device}, expected {self.device}."
            )
        check_finite(where, "variance", variance)
        if bool((variance.detach() < 0).any()):
            raise ValueError(
                f"{where}: variance must be non-negative (σ² ≥ 0), got minimum "
                f"{float(variance.detach().min()):.3g}."
            )
        return self.space.expand_group_values(variance)

    def _chunks(self, N: int) -> Iterator[slice]:
        """The engine's single loop over data chunks (the seam for data sharding)."""
        step = self.chunk_size or N
        for start in range(0, N, step):
            yield slice(start, min(start + step, N))

    def _over_rows(self, fn, X: Tensor, *args: Tensor) -> Tensor:
        """``fn(X[c], *args)`` over the row chunks of ``X``, concatenated along rows.

        One chunk (the common case) is passed whole: no slicing and no concatenation copy.
        """
        N = X.shape[0]
        if not self.chunk_size or self.chunk_size >= N:
            return fn(X, *args)
        return torch.cat([fn(X[c], *args) for c in self._chunks(N)])

    # ------------------------------------------------------------------ products
    def __call__(self, X: Tensor) -> Tensor:
        """f(X; θ*), shape ``(N, O)``."""
        X = self.check_inputs("Linearization", "X", X)
        with self._eval_mode():
            return self._over_rows(self.engine.forward, X)

    def jvp(self, X: Tensor, v: Tensor) -> Tensor:
        """J(X) v: ``v`` of shape ``(P,)`` or ``(P, k)`` gives ``(N, O)`` or ``(N, O, k)``."""
        X = self.check_inputs("Linearization.jvp", "X", X)
        v = check_vector("Linearization.jvp", "v", v, self.num_params, self.dtype, self.device, "P")
        V = v if v.dim() == 2 else v.unsqueeze(-1)
        with self._eval_mode():
            out = self._over_rows(self.engine.jvp, X, V)
        return out if v.dim() == 2 else out.squeeze(-1)

    def vjp(self, X: Tensor, u: Tensor) -> Tensor:
        """J(X)ᵀ u: ``u`` of shape ``(N, O)`` or ``(N, O, k)`` gives ``(P,)`` or ``(P, k)``."""
        X = self.check_inputs("Linearization.vjp", "X", X)
        N, O = X.shape[0], self._output_dim
        u = check_tensor("Linearization.vjp", "u", u)
        if u.dim() not in (2, 3) or tuple(u.shape[:2]) != (N, O):
            raise ValueError(
                f"Linearization.vjp: u has shape {tuple(u.shape)}; expected ({N}, {O}) or "
                f"({N}, {O}, k) for N = {N} inputs and O = {O} outputs."
            )
        flat = check_vector(
            "Linearization.vjp", "u", u.reshape(N * O, -1), N * O, self.dtype, self.device, "N·O"
        )
        with self._eval_mode():
            out = self._vjp(X, flat.reshape(N, O, -1))
        return out if u.dim() == 3 else out.squeeze(-1)

    def _vjp(self, X: Tensor, U: Tensor) -> Tensor:
        """Σ over row chunks of J(X_c)ᵀ U_c (call in eval mode)."""
        N = X.shape[0]
        if not self.chunk_size or self.chunk_size >= N:
            return self._reduce(self.engine.vjp(X, U))
        out = None
        for c in self._chunks(N):
            part = self.engine.vjp(X[c], U[c])
            out = part if out is None else out + part
        return self._reduce(out)

    def _reduce(self, partial: Tensor) -> Tensor:
        """Sum a parameter-space partial sum over data shards (the seam for data sharding).

        Identity here; :class:`pyro_ntk.distributed.ShardedLinearization` all-reduces it
        across ranks, so every Jᵀu (and with it K·V, F·v) is the sum over all shards.
        """
        return partial

    def ntk_mvm(
        self, X1: Tensor, X2: Tensor | None, V: Tensor, variance: Tensor | float | None = None
    ) -> Tensor:
        r"""K(X1, X2) V without forming J or K.

        .. math:: K V = J(X_1)\,\mathrm{diag}(\sigma^2)\,\big(J(X_2)^\top V\big)

        Args:
            X1: inputs ``(N1, ...)``.
            X2: inputs ``(N2, ...)``; ``None`` means ``X1``.
            V: ``(N2·O,)`` or ``(N2·O, k)``, rows ``n·O + o``.
            variance: σ², a scalar or one value per parameter group ``(G,)``; ``None`` is 1.

        Returns:
            ``(N1·O,)`` or ``(N1·O, k)``. Cost: one ``vjp`` over ``X2`` and one ``jvp``
            over ``X1``, all ``k`` columns batched.
        """
        where = "Linearization.ntk_mvm"
        X1 = self.check_inputs(where, "X1", X1)
        X2 = X1 if X2 is None or X2 is X1 else self.check_inputs(where, "X2", X2)
        O = self._output_dim
        N2 = X2.shape[0]
        V = check_vector(where, "V", V, N2 * O, self.dtype, self.device, "N2·O")
        Vm = V if V.dim() == 2 else V.unsqueeze(-1)
        scale = self._scale(where, variance)
        # V → J(X2)ᵀ V → diag(σ²) J(X2)ᵀ V → J(X1) diag(σ²) J(X2)ᵀ V
        with self._eval_mode():
            JTV = self._vjp(X2, Vm.reshape(N2, O, -1))
            if scale is not None:
                JTV = JTV * scale.unsqueeze(-1)
            out = self._over_rows(self.engine.jvp, X1, JTV)
        out = out.reshape(X1.shape[0] * O, -1)
        return out if V.dim() == 2 else out.squeeze(-1)

    def ntk_diag(self, X: Tensor, variance: Tensor | float | None = None) -> Tensor:
        """Exact diag K(X, X) from per-example gradients, shape ``(N·O,)``.

        Entry ``n·O + o`` is ``Σ_g σ_g² ‖∂f_o(x_n)/∂θ_g‖²``. Cost: ``O`` per-example
        backward passes per input; memory ``chunk_size·O·P``.
        """
        X = self.check_inputs("Linearization.ntk_diag", "X", X)
        scale = self._scale("Linearization.ntk_diag", variance)
        self._dense_ready("Linearization.ntk_diag", X)
        with self._eval_mode():
            return self._over_rows(self.engine.ntk_diag, X, scale).reshape(-1)

    def ntk_dense(
        self, X1: Tensor, X2: Tensor | None = None, variance: Tensor | float | None = None
    ) -> Tensor:
        """Dense K(X1, X2), shape ``(N1·O, N2·O)``, built chunk by chunk (small problems)."""
        where = "Linearization.ntk_dense"
        X1 = self.check_inputs(where, "X1", X1)
        same = X2 is None
        X2 = X1 if same else self.check_inputs(where, "X2", X2)
        scale = self._scale(where, variance)
        n1, n2 = X1.shape[0] * self._output_dim, X2.shape[0] * self._output_dim
        self.check_dense_memory(where, f"K of shape (N1·O, N2·O) = ({n1}, {n2})", n1 * n2)
        self._dense_ready(where, X1, X2)
        with self._eval_mode():
            rows = []
            for c1 in self._chunks(X1.shape[0]):
                A = X1[c1]
                blocks = [
                    self.engine.ntk_block(A, A if same and c1 == c2 else X2[c2], scale)
                    for c2 in self._chunks(X2.shape[0])
                ]
                rows.append(torch.cat(blocks, dim=1))
        return torch.cat(rows, dim=0)

    def jacobian(self, X: Tensor) -> Tensor:
        """Dense Jacobian ``(N, O, P)`` (small problems and tests)."""
        X = self.check_inputs("Linearization.jacobian", "X", X)
        N, O, P = X.shape[0], self._output_dim, self.num_params
        self.check_dense_memory(
            "Linearization.jacobian", f"J of shape (N, O, P) = ({N}, {O}, {P})", N * O * P
        )
        self._dense_ready("Linearization.jacobian", X)
        with self._eval_mode():
            return self._over_rows(self.engine.jacobian, X)

    max_dense_bytes: float | None = None
    """Memory budget (bytes) of one dense matrix from :meth:`ntk_dense` or :meth:`jacobian`
    (and the dense Cholesky paths built on them). ``None`` (default): half the memory
    available at call time (``/proc/meminfo`` MemAvailable; CUDA: free device memory). Set it
    on an instance (``lin.max_dense_bytes = 8e9``, or ``float("inf")`` to disable the guard).
    Larger requests raise ``pyro_ntk._memory.DenseMemoryError`` (a ``MemoryError`` and a
    ``ValueError``) before allocating."""

    def check_dense_memory(self, where: str, what: str, numel: int) -> None:
        """Refuse (``ValueError`` naming ``where`` and ``what``) ``numel`` dense entries that do not fit.

        The guard of every dense route (dense K, the CG escalation's Cholesky fallback):
        ``numel`` entries in the network's dtype against ``max_dense_bytes`` and the device's
        free memory; the message points to the matrix-free path.
        """
        check_dense_memory(
            where,
            what,
            numel * self.dtype.itemsize,
            self.max_dense_bytes,
            self.device,
            alternative="the matrix-free path (ntk_mvm / jvp / vjp, NTKLinearOperator, "
            "solver='cg') with a chunk_size",
        )

    def __repr__(self) -> str:
        return (
            f"Linearization({type(self.network).__name__}, P={self.num_params}, "
            f"groups={len(self.groups)}, implementation={self.implementation.value!r}, "
            f"chunk_size={self.chunk_size})"
        )


def as_linearization(
    where: str,
    network: nn.Module | Linearization,
    params: ParamSelector = None,
    chunk_size: int | None = None,
) -> Linearization:
    """The :class:`Linearization` behind every public class's ``network`` argument.

    A ``Linearization`` is used as it is (so a kernel and a mean built from it share one
    θ* copy); an ``nn.Module`` is linearized with ``params`` and ``chunk_size``.
    """
    if isinstance(network, Linearization):
        if params is not None or chunk_size is not None:
            raise ValueError(
                f"{where}: params and chunk_size must be None when network is already a "
                f"Linearization (got params={params!r}, chunk_size={chunk_size!r})."
            )
        return network
    if not isinstance(network, nn.Module):
        raise TypeError(
            f"{where}: network must be a torch.nn.Module or a pyro_ntk.Linearization, got "
            f"{type(network).__name__}."
        )
    return Linearization(network, params, chunk_size=chunk_size)


def check_linearization(where: str, linearization: object) -> Linearization:
    """Require a :class:`Linearization` (the shared check of operators, models, solvers)."""
    if not isinstance(linearization, Linearization):
        raise TypeError(
            f"{where}: linearization must be a pyro_ntk.Linearization, "
            f"got {type(linearization).__name__}."
        )
    return linearization
