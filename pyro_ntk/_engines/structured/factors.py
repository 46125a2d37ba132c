r"""One chunk's per-layer factors: layer inputs ``A`` and output sensitivities ``B``.

For each factored layer (:mod:`.plan`) at positions :math:`s`,

.. math::

    A_{n,s} = a_s(x_n) \in \mathbb{R}^{d_{in}}, \qquad
    B_{n,o,s} = \partial f_o(x_n) / \partial z_{n,s} \in \mathbb{R}^{d_{out}},

recorded by forward hooks in one forward pass and ``O`` backward passes to the layer outputs
(no weight gradients). A convolution's inputs are stored as unfolded patches of the input
padded as the module pads it (zeros, reflect, replicate or circular; :func:`conv_patches`),
all groups side by side: group ``g`` of a grouped convolution owns columns
``g·d_in … (g+1)·d_in − 1`` of ``A`` and output channels ``g·d_out/G …`` of ``B``. Where the
per-example gradients are cheaper to keep (``O·d_in·d_out`` against ``S·(d_in + O·d_out)``,
e.g. early convolutions), they replace the factors, reduced from each backward pass as it
comes (:mod:`.reduction`); a BatchNorm keeps only them (its ``x̂`` is recorded in place of
the input, :mod:`.norm`); an Embedding keeps its token ids in place of ``A``
(:mod:`.embedding`). Memory per chunk of ``n`` examples:
``n·Σ_l S_l·(d_in + O·d_out)`` floats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_ntk._engines.cached import Closures, build_closures
from pyro_ntk._engines.routes import Routes
from pyro_ntk._engines.structured import norm
from pyro_ntk._engines.structured.plan import Demote, Layer, Plan
from pyro_ntk._engines.structured.reduction import GradientSink


@dataclass(frozen=True)
class LayerFactors:
    r"""The K-FAC factors of one factored layer over the row chunks of the inputs.

    ``∂f_o(x_n)/∂W = Σ_s B[c][n, o, s] A[c][n, s]ᵀ`` for example ``n`` of chunk ``c``
    (``∂f_o/∂b = Σ_s B``).

    Attributes:
        name: the module's name in the network.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        weight: the weight's slice of the flat parameter vector (``None``: not linearized).
        bias: the bias's slice (``None``: no bias or not linearized).
        A: per chunk, the layer inputs ``(n_c, S, d_in)`` (a convolution's unfolded patches).
        B: per chunk, the output sensitivities ``(n_c, O, S, d_out)``.
    """

    name: str
    kind: str
    weight: slice | None
    bias: slice | None
    A: list[Tensor]
    B: list[Tensor]


@dataclass
class Factors:
    """One chunk's factors.

    Per layer either ``A (n, S, d_in)`` and ``B (n, O, S, d_out)``, or (when cheaper, e.g.
    early convolutions whose ``S·(d_in + O·d_out)`` far exceeds ``O·P_l``) the per-example
    gradients themselves, ``wgrads[i] (n, O, d_out·d_in)`` and ``bsums[i] (n, O, d_out)``,
    with ``A[i] = B[i] = None``; an Embedding keeps its token ids ``index[i] (n, S)`` and
    ``B[i]``, with ``A[i] = None`` (so :func:`layer_factors` never reports it).
    """

    A: list[Tensor | None]
    B: list[Tensor | None]
    generic: Closures | None
    bsums: list[Tensor | None]
    wgrads: list[Tensor | None]
    aexts: list[Tensor | None]  # [A | 1] (n, d_in + 1) for the fused weight-and-bias path
    groups: list[int]  # per layer, the convolution's groups (1 for Linear)
    index: list[Tensor | None]  # per layer, an Embedding's token ids (n, S) (:mod:`.embedding`)

    def bsum(self, i: int) -> Tensor:
        """``Σ_s B`` of layer ``i``, shape ``(n, O, d_out)`` (the bias gradients)."""
        if self.bsums[i] is None:
            self.bsums[i] = self.B[i].sum(2)
        return self.bsums[i]

    def wgrad(self, i: int) -> Tensor:
        """Per-example weight gradients of layer ``i``, ``(n, O, d_out·d_in)``."""
        if self.wgrads[i] is not None:
            return self.wgrads[i]
        return weight_grads(self.A[i], self.B[i], self.groups[i])


def weight_grads(A: Tensor, B: Tensor, groups: int = 1) -> Tensor:
    """Per-example weight gradients ``Σ_s B_s A_sᵀ`` per group, shape ``(n, O, d_out·d_in)``.

    ``A (n, S, G·d_in)``, ``B (n, O, S, d_out)``; the result is laid out as the flattened
    weight ``(d_out, d_in, …)`` (group ``g``'s block of output channels against its own
    input columns). Cost ``n·O·S·d_out·d_in``.
    """
    n, O, S, d_out = B.shape
    if groups == 1:
        G = torch.bmm(B.permute(0, 1, 3, 2).reshape(n, O * d_out, S), A)  # (n, O·d_out, d_in)
        return G.reshape(n, O, -1)
    Bg = B.reshape(n, O, S, groups, d_out // groups)
    Ag = A.reshape(n, S, groups, -1)
    return torch.einsum("nosgj,nsgi->nogji", Bg, Ag).reshape(n, O, -1)


def conv_patches(layer: Layer, a: Tensor) -> Tensor:
    """The patches ``(n, S, G·d_in)`` of a convolution's input ``a``, channel-major per row.

    The input is padded per side with the module's padding mode, then read through one
    strided view ``(n, H_o, W_o, C, k_h, k_w)`` (stride and dilation in its strides) and
    copied once; a ``Conv1d`` is a height-1 image. Same values and order as ``F.unfold``,
    measured 10× faster than it on this CPU (2 threads, a 128×16×32×32 input). Memory
    ``n·S·G·d_in`` floats.
    """
    m = layer.module
    left, right, top, bottom = layer.pads
    one_d = layer.kind == "conv1d"
    if any(layer.pads):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        a = F.pad(a, (left, right) if one_d else (left, right, top, bottom), mode=mode)
    if one_d:
        a = a.unsqueeze(2)
        kernel, dilation, stride = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
    else:
        kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
    n, C, H, W = a.shape
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    tn, tc, th, tw = a.stride()
    view = a.as_strided(
        (n, Ho, Wo, C, kh, kw), (tn, th * sh, tw * sw, tc, th * dh, tw * dw), a.storage_offset()
    )
    return view.reshape(n, Ho * Wo, C * kh * kw)


def fast_layout(layer: Layer, A: Tensor | None, B: Tensor | None) -> bool:
    """The single-position, single-output path whose products keep V's own layout."""
    return (
        A is not None
        and layer.weight is not None
        and layer.groups == 1
        and A.shape[1] == 1
        and B.shape[1] == 1
        and A.shape[2] <= B.shape[3]
    )


def prefer_gradients(S: int, d_in: int, d_out: int, O: int, groups: int = 1) -> bool:
    """Keep per-example gradients instead of factors: half the work and no more memory.

    ``d_in`` is per group (``P_W = d_out·d_in``). Per example and column, factors cost
    ``S·(P_W + O·d_out)`` multiply-adds per product and hold ``S·(G·d_in + O·d_out)``
    floats; gradients cost and hold ``O·P_W``.
    """
    P_W = d_in * d_out
    factored_work = S * (P_W + O * d_out)
    gradient = O * P_W
    return 2 * gradient <= factored_work and gradient <= S * (groups * d_in + O * d_out)


def _sink(layer: Layer, source: Tensor, n: int, O: int) -> GradientSink | None:
    """Where the layer's gradients are reduced pass by pass (``None``: it keeps ``A``, ``B``).

    Every BatchNorm, and a convolution whose gradients :func:`prefer_gradients`.
    """
    if layer.kind == "batchnorm":
        return GradientSink(layer, source, n, O)
    if layer.spatial_dims and prefer_gradients(
        source.shape[1], layer.d_in, layer.d_out, O, layer.groups
    ):
        return GradientSink(layer, source, n, O)
    return None


def build_factors(
    plan: Plan,
    f: Callable[[dict[str, Tensor], Tensor], Tensor],
    theta: dict[str, Tensor],
    routes: Routes,
    network: nn.Module,
    X: Tensor,
) -> tuple[Factors, int]:
    """The factors of chunk ``X`` and the bytes they hold.

    Raises :class:`Demote` for a layer that does not run once, as a module, on the examples
    in its established dimension.
    """
    n = X.shape[0]
    layers = plan.layers
    inputs: list[list[Tensor]] = [[] for _ in layers]
    outputs: list[list[Tensor]] = [[] for _ in layers]
    bad: dict[str, str] = {}
    if layers and torch.nn.modules.module._global_forward_hooks:
        # global forward hooks run before a module's own, so the output recorded below
        # could already be transformed: the generic path is exact for any hook
        raise Demote({layer.module_name: "a global forward hook is registered" for layer in layers})

    versions: list[int] = [0] * len(layers)
    guard = routes.inplace

    def hook_for(i: int, layer: Layer):
        def hook(module, args, out):
            a = args[0] if args else None
            b = layer.batch_dim
            if (
                b is None
                or not isinstance(a, Tensor)
                or a.dim() < (1 if layer.kind == "embedding" else 2)
                or a.dim() <= b
                or a.shape[b] != n
                or not layer.fits(b, a.dim())
            ):
                bad[layer.module_name] = (
                    "its input's example dimension was not established"
                    if b is None
                    else f"its input does not carry the {n} examples in dim {b}"
                )
                return None
            if layer.kind == "batchnorm":
                problem = norm.eval_problem(module)
                if problem is not None:
                    bad[layer.module_name] = problem
                    return None
                a = norm.normalized(module, a)  # x̂ at θ*: what γ multiplies
            inputs[i].append(a.detach())
            versions[i] = a._version
            z = out if out.requires_grad else out.detach().requires_grad_()
            outputs[i].append(z)
            # an in-place op downstream (ReLU(inplace=True)) must not rewrite the recorded
            # z, nor hit a leaf: hand the rest of the network a copy
            return z.clone() if guard else z

        return hook

    # prepend: record the layer's own output z before any user forward hook transforms
    # it, so autograd's ∂f/∂z below includes the user's hook (its chain factor)
    handles = [
        layer.module.register_forward_hook(hook_for(i, layer), prepend=True)
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.enable_grad():
            out = f(theta, X)
    finally:
        for h in handles:
            h.remove()
    for i, (layer, calls) in enumerate(zip(layers, inputs)):
        if layer.module_name in bad:
            continue
        if len(calls) != 1:
            bad[layer.module_name] = (
                f"the module ran {len(calls)} times in one forward pass (weight sharing)"
                if calls
                else "the module never ran as a module (its weights are used directly)"
            )
        elif calls[0]._version != versions[i]:
            bad[layer.module_name] = "its input is overwritten in place later in the forward"
    if bad:
        raise Demote(bad)

    O = out.shape[1]
    zs = [o[0] for o in outputs]
    # per layer: the patches of a convolution; a sink where gradients are reduced per pass
    sources = [
        conv_patches(lay, a[0]) if lay.spatial_dims else a[0] for lay, a in zip(layers, inputs)
    ]
    sinks = [_sink(lay, src, n, O) for lay, src in zip(layers, sources)]
    sens: list[list[Tensor]] = [[] for _ in layers]
    for a in inputs:
        a.clear()
    if zs:
        for o in range(O):
            with torch.enable_grad():  # callers may run under no_grad (linear_operator)
                grads = torch.autograd.grad(
                    out[:, o].sum(), zs, retain_graph=o < O - 1, allow_unused=True
                )
            for i, g in enumerate(grads):
                g = torch.zeros_like(zs[i]) if g is None else g.detach()
                if sinks[i] is not None:
                    sinks[i].add(o, g)
                else:
                    sens[i].append(g.movedim(layers[i].batch_dim, 0))
    A_list, B_list, wgrads, bsums, aexts = [], [], [], [], []
    index: list[Tensor | None] = []
    for layer, src, sink, b in zip(layers, sources, sinks, sens):
        if layer.kind == "embedding":  # token ids (n, S) and B (n, O, S, d); no A
            ids = src.movedim(layer.batch_dim, 0).reshape(n, -1)
            index.append(ids)
            B_list.append(torch.stack(b, dim=1).reshape(n, O, ids.shape[1], layer.d_out))
            b.clear()
            A_list.append(None)
            wgrads.append(None)
            bsums.append(None)
            aexts.append(None)
            continue
        index.append(None)
        if sink is not None:  # per-example gradients, reduced pass by pass
            wgrads.append(sink.wgrad)
            bsums.append(sink.bsum)
            A_list.append(None)
            B_list.append(None)
            aexts.append(None)
            continue
        if layer.spatial_dims:  # a convolution: ∂f/∂z is channel-major (n, O, C_out, S)
            A = src
            B = torch.stack(b, dim=1).reshape(n, O, layer.d_out, A.shape[1])
            B = B.transpose(2, 3).contiguous()  # (n, O, S, C_out)
        else:
            A = src.movedim(layer.batch_dim, 0).reshape(n, -1, layer.d_in)
            B = torch.stack(b, dim=1).reshape(n, O, -1, layer.d_out)
        b.clear()
        if prefer_gradients(A.shape[1], layer.d_in, B.shape[3], O, layer.groups):
            wgrads.append(weight_grads(A, B, layer.groups) if layer.weight is not None else None)
            bsums.append(B.sum(2) if layer.bias is not None else None)
            A, B = None, None
        else:
            wgrads.append(None)
            bsums.append(None)
        aext = None
        if fast_layout(layer, A, B) and layer.bias is not None:
            # [A | 1]: the bias rides along in the weight's matrix product
            d_in = A.shape[2]
            aext = A.new_empty(n, d_in + 1)
            aext[:, :d_in] = A.reshape(n, d_in)
            aext[:, d_in] = 1.0
            A = aext[:, None, :d_in]
        aexts.append(aext)
        A_list.append(A)
        B_list.append(B)
    held = [t for t in A_list + B_list + wgrads + bsums + aexts + index if t is not None]
    nbytes = sum(t.numel() * t.element_size() for t in held)
    generic = None
    if plan.generic:

        def fn(p: dict[str, Tensor]) -> Tensor:
            return f({**theta, **p}, X)

        generic, extra = build_closures(fn, {g: theta[g] for g in plan.generic}, routes, network)
        nbytes += extra
    groups = [layer.groups for layer in layers]
    return Factors(A_list, B_list, generic, bsums, wgrads, aexts, groups, index), nbytes


def layer_factors(plan: Plan, chunks: list[Factors]) -> list[LayerFactors]:
    """The layers of ``plan`` whose factors ``A`` and ``B`` every chunk of ``chunks`` keeps."""
    out = []
    for i, layer in enumerate(plan.layers):
        if layer.groups == 1 and all(c.A[i] is not None and c.B[i] is not None for c in chunks):
            out.append(
                LayerFactors(
                    name=layer.module_name,
                    kind=layer.kind,
                    weight=layer.w_slice,
                    bias=layer.b_slice,
                    A=[c.A[i] for c in chunks],
                    B=[c.B[i] for c in chunks],
                )
            )
    return out
