r"""The linearization engine: Jacobian and NTK products of a trained network at θ*.

.. math::

    f_{\mathrm{lin}}(x; \theta) = f(x; \theta^*) + J(x)(\theta - \theta^*),
    \qquad J(x) = \partial f(x; \theta) / \partial \theta \,\big|_{\theta^*},

    K(x, x') = J(x)\, \mathrm{diag}(\sigma^2)\, J(x')^\top.

Layout conventions shared by the whole package: ``N`` inputs, ``O`` outputs per input,
``P`` linearized parameters; function-space vectors are flat of length ``N·O`` with row
index ``n·O + o`` (sample-major, as gpytorch's interleaved multitask layout).
"""

from __future__ import annotations

import enum
import weakref

import torch
from torch import Tensor, nn

from pyro_ntk._checks import check_positive_int, check_tensor, check_vector
from pyro_ntk._engines import (
    CachedEngine,
    Engine,
    FuncTorchEngine,
    LayerFactors,
    StructuredEngine,
    make_plan,
)
from pyro_ntk._engines.chunked import ChunkedProducts
from pyro_ntk._engines.conversion import converted_network, resolve_target
from pyro_ntk._engines.inputs import check_backward_hooks, eval_mode
from pyro_ntk._engines.preflight import Report
from pyro_ntk._memory import check_dense_memory
from pyro_ntk.parameters import ParameterSpace, ParamSelector

__all__ = [
    "LayerFactors",
    "Linearization",
    "NTKImplementation",
    "as_linearization",
]


class NTKImplementation(str, enum.Enum):
    """How :class:`Linearization` computes Jacobian products."""

    FUNCTORCH = "functorch"
    """``torch.func`` vjp + jvp under ``vmap``: generic, any network (the reference path)."""

    CACHED = "cached"
    """``torch.func`` closures (vjp pullback, ``linearize``) built once per (chunk, θ*) and
    reused by every later product on the same rows; generic, any network."""

    STRUCTURED = "structured"
    """Cached per-layer factors (inputs and output sensitivities) of ``nn.Linear``,
    ``nn.Conv1d`` and ``nn.Conv2d`` layers: about two forward-sized matrix products per layer per product and a
    Jacobian-free dense kernel; other parameters go through cached ``torch.func`` closures."""

    AUTO = "auto"
    """``structured`` when any Linear/Conv layer can be factored, else ``cached``: a rule
    measured on the engine zoo (``benchmarks/bench_engine.py --zoo``), where the structured
    engine's dense products are the fastest or within 1.06× of them and its K·v within
    1.12× of the best on every zoo network (wide layers with many outputs are the known
    exception: 1.36× on a 32-256-256-10 MLP); see ``implementation_reason``."""


_ENGINES: dict[NTKImplementation, type[Engine]] = {
    NTKImplementation.FUNCTORCH: FuncTorchEngine,
    NTKImplementation.CACHED: CachedEngine,
    NTKImplementation.STRUCTURED: StructuredEngine,
}


