r"""The preflight: what is established about a network before any product is trusted.

Run once per input signature (feature shape and dtype) on a probe of a few examples taken
from the caller's inputs. Each step either establishes a property or ends in a
``ValueError`` that names the module, the operation and what the user can do:

1. **Determinism.** Two forwards at θ* on the same rows must agree; otherwise the forward is
   random (functional dropout with ``training=True``, noise layers) and has no Jacobian to
   linearize. The suspect is the first module whose inputs agree across the two runs but
   whose output does not.
2. **Independent examples.** Adding a third example must leave the first two rows of
   ``f(X)`` unchanged; otherwise examples interact (batch statistics, attention across the
   batch of a sequence-first layout misread as batch-first) and ``K(x, x')`` is undefined.
3. **State.** The forward must not write into θ* or a buffer; one that writes into its
   input makes the engines copy inputs first.
4. **Reference products.** ``J V`` and ``Jᵀ U`` on the probe by the plain route (a loop over
   columns, nothing cached or batched), trying forward-mode AD, then the reference kernels,
   then reverse mode only (double VJP). The two must be adjoint,
   ``⟨U, J V⟩ = ⟨Jᵀ U, V⟩``, or the network's derivatives are inconsistent.

Each engine then proves its own fast paths against these reference products
(``Engine.prepare``) and demotes or falls back where they disagree. Every decision is
recorded in a :class:`Report`.

Cost: a handful of forward and backward passes over at most ``max(3, O)`` examples, once
per input signature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_ntk._engines.routes import Push, double_vjp, reference_kernels
from pyro_ntk.parameters import ParameterSpace


@dataclass
class Decision:
    """One recorded decision: what it is about, the route taken, and why."""

    subject: str
    route: str
    reason: str


@dataclass
class Report:
    """Every decision the preflight and the engine made for this network.

    ``route`` is one of ``"fast path"``, ``"generic"``, ``"fallback"``, or a product route
    (``"jvp"``, ``"double_vjp"``, ...). :meth:`explain` renders them as a table.
    """

    decisions: list[Decision] = field(default_factory=list)
    signatures: list[str] = field(default_factory=list)
    mutable_ops: set[str] = field(default_factory=set)
    """In-place ATen ops the forward runs (with the kernels the engine uses)."""
    random_ops: set[str] = field(default_factory=set)
    """Random-number ATen ops the forward runs (with the kernels the engine uses)."""

    def add(self, subject: str, route: str, reason: str) -> None:
        """Record a decision (an identical one is kept once)."""
        d = Decision(subject, route, reason)
        if d not in self.decisions:
            self.decisions.append(d)

    def explain(self) -> str:
        """The decisions as aligned text, one per line."""
        if not self.decisions:
            return "(no input seen yet: the preflight runs on the first input of each shape)"
        w1 = max(len(d.subject) for d in self.decisions)
        w2 = max(len(d.route) for d in self.decisions)
        return "\n".join(f"{d.subject:<{w1}}  {d.route:<{w2}}  {d.reason}" for d in self.decisions)


def tolerance(dtype: torch.dtype) -> float:
    """Relative norm-wise tolerance for "the same number by two routes" in ``dtype``."""
    if dtype == torch.float64:
        return 1e-9
    if dtype == torch.float32:
        return 1e-3
    return 3e-2


def agree(a: Tensor, b: Tensor, tol: float) -> bool:
    """``‖a − b‖ ≤ tol · max(‖a‖, ‖b‖)`` (both zero agrees)."""
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return False
    scale = torch.maximum(torch.linalg.vector_norm(a), torch.linalg.vector_norm(b))
    return bool(torch.linalg.vector_norm(a - b) <= tol * scale) or bool(scale == 0)


def relative_error(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / max(‖a‖, ‖b‖)`` as a float (for messages)."""
    scale = max(float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b)), 1e-300)
    return float(torch.linalg.vector_norm(a - b)) / scale


# ---------------------------------------------------------------------- module tracking
class _Tracker:
    """The stack of modules currently running, and each module call's inputs and output."""

    def __init__(self, network: nn.Module):
        self.names = {id(m): (n or "<root>") for n, m in network.named_modules()}
        self.stack: list[str] = []
        self.calls: list[tuple[str, list[Tensor], list[Tensor]]] = []
        self._network = network

    def describe(self, name: str) -> str:
        for n, m in self._network.named_modules():
            if (n or "<root>") == name:
                return f"module {name!r} ({type(m).__name__})"
        return f"module {name!r}"

    @contextlib.contextmanager
    def active(self, record: bool = False) -> Iterator[_Tracker]:
        def pre(module, args):
            self.stack.append(self.names.get(id(module), "?"))

        def post(module, args, out):
            name = self.stack.pop() if self.stack else "?"
            if record:
                self.calls.append((name, _tensors(args), _tensors(out)))

        handles = []
        try:
            for m in self._network.modules():
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
            yield self
        finally:
            for h in handles:
                h.remove()


