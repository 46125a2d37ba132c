r"""How a product is computed: the generic routes every engine draws on, and their fallbacks.

A *route* is one way of evaluating a Jacobian product of ``f(θ, X)`` for one chunk:

- **push** (``J V``): forward-mode ``torch.func.jvp``, or reverse mode only (the double-VJP
  identity: ``g(u) = Jᵀu`` is linear in ``u``, so the VJP of ``g`` at ``u = 0`` applied to
  ``v`` is ``J v``), for networks whose ops have no forward-mode formula;
- **columns**: the ``k`` right-hand sides batched by ``vmap``, or a Python loop for ops
  without a batching rule;
- **jacobian** (dense per-example rows): ``vmap`` over examples of ``jacrev``, ``jacrev`` of
  the whole chunk (``n·O`` cotangents through one pullback; exact because examples are
  independent), or a loop over examples;
- **kernels**: torch's default kernels, or the reference kernels (the multi-head-attention
  fast path off, ``scaled_dot_product_attention`` on its math backend, oneDNN and cuDNN off), which
  compute the same function with ops that have forward-mode and double-backward formulas.

Which route an engine uses is decided once per input signature by
:mod:`pyro_ntk._engines.preflight`, which runs each candidate on a few examples and keeps
the first that agrees with the plain reference (no ``vmap``, no cache, no structure).
"""

from __future__ import annotations

import contextlib
import enum
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map


class Push(str, enum.Enum):
    """How ``J V`` is evaluated."""

    JVP = "jvp"
    """Forward-mode AD (``torch.func.jvp``): about 2–3 forward passes."""

    DOUBLE_VJP = "double_vjp"
    """Reverse mode only: the VJP of ``u ↦ Jᵀu``; about 2 backward passes."""


class Dense(str, enum.Enum):
    """How the per-example Jacobian rows of a chunk are evaluated."""

    PER_EXAMPLE = "per_example"
    """``vmap`` over examples of ``jacrev`` of one example: ``O`` backward passes each."""

    BATCHED = "batched"
    """``jacrev`` of the whole chunk: ``n·O`` cotangents through one pullback (``vmap``-ed)."""

    LOOP = "loop"
    """A Python loop over examples and outputs: slow, nothing batched."""


@dataclass
class Routes:
    """The routes an engine uses (decided by the preflight; defaults are the fast ones)."""

    push: Push = Push.JVP
    vmap_columns: bool = True
    dense: Dense = Dense.PER_EXAMPLE
    reference_kernels: bool = False
    cache_linearize: bool = True
    """Whether cached engines may keep a ``torch.func.linearize`` closure (the cheapest
    tangent pass); off when the forward has in-place or random ops, whose replay drifts."""
    inplace: bool = True
    """Whether the forward may run in-place ops (then recorded layer outputs are guarded by
    a copy); the preflight clears it when it saw none."""


