"""Which linearized parameters the structured engine factors, and how each layer is laid out.

A layer is factored when it is an ``nn.Linear`` or ``nn.Conv2d`` (zero padding, one group)
whose parameters no other module shares. Nothing about the layout is guessed: the preflight
establishes, for each layer, which dimension of its input carries the examples (the one
dimension whose size follows the number of examples when the network runs on 2 and on 3 of
them; a sequence-first ``(T, N, d)`` input has it at dim 1). A layer whose example
dimension cannot be established (an input that does not depend on the batch, such as a
learned latent array; examples merged with another dimension) is demoted to the generic
path, with the reason recorded in the plan. Cost: two forward passes on 2 and 3 examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pyro_ntk._engines.preflight import probe_rows
from pyro_ntk.parameters import ParameterSpace


@dataclass
class Layer:
    """A factored layer: where its parameters sit in the flat vector, and its geometry."""

    module_name: str
    module: nn.Module
    kind: str  # "linear" or "conv2d"
    weight: str | None  # flat parameter name, when the weight is linearized
    bias: str | None
    w_slice: slice | None
    b_slice: slice | None
    d_out: int
    d_in: int
    padding: tuple[int, int] = (0, 0)
    batch_dim: int | None = None  # the input's example dimension, established by tracing


@dataclass
class Plan:
    """Which linearized parameters are factored and which go through the generic path."""

    layers: list[Layer]
    generic: list[str]
    reasons: dict[str, str] = field(default_factory=dict)  # module → why it is generic

    def structured_fraction(self, space: ParameterSpace) -> float:
        """Share of ``P`` held by factored layers."""
        numel = dict(zip(space.names, space.numels))
        generic = sum(numel[n] for n in self.generic)
        return 1.0 - generic / space.num_params

    def without(self, reasons: dict[str, str], space: ParameterSpace) -> Plan:
        """The plan with the layers named in ``reasons`` moved to the generic path."""
        keep = [layer for layer in self.layers if layer.module_name not in reasons]
        moved = {
            n
            for layer in self.layers
            if layer.module_name in reasons
            for n in (layer.weight, layer.bias)
            if n
        }
        generic = [n for n in space.names if n in moved or n in self.generic]
        return Plan(keep, generic, {**self.reasons, **reasons})


class Demote(Exception):
    """Raised while building factors: these layers (module → reason) must go generic."""

    def __init__(self, reasons: dict[str, str]):
        super().__init__(str(reasons))
        self.reasons = reasons


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None  # asymmetric "same" padding
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(m.padding[0]), int(m.padding[1]))


def make_plan(network: nn.Module, space: ParameterSpace) -> Plan:
    """Split the linearized parameters into factored layers and generic parameters."""
    selected = set(space.names)
    offsets, start = {}, 0
    for n, k in zip(space.names, space.numels):
        offsets[n] = slice(start, start + k)
        start += k
    owners: dict[int, int] = {}
    for _, p in network.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    layers, reasons, taken = [], {}, set()
    for mname, m in network.named_modules():
        if type(m).forward is nn.Linear.forward:
            kind = "linear"
        elif type(m).forward is nn.Conv2d.forward:
            kind = "conv2d"
        else:
            continue
        w_name, b_name = _join(mname, "weight"), _join(mname, "bias")
        own = [n for n in (w_name, b_name) if n in selected]
        if not own:
            continue
        mine = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]
        padding = (0, 0)
        why = None
        if any(owners.get(id(p), 0) > 1 for p in mine):
            why = "a parameter shared with another module"
        elif kind == "conv2d":
            pad = _conv_padding(m)
            if m.groups != 1:
                why = f"groups={m.groups}"
            elif m.padding_mode != "zeros":
                why = f"padding_mode={m.padding_mode!r}"
            elif pad is None:
                why = "asymmetric 'same' padding"
            else:
                padding = pad
        if why is not None:
            reasons[mname] = why
            continue
        weight = m.weight
        layers.append(
            Layer(
                module_name=mname,
                module=m,
                kind=kind,
                weight=w_name if w_name in selected else None,
                bias=b_name if b_name in selected else None,
                w_slice=offsets.get(w_name) if w_name in selected else None,
                b_slice=offsets.get(b_name) if b_name in selected else None,
                d_out=weight.shape[0],
                d_in=weight[0].numel(),
                padding=padding,
            )
        )
        taken.update(own)
    generic = [n for n in space.names if n not in taken]
    return Plan(layers, generic, reasons)


def _example_dim(two: tuple[int, ...], three: tuple[int, ...]) -> int | None:
    """The one dimension that is 2 with 2 examples and 3 with 3 (all others equal), or None."""
    if len(two) != len(three):
        return None
    changed = [d for d, (p, q) in enumerate(zip(two, three)) if p != q]
    if len(changed) == 1 and two[changed[0]] == 2 and three[changed[0]] == 3:
        return changed[0]
    return None


def trace_batch_dims(
    layers: list[Layer], run: Callable[[Tensor], object], X: Tensor
) -> dict[str, str]:
    """Set each layer's ``batch_dim``: the input dimension that follows the examples (2 → 3).

    ``run(Xn)`` evaluates the network on ``Xn``. Returns the layers (module → reason) whose
    example dimension cannot be established; they must be demoted.
    """
    seen: list[list[list[tuple[int, ...]]]] = [[[], []] for _ in layers]

    def hook_for(i: int, rep: int):
        def hook(module, args, out):
            a = args[0] if args else None
            if isinstance(a, Tensor) and isinstance(out, Tensor):
                seen[i][rep].append((tuple(a.shape), tuple(out.shape)))

        return hook

    for rep, n in enumerate((2, 3)):
        Xn = probe_rows(X, n)
        handles = [
            layer.module.register_forward_hook(hook_for(i, rep)) for i, layer in enumerate(layers)
        ]
        try:
            with torch.no_grad():
                run(Xn)
        finally:
            for h in handles:
                h.remove()
    bad = {}
    for layer, (two, three) in zip(layers, seen):
        if len(two) != 1 or len(three) != 1:
            bad[layer.module_name] = (
                f"the module ran {len(two)} times in one forward pass (weight sharing)"
                if two
                else "the module never ran as a module (its weights are used directly)"
            )
            continue
        (a2, z2), (a3, z3) = two[0], three[0]
        b = _example_dim(a2, a3) if len(a2) == len(a3) else None
        if b is None or _example_dim(z2, z3) != b or b == len(a2) - 1:
            bad[layer.module_name] = (
                f"its input's example dimension could not be established (input shape "
                f"{a2} at 2 examples, {a3} at 3: "
                + (
                    "no dimension follows the examples, e.g. a learned array)"
                    if a2 == a3
                    else "the examples are merged with another dimension)"
                )
            )
        elif layer.kind == "conv2d" and (b != 0 or len(a2) != 4):
            bad[layer.module_name] = f"a convolution whose examples lie in dim {b}"
        elif layer.batch_dim is not None and layer.batch_dim != b:
            bad[layer.module_name] = (
                f"its examples lie in dim {layer.batch_dim} for one input shape and {b} for another"
            )
        else:
            layer.batch_dim = b
    return bad