def _tensors(obj: object) -> list[Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t.detach().clone() for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]


def _same(xs: list[Tensor], ys: list[Tensor], tol: float) -> bool:
    return len(xs) == len(ys) and all(
        x.shape == y.shape and (agree(x, y, tol) if x.is_floating_point() else torch.equal(x, y))
        for x, y in zip(xs, ys)
    )


class _OpRecorder(TorchDispatchMode):
    """Records the mutating and the random ATen ops of a forward."""

    def __init__(self):
        super().__init__()
        self.mutable: set[str] = set()
        self.random: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            self.mutable.add(str(func.overloadpacket.__name__))
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.random.add(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def scan_ops(f: Callable[[], object]) -> tuple[set[str], set[str]]:
    """The mutating and the random ATen ops that running ``f()`` dispatches."""
    ops = _OpRecorder()
    with torch.no_grad(), ops:
        f()
    return ops.mutable, ops.random


def where_it_fails(network: nn.Module, run: Callable[[], object]) -> tuple[str, Exception] | None:
    """Run ``run`` with module tracking; on an exception return the innermost module."""
    tracker = _Tracker(network)
    try:
        with tracker.active():
            run()
    except Exception as exc:  # noqa: BLE001 - reported to the caller with its module
        where = tracker.describe(tracker.stack[-1]) if tracker.stack else "the network"
        return where, exc
    return None


# ---------------------------------------------------------------------- the probe
def probe_rows(X: Tensor, n: int) -> Tensor:
    """``n`` rows of ``X`` (repeated cyclically when ``X`` has fewer), a private copy."""
    index = torch.arange(n, device=X.device) % X.shape[0]
    return X[index].detach().clone()


@dataclass
class Reference:
    """Plain-route products on one probe batch: the ground truth fast paths must match."""

    X: Tensor
    num_outputs: int
    push: Callable[[Tensor], Tensor]  # V (P, k) → (n, O, k)
    pull: Callable[[Tensor], Tensor]  # U (n, O, k) → (P, k)
    route: Push
    kernels: bool


def plain_products(
    space: ParameterSpace,
    f: Callable[[dict[str, Tensor], Tensor], Tensor],
    X: Tensor,
    route: Push,
    kernels: bool,
) -> Reference:
    """Products on ``X`` by the plain route: one column at a time, nothing cached or batched."""
    theta = space.theta

    def fn(p: dict[str, Tensor]) -> Tensor:
        with reference_kernels(kernels):
            return f(p, X)

    def push(V: Tensor) -> Tensor:
        tangents = space.unflatten_batched(V)
        cols = []
        for j in range(V.shape[1]):
            t = {n: v[j] for n, v in tangents.items()}
            if route is Push.JVP:
                cols.append(jvp(fn, (theta,), (t,))[1])
            else:
                cols.append(double_vjp(fn, theta)[2](t))
        return torch.stack(cols, -1)

    def pull(U: Tensor) -> Tensor:
        _, pullback = vjp(fn, theta)
        cols = [space.flatten_batched(pullback(U[..., j])[0], lead=0) for j in range(U.shape[-1])]
        return torch.stack(cols, -1)

    with torch.no_grad():
        O = fn(theta).shape[1]
    return Reference(X, O, push, pull, route, kernels)


def forward_checks(
    where: str,
    network: nn.Module,
    space: ParameterSpace,
    f: Callable[[dict[str, Tensor], Tensor], Tensor],
    X: Tensor,
    report: Report,
) -> tuple[bool, set[str], set[str]]:
    """Determinism, independence and state checks.

    Returns whether the forward writes into its input, and the mutating and the random ATen
    ops it dispatched (with torch's default kernels).

    Raises ``ValueError`` for a random forward, interacting examples or a forward that writes
    into θ* or a buffer.
    """
    tol = tolerance(space.dtype)
    theta = space.theta
    X2, X3 = probe_rows(X, 2), probe_rows(X, 3)
    writes_input = False
    state = {**space.theta, **space.fixed}
    before = {n: t._version for n, t in state.items()}
    runs = []
    for _ in range(2):
        tracker, ops = _Tracker(network), _OpRecorder()
        Xr = X2.clone()
        version = Xr._version
        with torch.no_grad(), tracker.active(record=True), ops:
            out = f(theta, Xr)
        writes_input |= Xr._version != version
        runs.append((out, tracker, ops))
    changed = [n for n, t in state.items() if t._version != before[n]]
    if changed:
        raise ValueError(
            f"{where}: the network's forward writes in place into its parameters or buffers "
            f"{changed}, so f(x; θ*) changes with every call and has no fixed "
            "linearization. Make the forward functional (no in-place updates of parameters or "
            "buffers in eval mode)."
        )
    (o1, t1, r1), (o2, t2, _) = runs
    if not _same([o1], [o2], tol):
        suspect = "the network"
        for (name, a1, y1), (_, a2, y2) in zip(t1.calls, t2.calls):
            if _same(a1, a2, tol) and not _same(y1, y2, tol):
                suspect = t1.describe(name)
                break
        ops = f" (random ops seen: {sorted(r1.random)})" if r1.random else ""
        raise ValueError(
            f"{where}: two forwards at θ* on the same inputs disagree (relative difference "
            f"{relative_error(o1, o2):.2g}): the forward is random even in eval mode{ops}; "
            f"suspected {suspect}. Its Jacobian is not defined. Make that module deterministic "
            "in eval mode (e.g. F.dropout(x, p, training=self.training) instead of "
            "training=True), or linearize a copy without it."
        )
    with torch.no_grad():
        o3 = f(theta, X3.clone())
    if not _same([o3[:2]], [o1], tol):
        raise ValueError(
            f"{where}: examples are not independent: adding a third example changed the "
            f"outputs of the first two (relative change {relative_error(o3[:2], o1):.2g}), so "
            f"the kernel K(x, x') of network {type(network).__name__} would depend on the rest "
            "of the batch. Typical causes: batch statistics (BatchNorm or F.batch_norm with "
            "training=True), attention or pooling across dim 0 (a sequence-first module given "
            "a batch-first tensor), or a mean over the batch. Make each output depend on its "
            "own example only."
        )
    report.add(
        "forward",
        "checked",
        "deterministic; examples independent"
        + ("; writes its input in place (inputs are copied first)" if writes_input else ""),
    )
    return writes_input, runs[0][2].mutable, runs[0][2].random | runs[1][2].random


def reference(
    where: str,
    network: nn.Module,
    space: ParameterSpace,
    f: Callable[[dict[str, Tensor], Tensor], Tensor],
    X: Tensor,
    report: Report,
) -> Reference:
    """The plain-route products on the probe ``X``, with the first route that runs.

    Raises ``ValueError`` naming the module and operation when no route runs, and when the
    forward- and reverse-mode products are not adjoint.
    """
    failures: list[str] = []
    for route, kernels in (
        (Push.JVP, False),
        (Push.JVP, True),
        (Push.DOUBLE_VJP, False),
        (Push.DOUBLE_VJP, True),
    ):
        ref = plain_products(space, f, X, route, kernels)
        gen = torch.Generator(device="cpu").manual_seed(0)
        V = torch.randn(space.num_params, 2, generator=gen, dtype=space.dtype).to(space.device)
        failed = where_it_fails(network, lambda ref=ref, V=V: ref.push(V))
        if failed is not None:
            module, exc = failed
            failures.append(
                f"{route.value} with {'reference' if kernels else 'default'} kernels: "
                f"{type(exc).__name__} in {module}: {str(exc).splitlines()[0][:200]}"
            )
            continue
        _check_adjoint(where, network, space, ref, V, gen)
        how = route.value + (" under the reference kernels" if kernels else "")
        reason = "forward-mode AD" if route is Push.JVP else "reverse mode only (double VJP)"
        if failures:
            reason += f"; not available: {failures[0]}"
        report.add("J·v (reference)", how, reason)
        return ref
    raise ValueError(
        f"{where}: no route computes Jacobian products of network {type(network).__name__}. "
        f"Tried: {' | '.join(failures)}. The operation named has neither a forward-mode "
        "formula nor a twice-differentiable backward (on any kernel torch offers). Replace "
        "that module with an equivalent built from ordinary differentiable ops (e.g. "
        "attention written with matmul and softmax)."
    )


def _check_adjoint(
    where: str,
    network: nn.Module,
    space: ParameterSpace,
    ref: Reference,
    V: Tensor,
    gen: torch.Generator,
) -> None:
    JV = ref.push(V)
    U = torch.randn(JV.shape, generator=gen, dtype=space.dtype).to(space.device)
    JtU = ref.pull(U)
    lhs = (U * JV).sum((0, 1))
    rhs = (JtU * V).sum(0)
    if not agree(lhs, rhs, 100 * tolerance(space.dtype)):
        raise ValueError(
            f"{where}: the forward-mode and reverse-mode derivatives of network "
            f"{type(network).__name__} disagree (⟨u, Jv⟩ = {lhs.tolist()} but ⟨Jᵀu, v⟩ = "
            f"{rhs.tolist()}): a custom autograd.Function or op has inconsistent jvp and "
            "backward formulas, so the Jacobian is not well defined."
        )
