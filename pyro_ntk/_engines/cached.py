r"""The cached generic engine: one primal pass per (chunk, θ*), reused by every product.

For each chunk ``X`` the engine keeps the reverse-mode closure of ``torch.func.vjp`` (the
saved activations) and the forward-mode function of ``torch.func.linearize`` (a traced
graph of the tangent pass with the primal values folded in). Every later product on the
same rows — each iteration of a CG solve — only runs the tangent or cotangent pass:

.. math::

    J(X)^\top U = \mathrm{pullback}_X(U), \qquad J(X)\, V = \mathrm{linearized}_X(V),

both ``vmap``-ed over the ``k`` columns. ``linearize`` folds the primal computation into
constants and replays whatever in-place or random op it could not fold on every call, so
its answer drifts after the first call on networks with such ops (ATen's RNN cells,
non-idempotent in-place activations): it is used only when the preflight saw no such op
and the closure reproduced the reference products three times. Otherwise the forward-mode
half is the cached double-VJP closure (``v ↦ J v`` as the VJP of the pullback) or an
uncached ``torch.func.jvp``; networks that ``linearize`` cannot trace (data dependent
control flow) fall back to the latter. The reverse-mode half is always cached.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch.func import linearize, vjp

from pyro_ntk._engines._cache import DEFAULT_CACHE_BYTES, ChunkCache
from pyro_ntk._engines.functorch import FuncTorchEngine
from pyro_ntk._engines.routes import Push, Routes, columns, pull_columns, push_columns
from pyro_ntk.parameters import ParameterSpace


@dataclass
class Closures:
    """One chunk's primal pass: the output and the two product closures."""

    out: Tensor
    pullback: Callable
    pushforward: Callable | None  # one column v ↦ J v; None: uncached torch.func.jvp
    primals: dict[str, Tensor]


def build_closures(
    fn: Callable[[dict[str, Tensor]], Tensor],
    primals: dict[str, Tensor],
    routes: Routes,
    network: nn.Module,
) -> tuple[Closures, int]:
    """Run ``fn`` once in reverse mode (and keep a forward-mode closure as ``routes`` allow).

    Returns the closures and an estimate of the bytes they retain: the outputs of the
    network's leaf modules (the activations autograd saves), counted twice when a
    pushforward graph (linearized or double-VJP) is kept too.
    """
    seen: list[int] = []

    def count(module: nn.Module, args: object, out: object) -> None:
        if isinstance(out, Tensor):
            seen.append(out.numel() * out.element_size())

    leaves = [m for m in network.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        out, pullback = vjp(fn, primals)
    finally:
        for h in handles:
            h.remove()
    pushforward = None
    if routes.push is Push.DOUBLE_VJP:
        _, pull_of_pull = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))
        pushforward = lambda t: pull_of_pull(t)[0]  # noqa: E731
    elif routes.cache_linearize:
        try:
            # linear_operator runs products inside torch.autograd.Function.forward, where
            # forward-mode AD is switched off; linearize traces a forward-mode pass and would
            # silently record a zero tangent there, so switch it back on for the trace.
            with warnings.catch_warnings(), _set_fwd_grad_enabled(True):
                # torch.fx const-folding inside linearize warns about unowned attributes.
                warnings.simplefilter("ignore")
                _, pushforward = linearize(fn, primals)
        except Exception:  # noqa: BLE001 - any tracing failure: keep the generic jvp
            pushforward = None
    nbytes = sum(seen) * (2 if pushforward is not None else 1)
    return Closures(out.detach(), pullback, pushforward, primals), nbytes


def push(
    closures: Closures,
    tangents: dict[str, Tensor],
    fn: Callable[[dict[str, Tensor]], Tensor],
    routes: Routes,
) -> Tensor:
    """J V for tangents ``{name: (k, *shape)}`` through the kept closure, shape ``(k, n, O)``.

    A traced graph can hold decomposed ops (e.g. ``view``) that some layouts cannot take
    under ``vmap``; then this chunk falls back for good to the uncached push route of ``fn``.
    """
    if closures.pushforward is not None:
        try:
            return columns(closures.pushforward, tangents, routes.vmap_columns)
        except RuntimeError:
            closures.pushforward = None
    primals = {n: closures.primals[n] for n in tangents}
    return push_columns(fn, primals, tangents, routes)


class CachedEngine(FuncTorchEngine):
    """``torch.func`` products with the primal pass of each chunk cached.

    Cost per chunk: the first product on a chunk pays one forward + backward (``vjp``) and
    the ``linearize`` trace (two forward passes); every later ``vjp`` costs one backward
    pass and every later ``jvp`` one tangent pass, for all ``k`` columns in one ``vmap``.
    Memory: the cache holds the activations of every chunk it has seen (about twice the
    activations of a forward pass over those rows), up to ``cache_bytes`` in total
    (default 2 GiB; see :mod:`pyro_ntk._engines._cache`). Set ``engine.cache.max_bytes``
    to bound it (``0`` disables caching); entries die with the input tensor.

    Args:
        network: the user's network.
        space: the linearized parameter space.
        cache_bytes: budget of the chunk cache (``None``: unbounded).
    """

    name = "cached"
    caches_closures = True

    def __init__(
        self,
        network: nn.Module,
        space: ParameterSpace,
        cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    ):
        super().__init__(network, space)
        self.cache = ChunkCache(self.space.versions, cache_bytes)

    def clear_cache(self) -> None:
        """Release every cached chunk."""
        self.cache.clear()

    def _closures(self, X: Tensor) -> Closures:
        def build(Xc: Tensor) -> tuple[Closures, int]:
            closures, nbytes = build_closures(
                lambda p: self.f(p, Xc), self.space.theta, self.routes, self.network
            )
            if closures.pushforward is None and self.routes.push is Push.JVP:
                self.routes.cache_linearize = False  # do not retrace what cannot be traced
            return closures, nbytes

        return self.cache.get(X, build)

    def jvp(self, X: Tensor, V: Tensor) -> Tensor:
        c = self._closures(X)
        tangents = self.space.unflatten_batched(V)  # {name: (k, *shape)}
        out = push(c, tangents, lambda p: self.f(p, X), self.routes)
        return out.permute(1, 2, 0)  # (k, n, O) → (n, O, k)

    def vjp(self, X: Tensor, U: Tensor) -> Tensor:
        c = self._closures(X)
        grads = pull_columns(c.pullback, U.permute(2, 0, 1), self.routes)  # {name: (k, ...)}
        return self.space.flatten_batched(grads).T  # (P, k)