@contextlib.contextmanager
def reference_kernels(enabled: bool = True) -> Iterator[None]:
    """Evaluate with kernels that have forward-mode and double-backward formulas.

    Turns off the ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast path
    (``torch.backends.mha``), pins ``scaled_dot_product_attention`` to its math backend and
    turns oneDNN (mkldnn) and cuDNN off, restoring every switch afterwards: CPU LSTMs leave
    oneDNN's fused layer (no forward-mode formula), CUDA RNNs leave cuDNN's (not
    differentiable twice). The function computed is the same; only the kernels differ
    (observed agreement ~1e-16 in float64 on CPU). On a GPU the price is cuDNN's speed for
    every convolution of a network that needs these kernels.
    """
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            # torch's mkldnn.flags() warns about TF32 on Intel GPUs when it toggles oneDNN
            warnings.filterwarnings("ignore", message=".*TF32 acceleration.*")
            with (
                sdpa_kernel(SDPBackend.MATH),
                torch.backends.mkldnn.flags(enabled=False),
                torch.backends.cudnn.flags(enabled=False),
            ):
                yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matmuls (restored afterwards).

    The preflight compares two routes to the same number; with TF32 (cuDNN's default for
    float32 convolutions) each carries ~1e-3 relative error, as large as the float32
    tolerance, so its comparisons run in full float32 precision. No effect on CPU.
    """
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul


def columns(fn: Callable, batch: object, use_vmap: bool) -> object:
    """``fn`` over the leading dimension of every leaf of ``batch``: ``vmap`` or a loop.

    A single column is a plain call: the loop route's function, without ``vmap``'s batching
    overhead (``torch.func`` vjp+jvp of ``bench_engine.resnet_small`` at N = 128: 0.9–1.3 s
    plain against 1.8 s under ``vmap``; 2-core CPU, 2026-12-05).
    """
    k = tree_flatten(batch)[0][0].shape[0]
    if use_vmap and k != 1:
        return vmap(fn)(batch)
    outs = [fn(tree_map(lambda t, i=i: t[i], batch)) for i in range(k)]
    return tree_map(lambda *parts: torch.stack(parts), *outs)


def double_vjp(fn: Callable, primals: dict[str, Tensor]) -> tuple[Tensor, Callable, Callable]:
    """The output, the pullback ``u ↦ Jᵀu`` and the pushforward ``v ↦ J v`` by reverse mode.

    Both closures keep their graphs, so later products replay them (cost about one backward
    pass each).
    """
    out, pullback = vjp(fn, primals)
    _, pull_of_pull = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))
    return out, pullback, lambda t: pull_of_pull(t)[0]


def push_columns(
    fn: Callable, primals: dict[str, Tensor], tangents: dict[str, Tensor], routes: Routes
) -> Tensor:
    """``J V`` for tangents ``{name: (k, *shape)}`` by the chosen push route, ``(k, n, O)``."""
    if routes.push is Push.JVP:
        return columns(lambda t: jvp(fn, (primals,), (t,))[1], tangents, routes.vmap_columns)
    _, _, push = double_vjp(fn, primals)
    return columns(push, tangents, routes.vmap_columns)


def pull_columns(pullback: Callable, U: Tensor, routes: Routes) -> dict[str, Tensor]:
    """``Jᵀ U`` for cotangents ``U (k, n, O)`` through a pullback, ``{name: (k, *shape)}``."""
    return columns(lambda u: pullback(u)[0], U, routes.vmap_columns)


def dense_rows(
    f: Callable[[dict[str, Tensor], Tensor], Tensor],
    primals: dict[str, Tensor],
    X: Tensor,
    how: Dense,
) -> dict[str, Tensor]:
    """Per-example Jacobian rows ``{name: (n, O, *shape)}`` of ``f(θ, X) (n, O)``."""
    if how is Dense.PER_EXAMPLE:

        def single(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return f(p, x.unsqueeze(0)).reshape(-1)

        return vmap(jacrev(single), in_dims=(None, 0))(primals, X)
    if how is Dense.BATCHED:
        # d f(θ, X)[n, o] / dθ for all (n, o) at once; rows of other examples are zero-free
        # because each row depends on its own example only (checked by the preflight)
        return jacrev(lambda p: f(p, X))(primals)
    rows: dict[str, list[Tensor]] = {name: [] for name in primals}
    for x in X:
        p = {name: t.detach().requires_grad_(True) for name, t in primals.items()}
        with torch.enable_grad():
            out = f(p, x.unsqueeze(0)).reshape(-1)
            per_output = [
                torch.autograd.grad(out[o], list(p.values()), retain_graph=True, allow_unused=True)
                for o in range(out.shape[0])
            ]
        for j, (name, t) in enumerate(p.items()):
            rows[name].append(
                torch.stack([torch.zeros_like(t) if g[j] is None else g[j] for g in per_output])
            )
    return {name: torch.stack(r) for name, r in rows.items()}
