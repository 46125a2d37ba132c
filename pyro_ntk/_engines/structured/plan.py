"""Which linearized parameters the structured engine factors, and how each layer is laid out.

A layer is factored when it is an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (any stride,
padding, dilation, groups and padding mode), or a BatchNorm with running statistics (a
per-channel diagonal layer in eval mode, :mod:`.norm`), or an ``nn.Embedding`` (a sparse
row lookup, :mod:`.embedding`), whose parameters no other module shares. A
convolution is laid out as a 2-D one (a ``Conv1d`` on a height-1 image), with its input
padded per side exactly as the module pads it (:func:`conv_pads`). Nothing about the layout is guessed: the preflight
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
from pyro_ntk._engines.structured.embedding import embedding_problem
from pyro_ntk._engines.structured.norm import norm_kind
from pyro_ntk.parameters import ParameterSpace


@dataclass
class Layer:
    """A factored layer: where its parameters sit in the flat vector, and its geometry."""

    module_name: str
    module: nn.Module
    kind: str  # "linear", "conv1d", "conv2d", "batchnorm" or "embedding"
    weight: str | None  # flat parameter name, when the weight is linearized
    bias: str | None
    w_slice: slice | None
    b_slice: slice | None
    d_out: int
    d_in: int  # per group: a convolution's ``C_in/groups · kh · kw``; 1 for a BatchNorm;
    # an Embedding's number of rows (its weight is ``(d_in, d_out)``)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # F.pad order: left, right, top, bottom
    padding_mode: str = "zeros"
    groups: int = 1
    batch_dim: int | None = None  # the input's example dimension, established by tracing

    @property
    def spatial_dims(self) -> int:
        """Spatial dimensions of a convolution's input (0 for a Linear layer or a BatchNorm)."""
        return {"conv1d": 1, "conv2d": 2}.get(self.kind, 0)

    def fits(self, batch_dim: int, ndim: int) -> bool:
        """Whether an input of ``ndim`` dims with examples in ``batch_dim`` is one it reads.

        A Linear layer or an Embedding reads any layout; a convolution ``(n, C, *spatial)`` of its own
        rank; a BatchNorm ``(n, C, *spatial)`` of any rank.
        """
        if self.kind in ("linear", "embedding"):
            return True
        if self.kind == "batchnorm":
            return batch_dim == 0 and ndim >= 2
        return batch_dim == 0 and ndim == self.spatial_dims + 2

    @property
    def in_width(self) -> int:
        """Width of one row of ``A``: ``groups · d_in`` (all groups' patches side by side)."""
        return self.groups * self.d_in


@dataclass
class Plan:
    """Which linearized parameters are factored and which go through the generic path."""

    layers: list[Layer]
    generic: list[str]
    reasons: dict[str, str] = field(default_factory=dict)  # module → why it is generic
    patch_gram: bool = True  # whether dense blocks may take the patch-Gram route (.gram)

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
        return Plan(keep, generic, {**self.reasons, **reasons}, self.patch_gram)


class Demote(Exception):
    """Raised while building factors: these layers (module → reason) must go generic."""

    def __init__(self, reasons: dict[str, str]):
        super().__init__(str(reasons))
        self.reasons = reasons


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def conv_pads(m: nn.Conv1d | nn.Conv2d) -> tuple[int, int, int, int]:
    """Per-side padding ``(left, right, top, bottom)`` of a convolution, as a 2-D one.

    ``"same"`` pads ``d·(k−1)`` per dimension, ``⌊d·(k−1)/2⌋`` before and the rest after
    (PyTorch's rule, asymmetric for even ``d·(k−1)``); ``"valid"`` pads nothing.

    >>> conv_pads(nn.Conv2d(1, 1, (2, 3), padding="same"))
    (1, 1, 0, 1)
    """
    pairs = []
    for i, (k, d) in enumerate(zip(m.kernel_size, m.dilation)):
        if isinstance(m.padding, str):
            total = d * (k - 1) if m.padding == "same" else 0
            pairs.append((total // 2, total - total // 2))
        else:
            pairs.append((int(m.padding[i]), int(m.padding[i])))
    if len(pairs) == 1:  # Conv1d: a height-1 image
        pairs = [(0, 0)] + pairs
    (top, bottom), (left, right) = pairs
    return (left, right, top, bottom)


_KINDS = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
}


def _kind(m: nn.Module) -> tuple[str | None, str | None]:
    """The factored kind of a module, or why a layer of a factored type is not factored.

    Stock Linear/Conv1d/Conv2d forwards and stock BatchNorms (:func:`.norm.norm_kind`);
    a subclass of one of these types with its own ``forward`` gets a reason.
    """
    for cls, kind in _KINDS.items():
        if type(m).forward is cls.forward and (
            kind == "linear" or type(m)._conv_forward is cls._conv_forward
        ):
            return kind, None
    if type(m).forward is nn.Embedding.forward and isinstance(m, nn.Embedding):
        why = embedding_problem(m)
        return ("embedding", None) if why is None else (None, why)
    if isinstance(m, (*_KINDS, nn.Embedding)):
        return None, f"a {type(m).__name__} whose forward is not the stock one"
    return norm_kind(m)


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
        kind, why = _kind(m)
        w_name, b_name = _join(mname, "weight"), _join(mname, "bias")
        own = [n for n in (w_name, b_name) if n in selected]
        if kind is None or not own:
            if why is not None and own:
                reasons[mname] = why
            continue
        mine = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]
        if any(owners.get(id(p), 0) > 1 for p in mine):
            reasons[mname] = "a parameter shared with another module"
            continue
        conv = {}
        if kind == "batchnorm":  # a depthwise 1×1 layer of the normalized input
            conv = dict(groups=m.num_features)
        elif kind in ("conv1d", "conv2d"):
            conv = dict(pads=conv_pads(m), padding_mode=m.padding_mode, groups=m.groups)
        if kind == "batchnorm":
            d_out, d_in = m.num_features, 1
        elif kind == "embedding":
            d_out, d_in = m.embedding_dim, m.num_embeddings
        else:
            d_out, d_in = m.weight.shape[0], m.weight[0].numel()
        layers.append(
            Layer(
                module_name=mname,
                module=m,
                kind=kind,
                weight=w_name if w_name in selected else None,
                bias=b_name if b_name in selected else None,
                w_slice=offsets.get(w_name) if w_name in selected else None,
                b_slice=offsets.get(b_name) if b_name in selected else None,
                d_out=d_out,
                d_in=d_in,
                **conv,
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
        last = b == len(a2) - 1 and layer.kind != "embedding"  # ids (n,) are fine
        if b is None or _example_dim(z2, z3) != b or last:
            bad[layer.module_name] = (
                f"its input's example dimension could not be established (input shape "
                f"{a2} at 2 examples, {a3} at 3: "
                + (
                    "no dimension follows the examples, e.g. a learned array)"
                    if a2 == a3
                    else "the examples are merged with another dimension)"
                )
            )
        elif not layer.fits(b, len(a2)):
            bad[layer.module_name] = f"a {layer.kind} layer whose examples lie in dim {b}"
        elif layer.batch_dim is not None and layer.batch_dim != b:
            bad[layer.module_name] = (
                f"its examples lie in dim {layer.batch_dim} for one input shape and {b} for another"
            )
        else:
            layer.batch_dim = b
    return bad
