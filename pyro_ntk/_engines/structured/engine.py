"""The structured engine: factored products for Linear, Conv, BatchNorm and Embedding layers.

Layers of the plan (:mod:`.plan`) go through their cached factors (:mod:`.factors`,
:mod:`.products`); every other linearized parameter through the cached ``torch.func``
closures of :mod:`pyro_ntk._engines.cached`, restricted to those parameters, in the same
product. The preflight proves the factored products of each layer against the generic
route on the probe and demotes a layer that disagrees, with the reason in the plan; before
the first dense product, an Embedding's index-equality Gram is proven against its own
Jacobian contraction the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_ntk._engines._cache import DEFAULT_CACHE_BYTES, ChunkCache
from pyro_ntk._engines.base import Engine
from pyro_ntk._engines.cached import push
from pyro_ntk._engines.preflight import Reference, Report, agree, relative_error, tolerance
from pyro_ntk._engines.routes import dense_rows, pull_columns
from pyro_ntk._engines.structured import embedding as emb
from pyro_ntk._engines.structured.factors import Factors, LayerFactors, build_factors, layer_factors
from pyro_ntk._engines.structured.gram import layers_block
from pyro_ntk._engines.structured.plan import Demote, Layer, make_plan, trace_batch_dims
from pyro_ntk._engines.structured.products import (
    layers_diag,
    layers_jacobian,
    layers_jvp,
    layers_vjp,
    piece_scales,
)
from pyro_ntk.parameters import ParameterSpace


class StructuredEngine(Engine):
    """Products from cached per-layer factors (Linear, Conv, BatchNorm, Embedding) + the rest.

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

    def _demote(self, reasons: dict[str, str]) -> None:
        self.plan = self.plan.without(reasons, self.space)
        self.cache.clear()

    # ------------------------------------------------------------------ proof
    def prepare(self, where: str, ref: Reference, report: Report) -> None:
        """Establish each layer's example dimension, prove its factors, then the rest.

        Layers whose example dimension cannot be traced, or whose factored products
        disagree with the generic route on the probe, are demoted (reason in the plan);
        the generic remainder and the dense route are then proven as on every engine.
        """
        self.adopt(ref)
        bad = trace_batch_dims(self.plan.layers, lambda Xn: self.f(self.space.theta, Xn), ref.X)
        if bad:
            self._demote(bad)
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

    def prove_dense(self, where: str, ref: Reference, report: Report) -> None:
        """Prove the patch-Gram route against the contraction one, then the dense routes.

        The per-layer route rule (:func:`~.gram.choose_route`) depends on the sizes, so the
        probe's own choice does not exercise both: the factored blocks are computed once
        with the patch Gram forced and once with Jacobian contraction forced, and the
        patch Gram is switched off (reported) when they disagree.
        """
        bad = self._index_gram_errors(ref)
        if bad:
            self._demote(bad)
            for name, why in bad.items():
                report.add(name, "generic", why)
        if self.plan.layers and self.plan.patch_gram:
            problem = self._gram_error(ref)
            if problem is not None:
                self.plan.patch_gram = False
                report.add(
                    "dense K (structured)", "fallback", f"{problem} → Jacobian contraction only"
                )
        super().prove_dense(where, ref, report)

    def _gram_error(self, ref: Reference) -> str | None:
        """How far the patch-Gram blocks are from the contraction ones on the probe."""
        scales = piece_scales(self.plan, None)
        fac = self._factors(ref.X)
        try:
            patch = layers_block(self.plan, fac, fac, scales, route="patch")
        except Exception as exc:  # noqa: BLE001 - the route is switched off with this reason
            return f"patch Gram raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        want = layers_block(self.plan, fac, fac, scales, route="contraction")
        if not agree(patch, want, tolerance(self.space.dtype)):
            return f"patch-Gram K off by {relative_error(patch, want):.2g}"
        return None

    def _index_gram_errors(self, ref: Reference) -> dict[str, str]:
        """Embeddings whose index-equality Gram and diagonal disagree with ``J Jᵀ`` on the probe."""
        sparse = [i for i, layer in enumerate(self.plan.layers) if layer.kind == "embedding"]
        if not sparse:
            return {}
        fac, tol, bad = self._factors(ref.X), tolerance(self.space.dtype), {}
        for i in sparse:
            layer = self.plan.layers[i]
            ids, B, pad = fac.index[i], fac.B[i], layer.module.padding_idx
            J = emb.embedding_jacobian(ids, B, layer.d_in, pad)
            J = J.reshape(-1, J.shape[2])
            want = J @ J.T
            got = emb.embedding_gram(ids, B, ids, B, pad)
            diag = emb.embedding_diag(ids, B, pad).reshape(-1)
            if not agree(got, want, tol) or not agree(diag, want.diagonal(), tol):
                err = max(relative_error(got, want), relative_error(diag, want.diagonal()))
                bad[layer.module_name] = f"index-equality Gram off by {err:.2g} on the probe"
        return bad

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

    # ------------------------------------------------------------------ factors
    def _factors(self, X: Tensor) -> Factors:
        def build(Xc: Tensor) -> tuple[Factors, int]:
            return build_factors(self.plan, self.f, self.space.theta, self.routes, self.network, Xc)

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
    def _generic_f(self, X: Tensor):
        theta = self.space.theta
        return lambda p: self.f({**theta, **p}, X)

    def jvp(self, X: Tensor, V: Tensor) -> Tensor:
        fac = self._factors(X)
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
        fac = self._factors(X)
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
        K = layers_block(self.plan, f1, f2, scales)
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
