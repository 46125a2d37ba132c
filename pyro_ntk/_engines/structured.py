r"""The structured engine: per-layer factors of nn.Linear and nn.Conv2d, cached per chunk.

For a layer :math:`z = W a + b` applied at positions :math:`s` (one position for a plain
Linear layer, the output pixels for a convolution, whose :math:`a_s` are the input patches),
the per-example gradient of output :math:`f_o(x_n)` is a sum of outer products of the layer
input :math:`A_{n,s}` and the output sensitivity :math:`B_{n,o,s} = \partial f_o(x_n)/\partial z_{n,s}`:

.. math::

    \frac{\partial f_o(x_n)}{\partial W} = \sum_s B_{n,o,s} A_{n,s}^\top, \qquad
    \frac{\partial f_o(x_n)}{\partial b} = \sum_s B_{n,o,s}.

With :math:`A` and :math:`B` cached (one forward pass and ``O`` backward passes per chunk),
every product is a pair of forward-sized matrix products per layer:

.. math::

    (J V)_{n,o} = \sum_l \sum_s B_{n,o,s}^\top (V_W A_{n,s} + V_b), \qquad
    J^\top U = \sum_{n,o} U_{n,o} \sum_s B_{n,o,s} A_{n,s}^\top,

and the dense kernel of plain Linear layers needs no Jacobian at all:

.. math::

    K_l = \big(\sigma_W^2 A_1 A_2^\top + \sigma_b^2\big) \odot \big(B_1 B_2^\top\big).

Parameters outside such layers (normalization, embeddings, custom modules) and layers the
engine cannot factor (a module called more than once, a weight shared between modules, a
grouped or non-zero-padded convolution) go through the cached ``torch.func`` closures of
:mod:`pyro_ntk._engines.cached`, restricted to those parameters, in the same product.

Nothing about the layout is guessed. The preflight establishes, for each layer, which
dimension of its input carries the examples (the one dimension whose size follows the
number of examples when the network runs on 2 and on 3 of them; a sequence-first ``(T, N,
d)`` input has it at dim 1), and proves the factored products against the generic route on
those examples. A layer whose example dimension cannot be established (an input that does
not depend on the batch, such as a learned latent array; examples merged with another
dimension) or whose products disagree is demoted to the generic path, with the reason
recorded in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_ntk._engines._cache import DEFAULT_CACHE_BYTES, ChunkCache
from pyro_ntk._engines.base import Engine
from pyro_ntk._engines.cached import Closures, build_closures, push
from pyro_ntk._engines.preflight import (
    Reference,
    Report,
    agree,
    probe_rows,
    relative_error,
    tolerance,
)
from pyro_ntk._engines.routes import dense_rows, pull_columns
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


@dataclass
class Factors:
    """One chunk's factors.

    Per layer either ``A (n, S, d_in)`` and ``B (n, O, S, d_out)``, or (when cheaper, e.g.
    early convolutions whose ``S·(d_in + O·d_out)`` far exceeds ``O·P_l``) the per-example
    gradients themselves, ``wgrads[i] (n, O, d_out·d_in)`` and ``bsums[i] (n, O, d_out)``,
    with ``A[i] = B[i] = None``.
    """

    A: list[Tensor | None]
    B: list[Tensor | None]
    generic: Closures | None
    bsums: list[Tensor | None]
    wgrads: list[Tensor | None]
    aexts: list[Tensor | None]  # [A | 1] (n, d_in + 1) for the fused weight-and-bias path

    def bsum(self, i: int) -> Tensor:
        """``Σ_s B`` of layer ``i``, shape ``(n, O, d_out)`` (the bias gradients)."""
        if self.bsums[i] is None:
            self.bsums[i] = self.B[i].sum(2)
        return self.bsums[i]

    def wgrad(self, i: int) -> Tensor:
        """Per-example weight gradients of layer ``i``, ``(n, O, d_out·d_in)``."""
        if self.wgrads[i] is not None:
            return self.wgrads[i]
        return weight_grads(self.A[i], self.B[i])


def weight_grads(A: Tensor, B: Tensor) -> Tensor:
    """Per-example weight gradients ``Σ_s B_s A_sᵀ``, shape ``(n, O, d_out·d_in)``."""
    n, O, S, d_out = B.shape
    G = torch.bmm(B.permute(0, 1, 3, 2).reshape(n, O * d_out, S), A)  # (n, O·d_out, d_in)
    return G.reshape(n, O, -1)


def rowwise(a: Tensor, T: Tensor) -> Tensor:
    """``out[n, 0, j] = Σ_i a[n, i] T[n, i, j]``: ``a (n, d)``, ``T (n, d, k)`` → ``(n, 1, k)``.

    One column (a CG iteration) is a row-wise dot product, which ``linalg.vecdot`` streams
    about 3× faster than ``bmm``'s batch of ``n`` tiny ``1×d·d×1`` products (measured here
    at n = 2000, d = 257); several columns keep ``bmm``.
    """
    n, d, k = T.shape
    if k == 1:
        return torch.linalg.vecdot(a, T.reshape(n, d)).reshape(n, 1, 1)
    return torch.bmm(a.reshape(n, 1, d), T)


def contract_outputs(B: Tensor, dz: Tensor) -> Tensor:
    """``out[n, o, k] = Σ_j B[n, o, j] dz[n, j, k]``: ``B (n, O, m)``, ``dz (n, m, k)``.

    One column streams as a row-wise dot product (``linalg.vecdot``), measured 7× faster
    than ``bmm``'s batch of ``n`` small ``O×m·m×1`` products at n = 512, O = 10, m = 256.
    """
    n, O, m = B.shape
    if dz.shape[2] == 1:
        return torch.linalg.vecdot(B, dz.reshape(n, 1, m)).unsqueeze(-1)
    return torch.bmm(B, dz)


def spread_outputs(B: Tensor, U: Tensor) -> Tensor:
    """``G[n, j, k] = Σ_o B[n, o, j] U[n, o, k]``: ``B (n, O, m)``, ``U (n, O, k)``.

    One column is an elementwise product summed over outputs (measured 6× faster than
    ``bmm`` at n = 512, O = 10, m = 256).
    """
    if U.shape[2] == 1:
        return (B * U).sum(1).unsqueeze(-1)
    return torch.bmm(B.transpose(1, 2), U)


def _fast(layer: Layer, A: Tensor | None, B: Tensor | None) -> bool:
    """The single-position, single-output path whose products keep V's own layout."""
    return (
        A is not None
        and layer.weight is not None
        and A.shape[1] == 1
        and B.shape[1] == 1
        and A.shape[2] <= B.shape[3]
    )


