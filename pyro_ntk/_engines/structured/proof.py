"""Proofs of the structured engine's factored routes on the preflight's probe.

``engine`` is a :class:`~.engine.StructuredEngine` (its plan and factors). Each compares a
factored computation with an independent route on the probe rows ``ref.X``
(a few examples) and returns why they disagree, or ``None``: the factored ``J V`` and
``Jᵀ U`` of one layer (or all) against the plain reference products
(:func:`layer_error`), the patch-Gram dense blocks against Jacobian contraction
(:func:`gram_error`), an Embedding's index-equality Gram and diagonal against ``J Jᵀ``
(:func:`index_gram_errors`). Agreement is ``‖a − b‖ ≤ tol·max(‖a‖, ‖b‖)`` at the dtype's
tolerance (:func:`~pyro_ntk._engines.preflight.tolerance`). Cost: a few products on the
probe. Example::

    problem = layer_error(engine, ref, None)  # None: every factored layer agrees
"""

from __future__ import annotations

import torch

from pyro_ntk._engines.base import Engine
from pyro_ntk._engines.preflight import Reference, agree, relative_error, tolerance
from pyro_ntk._engines.structured import embedding as emb
from pyro_ntk._engines.structured.gram import layers_block
from pyro_ntk._engines.structured.plan import Layer
from pyro_ntk._engines.structured.products import piece_scales


def gram_error(engine: Engine, ref: Reference) -> str | None:
    """How far the patch-Gram blocks are from the contraction ones on the probe."""
    scales = piece_scales(engine.plan, None)
    fac = engine._factors(ref.X)
    try:
        patch = layers_block(engine.plan, fac, fac, scales, route="patch")
    except Exception as exc:  # noqa: BLE001 - the route is switched off with this reason
        return f"patch Gram raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    want = layers_block(engine.plan, fac, fac, scales, route="contraction")
    if not agree(patch, want, tolerance(engine.space.dtype)):
        return f"patch-Gram K off by {relative_error(patch, want):.2g}"
    return None


def index_gram_errors(engine: Engine, ref: Reference) -> dict[str, str]:
    """Embeddings whose index-equality Gram and diagonal disagree with ``J Jᵀ`` on the probe."""
    sparse = [i for i, layer in enumerate(engine.plan.layers) if layer.kind == "embedding"]
    if not sparse:
        return {}
    fac, tol, bad = engine._factors(ref.X), tolerance(engine.space.dtype), {}
    for i in sparse:
        layer = engine.plan.layers[i]
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


def layer_error(engine: Engine, ref: Reference, layer: Layer | None) -> str | None:
    """How far the factored products of ``layer`` (``None``: all) are from the reference."""
    tol = tolerance(engine.space.dtype)
    gen = torch.Generator(device="cpu").manual_seed(3)
    P = engine.space.num_params
    V = torch.randn(P, 2, generator=gen, dtype=engine.space.dtype).to(engine.space.device)
    mask = torch.zeros(P, 1, dtype=V.dtype, device=V.device)
    for one in engine.plan.layers if layer is None else [layer]:
        for sl in (one.w_slice, one.b_slice):
            if sl is not None:
                mask[sl] = 1.0
    V = V * mask
    try:
        got = engine.jvp(ref.X, V)
        U = torch.randn(got.shape, generator=gen, dtype=V.dtype).to(V.device)
        pulled = engine.vjp(ref.X, U) * mask
    except Exception as exc:  # noqa: BLE001 - the layer is demoted with this reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    want = ref.push(V)
    if not agree(got, want, tol):
        return f"J·v off by {relative_error(got, want):.2g}"
    want = ref.pull(U) * mask
    if not agree(pulled, want, tol):
        return f"Jᵀu off by {relative_error(pulled, want):.2g}"
    return None