class Linearization(ChunkedProducts):
    r"""A trained network, linearized at its weights θ*, with matrix-free NTK products.

    θ* is a detached copy of the network's parameters (and its buffers), taken at
    construction: the network is never mutated, and later changes to it do not leak in.
    Every call evaluates the network in eval mode (BatchNorm uses running statistics,
    Dropout is off) and restores each module's train/eval flag afterwards. Inputs are data:
    an ``X`` that requires grad is accepted and detached, so no gradient reaches it (on
    every implementation); gradients flow to ``V``/``v``/``u`` and to ``variance``.
    Forward (pre-)hooks, the module's or global, are part of ``f`` and honoured; backward
    hooks (``register_full_backward_hook``, ``register_full_backward_pre_hook``,
    ``register_backward_hook``, or global ones) are refused at construction with a
    ``ValueError`` naming the module and the hook kind: ``torch.func`` cannot run through
    them and the NTK depends on the forward pass only (the hooks are left registered).

    Cost per chunk of ``n`` inputs (generic ``functorch`` engine): ``jvp`` ≈ 2–3 forward
    passes and ``vjp`` ≈ one forward + backward, for all ``k`` right-hand sides in one
    ``vmap``-ed pass; ``ntk_mvm`` = one ``vjp`` over ``X2`` + one ``jvp`` over ``X1``.
    Memory is bounded by ``chunk_size`` × activations, never ``N × P``, except for
    :meth:`jacobian` and :meth:`ntk_dense`, which are meant for small problems.

    Args:
        network: the trained ``nn.Module``; any input shape it accepts.
        params: which parameters to linearize: ``None`` (all with ``requires_grad``), a
            list of names, or a predicate ``(name, parameter) -> bool`` (e.g. the last
            layer only). The others stay fixed at θ*.
        chunk_size: inputs per chunk (``None``: all at once).
        implementation: an :class:`NTKImplementation` or its string value.
        example: optional inputs ``(N, ...)`` to run the preflight on at construction
            (otherwise it runs on the first input of each feature shape). A network whose
            forward is random in eval mode, whose examples interact, or whose products no
            route computes exactly is refused there with a ``ValueError`` naming the module.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> lin = Linearization(net)
        >>> X = torch.randn(5, 3)
        >>> lin(X).shape, lin.num_params, lin.output_dim(X)
        (torch.Size([5, 2]), 50, 2)
        >>> lin.ntk_mvm(X, X, torch.randn(10, 4)).shape
        torch.Size([10, 4])
    """

    def __init__(
        self,
        network: nn.Module,
        params: ParamSelector = None,
        *,
        chunk_size: int | None = None,
        implementation: str | NTKImplementation = "auto",
        example: Tensor | None = None,
    ):
        self.space = ParameterSpace(network, params, where="Linearization")
        check_backward_hooks("Linearization", network)
        self.network = network
        self.chunk_size = check_positive_int(
            "Linearization", "chunk_size", chunk_size, allow_none=True
        )
        try:
            requested = NTKImplementation(implementation)
        except ValueError:
            choices = [i.value for i in NTKImplementation]
            raise ValueError(
                f"Linearization: implementation must be one of {choices}, got {implementation!r}."
            ) from None
        self.requested = requested
        """The implementation asked for (``auto`` stays ``auto``; see :attr:`implementation`)."""
        self.implementation = self._choose(requested)
        """The engine in use (``auto`` resolved)."""
        self.engine: Engine = _ENGINES[self.implementation](network, self.space)
        self.plan = Report()
        """Every decision made for this network (routes, fast paths, demotions, fallbacks)
        with its reason; :meth:`explain` renders it."""
        super().__init__(network, self.space, self.engine, self.chunk_size, self.plan)
        self._converted: dict[tuple, Linearization] = {}  # (dtype, device) → copy
        self._origin: weakref.ref | None = None  # the Linearization this one was converted from
        if example is not None:
            self.check_inputs("Linearization", "example", example)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_converted"], state["_origin"] = {}, None
        return state

    def explain(self) -> str:
        """How products are computed for this network, and why: one line per decision.

        The preflight runs on the first input of each feature shape (or on ``example`` at
        construction): determinism and independence checks, the reference route, and every
        fast path proven against it or demoted.
        """
        head = f"engine {self.implementation.value!r} ({self.implementation_reason})"
        return f"{head}\n{self.plan.explain()}"

    def _choose(self, requested: NTKImplementation) -> NTKImplementation:
        """Resolve ``auto`` by the measured rule; record why in ``implementation_reason``."""
        if requested is not NTKImplementation.AUTO:
            self.implementation_reason = f"requested {requested.value!r}"
            return requested
        plan = make_plan(self.network, self.space)
        if not plan.layers:
            self.implementation_reason = (
                "auto: no layer can be factored (Linear, Conv1d/2d, BatchNorm, Embedding; "
                f"{len(plan.generic)} parameter tensors); generic closures cached per chunk"
            )
            return NTKImplementation.CACHED
        share = plan.structured_fraction(self.space)
        self.implementation_reason = (
            f"auto: factored layers hold {share:.0%} of the {self.num_params} linearized "
            "parameters; the structured engine (on the engine zoo its dense products are the "
            "fastest or within 1.06× of them, and its K·v within 1.12× of the best)"
        )
        return NTKImplementation.STRUCTURED

    def clear_cache(self) -> None:
        """Release the engine's per-chunk cache (activations or factors), if it keeps one."""
        self.engine.clear_cache()

    # ------------------------------------------------------------------ products
    def __call__(self, X: Tensor) -> Tensor:
        """f(X; θ*), shape ``(N, O)``."""
        X = self.check_inputs("Linearization", "X", X)
        with eval_mode(self.network):
            return self._over_rows(self.engine.forward, X)

    def jvp(self, X: Tensor, v: Tensor) -> Tensor:
        """J(X) v: ``v`` of shape ``(P,)`` or ``(P, k)`` gives ``(N, O)`` or ``(N, O, k)``."""
        X = self.check_inputs("Linearization.jvp", "X", X)
        v = check_vector("Linearization.jvp", "v", v, self.num_params, self.dtype, self.device, "P")
        out = self.jvp_unchecked(X, v if v.dim() == 2 else v.unsqueeze(-1))
        return out if v.dim() == 2 else out.squeeze(-1)

    def vjp(self, X: Tensor, u: Tensor) -> Tensor:
        """J(X)ᵀ u: ``u`` of shape ``(N, O)`` or ``(N, O, k)`` gives ``(P,)`` or ``(P, k)``."""
        X = self.check_inputs("Linearization.vjp", "X", X)
        N, O = X.shape[0], self._gate.output_dim
        u = check_tensor("Linearization.vjp", "u", u)
        if u.dim() not in (2, 3) or tuple(u.shape[:2]) != (N, O):
            raise ValueError(
                f"Linearization.vjp: u has shape {tuple(u.shape)}; expected ({N}, {O}) or "
                f"({N}, {O}, k) for N = {N} inputs and O = {O} outputs."
            )
        flat = check_vector(
            "Linearization.vjp", "u", u.reshape(N * O, -1), N * O, self.dtype, self.device, "N·O"
        )
        out = self.vjp_unchecked(X, flat.reshape(N, O, -1))
        return out if u.dim() == 3 else out.squeeze(-1)

    def ntk_mvm(
        self, X1: Tensor, X2: Tensor | None, V: Tensor, variance: Tensor | float | None = None
    ) -> Tensor:
        r"""K(X1, X2) V without forming J or K.

        .. math:: K V = J(X_1)\,\mathrm{diag}(\sigma^2)\,\big(J(X_2)^\top V\big)

        Args:
            X1: inputs ``(N1, ...)``.
            X2: inputs ``(N2, ...)``; ``None`` means ``X1``.
            V: ``(N2·O,)`` or ``(N2·O, k)``, rows ``n·O + o``.
            variance: σ², a scalar or one value per parameter group ``(G,)``; ``None`` is 1.

        Returns:
            ``(N1·O,)`` or ``(N1·O, k)``. Cost: one ``vjp`` over ``X2`` and one ``jvp``
            over ``X1``, all ``k`` columns batched.
        """
        where = "Linearization.ntk_mvm"
        X1 = self.check_inputs(where, "X1", X1)
        X2 = X1 if X2 is None or X2 is X1 else self.check_inputs(where, "X2", X2)
        N2, O = X2.shape[0], self._gate.output_dim
        V = check_vector(where, "V", V, N2 * O, self.dtype, self.device, "N2·O")
        scale = self.variance_scale(where, variance)
        out = self.ntk_mvm_unchecked(X1, X2, V if V.dim() == 2 else V.unsqueeze(-1), scale)
        return out if V.dim() == 2 else out.squeeze(-1)

    def ntk_diag(self, X: Tensor, variance: Tensor | float | None = None) -> Tensor:
        """Exact diag K(X, X) from per-example gradients, shape ``(N·O,)``.

        Entry ``n·O + o`` is ``Σ_g σ_g² ‖∂f_o(x_n)/∂θ_g‖²``. Cost: ``O`` per-example
        backward passes per input; memory ``chunk_size·O·P``.
        """
        X = self.check_inputs("Linearization.ntk_diag", "X", X)
        scale = self.variance_scale("Linearization.ntk_diag", variance)
        self._gate.prove_dense("Linearization.ntk_diag", X)
        with eval_mode(self.network):
            return self._over_rows(self.engine.ntk_diag, X, scale).reshape(-1)

    def ntk_dense(
        self, X1: Tensor, X2: Tensor | None = None, variance: Tensor | float | None = None
    ) -> Tensor:
        """Dense K(X1, X2), shape ``(N1·O, N2·O)``, built chunk by chunk (small problems).

        With ``X2`` omitted, only the chunk blocks on and above the diagonal are computed and
        the others are their transposes (K exactly symmetric, about half the products).
        """
        where = "Linearization.ntk_dense"
        X1 = self.check_inputs(where, "X1", X1)
        same = X2 is None
        X2 = X1 if same else self.check_inputs(where, "X2", X2)
        scale = self.variance_scale(where, variance)
        n1, n2 = X1.shape[0] * self._gate.output_dim, X2.shape[0] * self._gate.output_dim
        self.check_dense_memory(where, f"K of shape (N1·O, N2·O) = ({n1}, {n2})", n1 * n2)
        self._gate.prove_dense(where, X1, X2)
        chunks1, chunks2 = list(self.chunks(X1.shape[0])), list(self.chunks(X2.shape[0]))
        with eval_mode(self.network):
            rows: list[list[Tensor]] = []
            for i, c1 in enumerate(chunks1):
                A = X1[c1]
                rows.append([
                    rows[j][i].transpose(0, 1) if same and j < i
                    else self.engine.ntk_block(A, A if same and i == j else X2[c2], scale)
                    for j, c2 in enumerate(chunks2)
                ])  # fmt: skip
        return torch.cat([torch.cat(blocks, dim=1) for blocks in rows], dim=0)

    def jacobian(self, X: Tensor) -> Tensor:
        """Dense Jacobian ``(N, O, P)`` (small problems and tests)."""
        X = self.check_inputs("Linearization.jacobian", "X", X)
        N, O, P = X.shape[0], self._gate.output_dim, self.num_params
        self.check_dense_memory(
            "Linearization.jacobian", f"J of shape (N, O, P) = ({N}, {O}, {P})", N * O * P
        )
        self._gate.prove_dense("Linearization.jacobian", X)
        with eval_mode(self.network):
            return self._over_rows(self.engine.jacobian, X)

    max_dense_bytes: float | None = None
    """Memory budget (bytes) of one dense matrix from :meth:`ntk_dense` or :meth:`jacobian`
    (and the dense Cholesky paths built on them). ``None`` (default): half the memory
    available at call time (``/proc/meminfo`` MemAvailable; CUDA: free device memory). Set it
    on an instance (``lin.max_dense_bytes = 8e9``, or ``float("inf")`` to disable the guard).
    Larger requests raise ``pyro_ntk._memory.DenseMemoryError`` (a ``MemoryError`` and a
    ``ValueError``) before allocating."""

    def check_dense_memory(self, where: str, what: str, numel: int) -> None:
        """Refuse (``ValueError`` naming ``where`` and ``what``) ``numel`` dense entries that do not fit.

        The guard of every dense route (dense K, the CG escalation's Cholesky fallback):
        ``numel`` entries in the network's dtype against ``max_dense_bytes`` and the device's
        free memory; the message points to the matrix-free path.
        """
        check_dense_memory(
            where,
            what,
            numel * self.dtype.itemsize,
            self.max_dense_bytes,
            self.device,
            alternative="the matrix-free path (ntk_mvm / jvp / vjp, NTKLinearOperator, "
            "solver='cg') with a chunk_size",
        )

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Linearization:
        r"""The same linearization (same θ*, same parameter selection) in another dtype/device.

        The user's network is never touched: a deep copy of it is loaded with θ* and the
        fixed tensors, then converted. Converting back to the original dtype and device
        returns the original object (no precision is lost on a round trip), and conversions
        are cached on the original. Cost: one deep copy of the network (once per target).

        Args:
            dtype: a floating-point dtype; ``None`` keeps the current one.
            device: the target device; ``None`` keeps the current one.

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
            >>> lin = Linearization(net.double())
            >>> lin.to(torch.float32).dtype
            torch.float32
            >>> lin.to(torch.float32).to(torch.float64) is lin
            True
        """
        target = resolve_target("Linearization.to", dtype, device, (self.dtype, self.device))
        root = (self._origin() if self._origin is not None else None) or self
        if (root.dtype, root.device) == target:
            return root
        if target not in root._converted:
            network = converted_network("Linearization.to", root.network, root.space, *target)
            converted = Linearization(
                network,
                params=list(root.space.names),
                chunk_size=root.chunk_size,
                implementation=root.requested,
            )
            converted._origin = weakref.ref(root)  # weak: no cycle keeps copies alive
            root._converted[target] = converted
        return root._converted[target]

    def __repr__(self) -> str:
        return (
            f"Linearization({type(self.network).__name__}, P={self.num_params}, "
            f"groups={len(self.groups)}, implementation={self.implementation.value!r}, "
            f"chunk_size={self.chunk_size})"
        )


def as_linearization(
    where: str,
    network: nn.Module | Linearization,
    params: ParamSelector = None,
    chunk_size: int | None = None,
) -> Linearization:
    """The :class:`Linearization` behind every public class's ``network`` argument.

    A ``Linearization`` is used as it is (so a kernel and a mean built from it share one
    θ* copy); an ``nn.Module`` is linearized with ``params`` and ``chunk_size``.
    """
    if isinstance(network, Linearization):
        if params is not None or chunk_size is not None:
            raise ValueError(
                f"{where}: params and chunk_size must be None when network is already a "
                f"Linearization (got params={params!r}, chunk_size={chunk_size!r})."
            )
        return network
    if not isinstance(network, nn.Module):
        raise TypeError(
            f"{where}: network must be a torch.nn.Module or a pyro_ntk.Linearization, got "
            f"{type(network).__name__}."
        )
    return Linearization(network, params, chunk_size=chunk_size)