def prefer_gradients(S: int, d_in: int, d_out: int, O: int) -> bool:
    """Keep per-example gradients instead of factors: half the work and no more memory.

    Per example and column, factors cost ``S·(d_in·d_out + O·d_out)`` multiply-adds per
    product and hold ``S·(d_in + O·d_out)`` floats; gradients cost and hold ``O·d_in·d_out``.
    """
    factored_work = S * (d_in * d_out + O * d_out)
    gradient = O * d_in * d_out
    return 2 * gradient <= factored_work and gradient <= S * (d_in + O * d_out)


def _example_dim(two: tuple[int, ...], three: tuple[int, ...]) -> int | None:
    """The one dimension that is 2 with 2 examples and 3 with 3 (all others equal), or None."""
    if len(two) != len(three):
        return None
    changed = [d for d, (p, q) in enumerate(zip(two, three)) if p != q]
    if len(changed) == 1 and two[changed[0]] == 2 and three[changed[0]] == 3:
        return changed[0]
    return None


class _Demote(Exception):
    def __init__(self, reasons: dict[str, str]):
        super().__init__(str(reasons))
        self.reasons = reasons


class StructuredEngine(Engine):
    """Products from cached per-layer factors (Linear, Conv2d) plus a generic remainder.

    Cost per chunk of ``n`` inputs: building the factors is one forward pass and ``O``
    backward passes to the layer outputs (no weight gradients); then each ``jvp`` or
    ``vjp`` is about one forward-sized matrix product per layer for each column, and a
    dense block is ``Σ_l n1·n2·(d_in + O²·d_out)`` for plain Linear layers (per-example
    gradients and one GEMM for convolutions). Memory: the cache holds ``A`` and ``B`` for
    every chunk it has seen, ``n·Σ_l S_l·(d_in + O·d_out)`` floats (convolution inputs are
    stored as unfolded patches), up to ``cache_bytes`` (default 2 GiB); set
    ``engine.cache.max_bytes`` to bound it.

    Args:
        network: the user's network.
        space: the linearized parameter space.
        cache_bytes: budget of the chunk cache (``None``: unbounded).
    """

    name = "structured"
    caches_closures = True

    def __init__(
        self,
        network: nn.Module,
        space: ParameterSpace,
        cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    ):
        super().__init__(network, space)
        self.plan = make_plan(network, space)
        self.cache = ChunkCache(self.space.versions, cache_bytes)

    def clear_cache(self) -> None:
        """Release every cached chunk."""
        self.cache.clear()

    # ------------------------------------------------------------------ factors
    def _demote(self, reasons: dict[str, str]) -> None:
        keep = [layer for layer in self.plan.layers if layer.module_name not in reasons]
        moved = {
            n
            for layer in self.plan.layers
            if layer.module_name in reasons
            for n in (layer.weight, layer.bias)
            if n
        }
        generic = [n for n in self.space.names if n in moved or n in self.plan.generic]
        self.plan = Plan(keep, generic, {**self.plan.reasons, **reasons})
        self.cache.clear()

    # ------------------------------------------------------------------ proof
    def prepare(self, where: str, ref: Reference, report: Report) -> None:
        """Establish each layer's example dimension, prove its factors, then the rest.

        Layers whose example dimension cannot be traced, or whose factored products
        disagree with the generic route on the probe, are demoted (reason in the plan);
        the generic remainder and the dense route are then proven as on every engine.
        """
        self.adopt(ref)
        self._trace_batch_dims(ref.X)
        if self.plan.layers and self._layer_error(ref, None) is not None:
            bad = {}
            for layer in self.plan.layers:
                problem = self._layer_error(ref, layer)
                if problem is not None:
                    bad[layer.module_name] = f"factored products disagree on the probe ({problem})"
            if bad:
                self._demote(bad)
        for layer in self.plan.layers:
            where_b = "" if layer.batch_dim == 0 else f", examples in dim {layer.batch_dim}"
            report.add(
                f"{layer.module_name} ({type(layer.module).__name__})",
                "fast path",
                f"factored {layer.kind}{where_b}; agrees with the generic route on the probe",
            )
        for name, why in self.plan.reasons.items():
            module = dict(self.network.named_modules()).get(name)
            kind = f" ({type(module).__name__})" if module is not None else ""
            report.add(f"{name}{kind}", "generic", why)
        super().prepare(where, ref, report)

    def _trace_batch_dims(self, X: Tensor) -> None:
        """Which dimension of each layer's input follows the number of examples (2 → 3)."""
        layers = self.plan.layers
        seen: list[list[list[tuple[int, ...]]]] = [[[], []] for _ in layers]

        def hook_for(i: int, run: int):
            def hook(module, args, out):
                a = args[0] if args else None
                if isinstance(a, Tensor) and isinstance(out, Tensor):
                    seen[i][run].append((tuple(a.shape), tuple(out.shape)))

            return hook

        for run, n in enumerate((2, 3)):
            Xn = probe_rows(X, n)
            handles = [
                layer.module.register_forward_hook(hook_for(i, run))
                for i, layer in enumerate(layers)
            ]
            try:
                with torch.no_grad():
                    self.f(self.space.theta, Xn)
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
                    f"its examples lie in dim {layer.batch_dim} for one input shape and {b} "
                    "for another"
                )
            else:
                layer.batch_dim = b
        if bad:
            self._demote(bad)

    def _layer_error(self, ref: Reference, layer: Layer | None) -> str | None:
        """How far the factored products of ``layer`` (``None``: all) are from the reference."""
        tol = tolerance(self.space.dtype)
        gen = torch.Generator(device="cpu").manual_seed(3)
        P = self.space.num_params
        V = torch.randn(P, 2, generator=gen, dtype=self.space.dtype).to(self.space.device)
        mask = torch.zeros(P, 1, dtype=V.dtype, device=V.device)
        for one in self.plan.layers if layer is None else [layer]:
            for sl in (one.w_slice, one.b_slice):
                if sl is not None:
                    mask[sl] = 1.0
        V = V * mask
        try:
            got = self.jvp(ref.X, V)
            U = torch.randn(got.shape, generator=gen, dtype=V.dtype).to(V.device)
            pulled = self.vjp(ref.X, U) * mask
        except Exception as exc:  # noqa: BLE001 - the layer is demoted with this reason
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        want = ref.push(V)
        if not agree(got, want, tol):
            return f"J·v off by {relative_error(got, want):.2g}"
        want = ref.pull(U) * mask
        if not agree(pulled, want, tol):
            return f"Jᵀu off by {relative_error(pulled, want):.2g}"
        return None

    def _factors(self, X: Tensor) -> Factors:
        while True:
            try:
                return self.cache.get(X, self._build)
            except _Demote as d:
                self._demote(d.reasons)

    def _build(self, X: Tensor) -> tuple[Factors, int]:
        n = X.shape[0]
        layers = self.plan.layers
        inputs: list[list[Tensor]] = [[] for _ in layers]
        outputs: list[list[Tensor]] = [[] for _ in layers]
        bad: dict[str, str] = {}
        if layers and torch.nn.modules.module._global_forward_hooks:
            # global forward hooks run before a module's own, so the output recorded below
            # could already be transformed: the generic path is exact for any hook
            raise _Demote(
                {layer.module_name: "a global forward hook is registered" for layer in layers}
            )

        versions: list[int] = [0] * len(layers)
        guard = self.routes.inplace

        def hook_for(i: int, layer: Layer):
            def hook(module, args, out):
                a = args[0] if args else None
                b = layer.batch_dim
                if (
                    b is None
                    or not isinstance(a, Tensor)
                    or a.dim() < 2
                    or a.dim() <= b
                    or a.shape[b] != n
                    or (layer.kind == "conv2d" and (a.dim() != 4 or b != 0))
                ):
                    bad[layer.module_name] = (
                        "its input's example dimension was not established"
                        if b is None
                        else f"its input does not carry the {n} examples in dim {b}"
                    )
                    return None
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
                out = self.f(self.space.theta, X)
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
            raise _Demote(bad)

        O = out.shape[1]
        zs = [o[0] for o in outputs]
        sens: list[list[Tensor]] = [[] for _ in layers]
        if zs:
            for o in range(O):
                with torch.enable_grad():  # callers may run under no_grad (linear_operator)
                    grads = torch.autograd.grad(
                        out[:, o].sum(), zs, retain_graph=o < O - 1, allow_unused=True
                    )
                for i, g in enumerate(grads):
                    g = torch.zeros_like(zs[i]) if g is None else g.detach()
                    sens[i].append(g.movedim(layers[i].batch_dim, 0))
        A_list, B_list, wgrads, bsums, aexts = [], [], [], [], []
        for layer, a, b in zip(layers, inputs, sens):
            A, B = self._layer_factors(layer, a[0], torch.stack(b, dim=1), n, O)
            a.clear()
            b.clear()
            if prefer_gradients(A.shape[1], A.shape[2], B.shape[3], O):
                wgrads.append(weight_grads(A, B) if layer.weight is not None else None)
                bsums.append(B.sum(2) if layer.bias is not None else None)
                A, B = None, None
            else:
                wgrads.append(None)
                bsums.append(None)
            aext = None
            if _fast(layer, A, B) and layer.bias is not None:
                # [A | 1]: the bias rides along in the weight's matrix product
                d_in = A.shape[2]
                aext = A.new_empty(n, d_in + 1)
                aext[:, :d_in] = A.reshape(n, d_in)
                aext[:, d_in] = 1.0
                A = aext[:, None, :d_in]
            aexts.append(aext)
            A_list.append(A)
            B_list.append(B)
        held = [t for t in A_list + B_list + wgrads + bsums + aexts if t is not None]
        nbytes = sum(t.numel() * t.element_size() for t in held)
        generic = None
        if self.plan.generic:
            theta = self.space.theta

            def fn(p: dict[str, Tensor]) -> Tensor:
                return self.f({**theta, **p}, X)

            generic, extra = build_closures(
                fn, {g: theta[g] for g in self.plan.generic}, self.routes, self.network
            )
            nbytes += extra
        return Factors(A_list, B_list, generic, bsums, wgrads, aexts), nbytes

    @staticmethod
    def _layer_factors(layer: Layer, a: Tensor, g: Tensor, n: int, O: int):
        """``A (n, S, d_in)`` and ``B (n, O, S, d_out)`` from the input and ``∂f/∂z``."""
        if layer.kind == "linear":
            A = a.movedim(layer.batch_dim, 0).reshape(n, -1, layer.d_in)
            B = g.reshape(n, O, -1, layer.d_out)
            return A, B
        m = layer.module
        patches = F.unfold(
            a, m.kernel_size, dilation=m.dilation, padding=layer.padding, stride=m.stride
        )
        A = patches.transpose(1, 2).contiguous()  # (n, S, C·kh·kw)
        B = g.reshape(n, O, layer.d_out, -1).transpose(2, 3).contiguous()  # (n, O, S, C_out)
        return A, B

    # ------------------------------------------------------------------ products
    def _tangents(self, V: Tensor, names: list[str]) -> dict[str, Tensor]:
        pieces = dict(zip(self.space.names, torch.split(V, self.space.numels, dim=0)))
        shapes = dict(zip(self.space.names, self.space.shapes))
        return {n: pieces[n].T.reshape(-1, *shapes[n]) for n in names}

    def jvp(self, X: Tensor, V: Tensor) -> Tensor:
        fac = self._factors(X)
        k = V.shape[1]
        out = None
        for i, layer in enumerate(self.plan.layers):
            A, B = fac.A[i], fac.B[i]
            if A is None:  # per-example gradients
                part = None
                if layer.weight is not None:
                    Gw = fac.wgrads[i]
                    part = (Gw.reshape(-1, Gw.shape[2]) @ V[layer.w_slice]).reshape(
                        *Gw.shape[:2], k
                    )
                if layer.bias is not None:
                    Gb = fac.bsums[i]
                    pb = (Gb.reshape(-1, Gb.shape[2]) @ V[layer.b_slice]).reshape(*Gb.shape[:2], k)
                    part = pb if part is None else part + pb
                out = part if out is None else out + part
                continue
            n, S, d_in = A.shape
            O, d_out = B.shape[1], B.shape[3]
            if fac.aexts[i] is not None:
                # Σ_i [A | 1]_i (B [W | b])_i: weight and bias in one product
                # Vt = [W | b]ᵀ laid out ((d_in + 1)·k, d_out), written in one copy
                Vt = V.new_empty(d_in + 1, k, d_out)
                Vt[:d_in] = V[layer.w_slice].reshape(d_out, d_in, k).permute(1, 2, 0)
                Vt[d_in] = V[layer.b_slice].T
                Vt = Vt.reshape((d_in + 1) * k, d_out)
                T = B.reshape(n, d_out) @ Vt.T
                part = rowwise(fac.aexts[i], T.reshape(n, d_in + 1, k))
            elif _fast(layer, A, B):
                # Σ_ij A_i B_j W_ji = A · (B W): the intermediate is (n, d_in·k), no transpose
                # (the transposed copy of V's slice makes this the "NT" GEMM of nn.Linear,
                # measured faster than the "NN" one on CPU)
                Vt = V[layer.w_slice].reshape(d_out, d_in * k).T.contiguous()
                T = B.reshape(n, d_out) @ Vt.T
                part = rowwise(A.reshape(n, d_in), T.reshape(n, d_in, k))
                if layer.bias is not None:
                    part = part + (B.reshape(n, d_out) @ V[layer.b_slice]).unsqueeze(1)
            elif layer.weight is not None:
                Wt = V[layer.w_slice].reshape(d_out, d_in, k).permute(1, 0, 2).reshape(d_in, -1)
                dz = (A.reshape(n * S, d_in) @ Wt).reshape(n, S * d_out, k)
                if layer.bias is not None:
                    dz = (dz.reshape(n, S, d_out, k) + V[layer.b_slice]).reshape(n, S * d_out, k)
                part = contract_outputs(B.reshape(n, O, S * d_out), dz)
            else:  # bias only: Σ_s B against the bias tangent
                part = (fac.bsum(i).reshape(n * O, d_out) @ V[layer.b_slice]).reshape(n, O, k)
            out = part if out is None else out + part
        if fac.generic is not None:
            tangents = self._tangents(V, self.plan.generic)
            theta = self.space.theta
            part = push(fac.generic, tangents, lambda p: self.f({**theta, **p}, X), self.routes)
            part = part.permute(1, 2, 0)
            out = part if out is None else out + part
        return out

    def vjp(self, X: Tensor, U: Tensor) -> Tensor:
        fac = self._factors(X)
        n, O, k = U.shape
        pieces: dict[str, Tensor] = {}
        for i, layer in enumerate(self.plan.layers):
            A, B = fac.A[i], fac.B[i]
            if A is None:  # per-example gradients
                if layer.weight is not None:
                    pieces[layer.weight] = fac.wgrads[i].reshape(n * O, -1).T @ U.reshape(n * O, k)
                if layer.bias is not None:
                    pieces[layer.bias] = fac.bsums[i].reshape(n * O, -1).T @ U.reshape(n * O, k)
                continue
            S, d_in, d_out = A.shape[1], A.shape[2], B.shape[3]
            if fac.aexts[i] is not None:
                Ae = fac.aexts[i]
                AU = (Ae.reshape(n, d_in + 1, 1) * U.reshape(n, 1, k)).reshape(n, -1)
                R = (B.reshape(n, d_out).T @ AU).reshape(d_out, d_in + 1, k)
                pieces[layer.weight] = R[:, :d_in].reshape(-1, k)
                pieces[layer.bias] = R[:, d_in]
                continue
            if _fast(layer, A, B):
                # Σ_n B_j (A_i U_k): the product lands in the (d_out, d_in, k) layout of V
                AU = (A.reshape(n, d_in, 1) * U.reshape(n, 1, k)).reshape(n, d_in * k)
                pieces[layer.weight] = (B.reshape(n, d_out).T @ AU).reshape(-1, k)
            elif layer.weight is not None:
                # G[n, s·j, k] = Σ_o B[n, o, s, j] U[n, o, k]
                G = spread_outputs(B.reshape(n, O, S * d_out), U)
                dW = G.reshape(n * S, d_out * k).T @ A.reshape(n * S, d_in)  # (d_out·k, d_in)
                pieces[layer.weight] = dW.reshape(d_out, k, d_in).transpose(1, 2).reshape(-1, k)
            if layer.bias is not None:
                pieces[layer.bias] = fac.bsum(i).reshape(n * O, d_out).T @ U.reshape(n * O, k)
        if fac.generic is not None:
            grads = pull_columns(fac.generic.pullback, U.permute(2, 0, 1), self.routes)
            for name, g in grads.items():
                pieces[name] = g.reshape(k, -1).T
        return torch.cat([pieces[name] for name in self.space.names], dim=0)

    # ------------------------------------------------------------------ dense
    def _generic_jacobian(self, X: Tensor) -> Tensor:
        """Per-example Jacobian of the generic parameters, ``(n, O, P_generic)``."""
        theta = self.space.theta

        def f(p: dict[str, Tensor], Xc: Tensor) -> Tensor:
            return self.f({**theta, **p}, Xc)

        primals = {g: theta[g] for g in self.plan.generic}
        jac = dense_rows(f, primals, X, self.routes.dense)
        lead = next(iter(jac.values())).shape[:2]
        return torch.cat([jac[g].reshape(*lead, -1) for g in self.plan.generic], dim=-1)

    def _generic_scale(self, scale: Tensor | None) -> Tensor | None:
        if scale is None:
            return None
        pieces = dict(zip(self.space.names, torch.split(scale, self.space.numels)))
        return torch.cat([pieces[g] for g in self.plan.generic])

    @staticmethod
    def _uniform(scale: Tensor | None, sl: slice | None) -> Tensor | float | None:
        """The single scale value of a parameter tensor, ``None`` if it varies inside it."""
        if sl is None or scale is None:
            return 1.0
        seg = scale[sl]
        return seg[0] if bool((seg == seg[0]).all()) else None

    def _piece_scales(self, scale: Tensor | None):
        scales = []
        for layer in self.plan.layers:
            sw, sb = self._uniform(scale, layer.w_slice), self._uniform(scale, layer.b_slice)
            if sw is None or sb is None:
                return None
            scales.append((sw, sb))
        return scales

    def jacobian(self, X: Tensor) -> Tensor:
        fac = self._factors(X)
        pieces: dict[str, Tensor] = {}
        for i, layer in enumerate(self.plan.layers):
            if layer.weight is not None:
                pieces[layer.weight] = fac.wgrad(i)
            if layer.bias is not None:
                pieces[layer.bias] = fac.bsum(i)
        if self.plan.generic:
            Jg = self._generic_jacobian(X)
            numel = dict(zip(self.space.names, self.space.numels))
            for name, g in zip(
                self.plan.generic, torch.split(Jg, [numel[g] for g in self.plan.generic], -1)
            ):
                pieces[name] = g
        return torch.cat([pieces[name] for name in self.space.names], dim=-1)

    def ntk_diag(self, X: Tensor, scale: Tensor | None) -> Tensor:
        scales = self._piece_scales(scale)
        if scales is None:
            return super().ntk_diag(X, scale)
        fac = self._factors(X)
        out = None
        for i, (layer, (sw, sb)) in enumerate(zip(self.plan.layers, scales)):
            A, B = fac.A[i], fac.B[i]
            part = 0.0
            if layer.weight is not None:
                if A is not None and A.shape[1] == 1:
                    wn = B.square().sum((2, 3)) * A.square().sum((1, 2)).unsqueeze(1)
                else:
                    wn = fac.wgrad(i).square().sum(-1)
                part = part + sw * wn
            if layer.bias is not None:
                part = part + sb * fac.bsum(i).square().sum(-1)
            out = part if out is None else out + part
        if self.plan.generic:
            Jg = self._generic_jacobian(X).square()
            sg = self._generic_scale(scale)
            part = (Jg * sg).sum(-1) if sg is not None else Jg.sum(-1)
            out = part if out is None else out + part
        return out

    def ntk_block(self, X1: Tensor, X2: Tensor, scale: Tensor | None) -> Tensor:
        scales = self._piece_scales(scale)
        if scales is None:
            return super().ntk_block(X1, X2, scale)
        f1 = self._factors(X1)
        f2 = f1 if X2 is X1 else self._factors(X2)
        K = None
        for i, (layer, (sw, sb)) in enumerate(zip(self.plan.layers, scales)):
            A1, B1, A2, B2 = f1.A[i], f1.B[i], f2.A[i], f2.B[i]
            if A1 is not None and A1.shape[1] == 1:
                n1, O, _, d_out = B1.shape
                n2 = B2.shape[0]
                # K_l = (σ_W² A1 A2ᵀ + σ_b²) ⊙ (B1 B2ᵀ)
                BB = (B1.reshape(n1 * O, d_out) @ B2.reshape(n2 * O, d_out).T).reshape(n1, O, n2, O)
                coef = 0.0
                if layer.weight is not None:
                    coef = sw * (A1.reshape(n1, -1) @ A2.reshape(n2, -1).T)
                if layer.bias is not None:
                    coef = coef + sb
                part = BB * (coef[:, None, :, None] if isinstance(coef, Tensor) else coef)
                part = part.reshape(n1 * O, n2 * O)
            else:
                part = 0.0
                if layer.weight is not None:
                    G1 = f1.wgrad(i)
                    G1 = G1.reshape(-1, G1.shape[2])
                    G2 = G1 if f2 is f1 else f2.wgrad(i).reshape(-1, G1.shape[1])
                    part = sw * (G1 @ G2.T)
                if layer.bias is not None:
                    b1 = f1.bsum(i)
                    b1 = b1.reshape(-1, b1.shape[2])
                    part = part + sb * (b1 @ f2.bsum(i).reshape(-1, b1.shape[1]).T)
            K = part if K is None else K + part
        if self.plan.generic:
            J1 = self._generic_jacobian(X1)
            J2 = J1 if X2 is X1 else self._generic_jacobian(X2)
            sg = self._generic_scale(scale)
            if sg is not None:
                J1 = J1 * sg
            part = torch.einsum("aop,bqp->aobq", J1, J2).reshape(
                J1.shape[0] * J1.shape[1], J2.shape[0] * J2.shape[1]
            )
            K = part if K is None else K + part
        return K
