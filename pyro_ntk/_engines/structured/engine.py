"""The structured engine: factored products for Linear, Conv, BatchNorm and Embedding layers.

Layers of the plan (:mod:`.plan`) go through their cached factors (:mod:`.factors`,
:mod:`.products`); every other linearized parameter through the cached ``torch.func``
closures of :mod:`pyro_ntk._engines.cached`, restricted to those parameters, in the same
product. The preflight proves the factored products of each layer against the generic
route on the probe and demotes a layer that disagrees, with the reason in the plan; before
the first dense product, an Embedding's index-equality Gram is proven against its own
Jacobian contraction the same way.

Cost model of the products (``jvp``, ``vjp``; a K·v is a ``vjp`` then a ``jvp`` on the same
rows). Building a chunk's factors costs one forward and ``O`` backward passes to every layer
output, plus the patches (9–18× a forward+backward at ``O = 10`` on a ResNet-style CNN);
a factored product then costs about 0.2× (a K·v 0.4×). So factors are built lazily:

- a chunk's first ``build_after`` (default 1) ``vjp`` products **stream**: ``torch.func``
  vjp / jvp of the whole parameter set through the proven routes
  (:func:`~pyro_ntk._engines.functorch.stream_vjp`), nothing built or kept, about 2.5×
  forward+backward per K·v and a forward+backward's memory;
- its next ``vjp`` builds the factors; every later product on the chunk is factored;
- a ``jvp`` never builds (factored when the chunk has factors, else streaming);
- a product of :data:`BUILD_COLUMNS` or more columns builds at once: streaming batches the
  columns under ``vmap`` but not their work (about one streamed product per column, far more
  for convolutions, whose batched weight tangents become grouped convolutions), while the
  factored product's cost per column is a fraction of a forward pass;
- a chunk whose estimated factor bytes (bytes per row measured on the preflight's probe,
  times its rows) do not fit in what is left of ``cache.max_bytes`` streams every product:
  nothing is built, so nothing is rebuilt per product.

With ``build_after = 0`` the first product builds (eager). Dense ops (``jacobian``,
``ntk_block``, ``ntk_diag``, ``layer_factors``) build the factors at once, within budget or
not (an entry over budget is used once and released). The streaming route is proven on the
probe like the factored one; if it disagrees, products always use factors (reported).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pyro_ntk._engines._cache import DEFAULT_CACHE_BYTES, ChunkCache
from pyro_ntk._engines.base import Engine
from pyro_ntk._engines.cached import push
from pyro_ntk._engines.functorch import stream_jvp, stream_vjp
from pyro_ntk._engines.preflight import Reference, Report
from pyro_ntk._engines.routes import dense_rows, pull_columns
from pyro_ntk._engines.structured import proof
from pyro_ntk._engines.structured.factors import Factors, LayerFactors, build_factors, layer_factors
from pyro_ntk._engines.structured.gram import layers_block
from pyro_ntk._engines.structured.plan import Demote, make_plan, trace_batch_dims
from pyro_ntk._engines.structured.products import (
    layers_diag,
    layers_jacobian,
    layers_jvp,
    layers_vjp,
    piece_scales,
)
from pyro_ntk._engines.structured.separable_layers import SeparableLayers
from pyro_ntk.parameters import ParameterSpace

BUILD_COLUMNS = 4
"""Products with this many columns or more build a chunk's factors at once (within budget).

Streaming ``k`` columns costs about ``k`` streamed products (2.2–2.9× forward+backward each on
a ResNet-style CNN), the build 8.6–9.2× once: from about 4 columns on, building is cheaper even
for one product (``benchmarks/bench_conv.py --sections lazy``)."""


class StructuredEngine(Engine):
    """Products from cached per-layer factors (Linear, Conv, BatchNorm, Embedding) + the rest.

    Cost per chunk of ``n`` inputs: building the factors is one forward pass and ``O``
    backward passes to the layer outputs (no weight gradients); then each ``jvp`` or
    ``vjp`` is about one forward-sized matrix product per layer for each column, and a
    dense block is ``Σ_l n1·n2·(d_in + O²·d_out)`` for plain Linear layers (per-example
    gradients and one GEMM for convolutions). Products build lazily (module docstring):
    a chunk's first ``build_after`` K·v stream at about 2.5× forward+backward, the next
    builds. Memory: the cache holds ``A`` and ``B`` for every chunk it has built,
    ``n·Σ_l S_l·(d_in + O·d_out)`` floats (convolution inputs are stored as unfolded
    patches), up to ``cache_bytes`` (default 2 GiB); chunks over it stream. Set
    ``engine.cache.max_bytes`` to bound it.

    Args:
        network: the user's network.
        space: the linearized parameter space.
        cache_bytes: budget of the chunk cache (``None``: unbounded).

    Attributes:
        build_after: streaming ``vjp`` products a chunk gets before its factors are built
            (default 1: built at the second K·v; 0: built at the first product).
        streaming: whether products may stream (cleared when the streaming route disagrees
            with the reference on the probe).

    Example::

        lin = Linearization(net, implementation="structured")
        lin.engine.build_after = 0  # build every chunk's factors at its first product
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
        self.build_after = 1
        self.streaming = True
        self._row_bytes: dict[tuple, float] = {}  # per input signature, bytes of factors per row
        self._force: str | None = None  # "factored" or "streaming" while proving a route
        self.separable = SeparableLayers()  # layers of the channel-separable dense K

    def clear_cache(self) -> None:
        """Release every cached chunk."""
        self.cache.clear()

    def _demote(self, reasons: dict[str, str]) -> None:
        self.plan = self.plan.without(reasons, self.space)
        self.cache.clear()
        self._row_bytes.clear()  # measured with the old plan

    @contextlib.contextmanager
    def _forced(self, how: str) -> Iterator[None]:
        before, self._force = self._force, how
        try:
            yield
        finally:
            self._force = before

    # ------------------------------------------------------------------ proof
    def prepare(self, where: str, ref: Reference, report: Report) -> None:
        """Establish each layer's example dimension, prove its factors, then the rest.

        Layers whose example dimension cannot be traced, or whose factored products
        disagree with the generic route on the probe, are demoted (reason in the plan);
        the generic remainder and the dense route are then proven as on every engine, all
        with factored products forced. The streaming products are proven last; when they
        disagree every product uses factors (a fallback in the report).
        """
        with self._forced("factored"):
            self.adopt(ref)
            bad = trace_batch_dims(self.plan.layers, lambda Xn: self.f(self.space.theta, Xn), ref.X)
            if bad:
                self._demote(bad)
            if self.plan.layers and proof.layer_error(self, ref, None) is not None:
                bad = {}
                for layer in self.plan.layers:
                    problem = proof.layer_error(self, ref, layer)
                    if problem is not None:
                        bad[layer.module_name] = (
                            f"factored products disagree on the probe ({problem})"
                        )
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
        self._prove(
            where,
            "streaming products",
            lambda: self._streaming_error(ref),
            [
                (
                    "factored products only (every product builds its chunk's factors)",
                    self._no_streaming,
                )
            ],
            report,
        )
        if self.streaming:
            report.add(
                "products (structured)",
                "lazy",
                f"a chunk's first {self.build_after} K·v stream (torch.func vjp/jvp, agrees with "
                "the reference on the probe); its factors are built at the next vjp when "
                "their estimated size fits in the cache budget",
            )

    def _streaming_error(self, ref: Reference) -> str | None:
        """How far the streaming products are from the reference on the probe."""
        if not self.streaming:
            return None
        with self._forced("streaming"):
            return self._products_error(ref)

    def _no_streaming(self) -> None:
        self.streaming = False

    def prove_dense(self, where: str, ref: Reference, report: Report) -> None:
        """Prove the patch-Gram route against the contraction one, then the dense routes.

        The per-layer route rule (:func:`~.gram.choose_route`) depends on the sizes, so the
        probe's own choice does not exercise both: the factored blocks are computed once
        with the patch Gram forced and once with Jacobian contraction forced, and the
        patch Gram is switched off (reported) when they disagree. The channel-separable
        layers are then found and proven on the probe (:meth:`.separable_layers.SeparableLayers.prove`).
        """
        bad = proof.index_gram_errors(self, ref)
        if bad:
            self._demote(bad)
            for name, why in bad.items():
                report.add(name, "generic", why)
        if self.plan.layers and self.plan.patch_gram:
            problem = proof.gram_error(self, ref)
            if problem is not None:
                self.plan.patch_gram = False
                report.add(
                    "dense K (structured)", "fallback", f"{problem} → Jacobian contraction only"
                )
        if self.plan.layers:
            self.separable.prove(self.plan, self._factors(ref.X), report)
        super().prove_dense(where, ref, report)

    # ------------------------------------------------------------------ factors
    @staticmethod
    def _signature(X: Tensor) -> tuple:
        return tuple(X.shape[1:]), X.dtype

    def _factors(self, X: Tensor) -> Factors:
        def build(Xc: Tensor) -> tuple[Factors, int]:
            out = build_factors(self.plan, self.f, self.space.theta, self.routes, self.network, Xc)
            self._row_bytes[self._signature(Xc)] = out[1] / max(Xc.shape[0], 1)
            return out

        while True:
            try:
                return self.cache.get(X, build)
            except Demote as d:
                self._demote(d.reasons)

    def layer_factors(self, chunks: list[Tensor]) -> list[LayerFactors]:
        """The factors ``A`` and ``B`` of every layer that keeps them, over ``chunks``.

        All chunks' factors come from the same plan: a chunk that demotes a layer makes
        the earlier chunks' factors be taken again.
        """
        plan = self.plan
        factors = [self._factors(Xc) for Xc in chunks]
        if self.plan is not plan:  # a chunk demoted a layer: the earlier ones predate it
            factors = [self._factors(Xc) for Xc in chunks]
        return layer_factors(self.plan, factors)

    # ------------------------------------------------------------------ products
    def _product_factors(self, X: Tensor, pull: bool, k: int) -> Factors | None:
        """The factors a product of ``k`` columns on chunk ``X`` uses, or ``None``: it streams.

        ``pull``: the product is a ``vjp`` (the one that counts towards ``build_after``).
        """
        if self._force is not None or not self.streaming:
            return None if self._force == "streaming" else self._factors(X)
        fac = self.cache.peek(X)
        if fac is not None:
            return fac
        lazy = self.build_after > 0 and k < BUILD_COLUMNS
        if lazy and (not pull or self.cache.count(X) <= self.build_after):
            return None
        # unknown size (no build yet for this signature): build, which measures it
        estimate = self._row_bytes.get(self._signature(X), 0.0) * X.shape[0]
        return self._factors(X) if self.cache.fits(X, estimate) else None

    def _generic_f(self, X: Tensor):
        theta = self.space.theta
        return lambda p: self.f({**theta, **p}, X)

    def jvp(self, X: Tensor, V: Tensor) -> Tensor:
        fac = self._product_factors(X, pull=False, k=V.shape[1])
        if fac is None:
            return stream_jvp(self, X, V)
        out = layers_jvp(self.plan, fac, V)
        if fac.generic is not None:
            pieces = dict(zip(self.space.names, torch.split(V, self.space.numels, dim=0)))
            shapes = dict(zip(self.space.names, self.space.shapes))
            tangents = {n: pieces[n].T.reshape(-1, *shapes[n]) for n in self.plan.generic}
            part = push(fac.generic, tangents, self._generic_f(X), self.routes)
            part = part.permute(1, 2, 0)
            out = part if out is None else out + part
        return out

    def vjp(self, X: Tensor, U: Tensor) -> Tensor:
        fac = self._product_factors(X, pull=True, k=U.shape[2])
        if fac is None:
            return stream_vjp(self, X, U)
        k = U.shape[2]
        pieces = layers_vjp(self.plan, fac, U)
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

    def jacobian(self, X: Tensor) -> Tensor:
        pieces = layers_jacobian(self.plan, self._factors(X))
        if self.plan.generic:
            Jg = self._generic_jacobian(X)
            numel = dict(zip(self.space.names, self.space.numels))
            for name, g in zip(
                self.plan.generic, torch.split(Jg, [numel[g] for g in self.plan.generic], -1)
            ):
                pieces[name] = g
        return torch.cat([pieces[name] for name in self.space.names], dim=-1)

    def ntk_diag(self, X: Tensor, scale: Tensor | None) -> Tensor:
        scales = piece_scales(self.plan, scale)
        if scales is None:
            return super().ntk_diag(X, scale)
        out = layers_diag(self.plan, self._factors(X), scales)
        if self.plan.generic:
            Jg = self._generic_jacobian(X).square()
            sg = self._generic_scale(scale)
            part = (Jg * sg).sum(-1) if sg is not None else Jg.sum(-1)
            out = part if out is None else out + part
        return out

    def ntk_block(self, X1: Tensor, X2: Tensor, scale: Tensor | None) -> Tensor:
        scales = piece_scales(self.plan, scale)
        if scales is None:
            return super().ntk_block(X1, X2, scale)
        f1 = self._factors(X1)
        f2 = f1 if X2 is X1 else self._factors(X2)
        K = layers_block(self.plan, f1, f2, scales, separable=self.separable)
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
