"""The engine interface: Jacobian products for one chunk of inputs, and their proof."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pyro_ntk._engines.preflight import (
    Reference,
    Report,
    agree,
    plain_products,
    probe_rows,
    tolerance,
)
from pyro_ntk._engines.preflight import relative_error as _relative_error
from pyro_ntk._engines.routes import Dense, Push, Routes, dense_rows, reference_kernels
from pyro_ntk.parameters import ParameterSpace


class Engine(ABC):
    """Jacobian products of ``f(θ, X)`` at θ* for one chunk ``X`` of ``n`` inputs.

    Shapes: ``P`` parameters, ``O`` outputs per example, ``k`` right-hand sides. Every
    method is called with the network already in eval mode.

    Args:
        network: the user's network; only called through ``functional_call``.
        space: the linearized parameter space (θ* and the fixed tensors).
    """

    name: str = "base"
    caches_closures: bool = False
    """Whether the engine keeps per-chunk ``torch.func`` closures (replayed by later calls)."""

    def __init__(self, network: nn.Module, space: ParameterSpace):
        self.network = network
        self.space = space
        self.routes = Routes()
        self.copy_inputs = False  # set by the preflight when the forward writes its input

    def f(self, theta: dict[str, Tensor], X: Tensor) -> Tensor:
        """The network as a function of its linearized parameters, output ``(n, O)``."""
        with reference_kernels(self.routes.reference_kernels):
            return self.f_plain(theta, X)

    def f_plain(self, theta: dict[str, Tensor], X: Tensor) -> Tensor:
        """:meth:`f` with torch's default kernels (the preflight chooses the kernels)."""
        if self.copy_inputs:
            X = X.clone()
        out = functional_call(self.network, (theta, self.space.fixed), (X,))
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Linearization: the network must return a single tensor, got {type(out).__name__}."
            )
        return out.reshape(X.shape[0], -1)

    def forward(self, X: Tensor) -> Tensor:
        """f(X; θ*), shape ``(n, O)``."""
        with torch.no_grad():
            return self.f(self.space.theta, X)

    @abstractmethod
    def jvp(self, X: Tensor, V: Tensor) -> Tensor:
        """J(X) V for ``V`` of shape ``(P, k)``, giving ``(n, O, k)``."""

    @abstractmethod
    def vjp(self, X: Tensor, U: Tensor) -> Tensor:
        """J(X)ᵀ U for ``U`` of shape ``(n, O, k)``, giving ``(P, k)``."""

    def jacobian(self, X: Tensor) -> Tensor:
        """Dense per-example Jacobian, shape ``(n, O, P)``, by the proven dense route."""
        rows = dense_rows(self.f, self.space.theta, X, self.routes.dense)
        return self.space.flatten_batched(rows, lead=2)

    def clear_cache(self) -> None:  # noqa: B027 - a no-op for engines that cache nothing
        """Release cached per-chunk state (engines without a cache keep none)."""

    # ------------------------------------------------------------------ proof
    def prepare(self, where: str, ref: Reference, report: Report) -> None:
        """Prove this engine's products against the plain reference products on ``ref.X``.

        Adopts the reference's push route and kernels, then checks ``J V`` and ``Jᵀ U``
        (three times each with fresh vectors on caching engines, so cached closures are
        replayed), falling back step by step (:meth:`fallbacks`) until they agree. Raises
        ``ValueError`` when even the last fallback disagrees. The dense routes are proven
        separately, on first use (:meth:`prove_dense`).
        """
        self.adopt(ref)
        self._prove(where, "products", lambda: self._products_error(ref), self.fallbacks(), report)

    def prove_dense(self, where: str, ref: Reference, report: Report) -> None:
        """Prove the dense rows, diagonal and blocks on ``ref.X`` (and on ``O`` examples).

        Falls back from ``vmap`` over examples to ``jacrev`` of the whole chunk, then to a
        loop over examples. Called before the first dense product of each input signature;
        it holds ``max(3, O)·O·P`` numbers for a moment.
        """
        dense = [
            ("per-example Jacobian by a loop over examples", lambda: self._set_dense(Dense.LOOP)),
        ]
        if self.routes.dense is Dense.PER_EXAMPLE:
            dense.insert(
                0,
                (
                    "per-example Jacobian by jacrev of the whole chunk",
                    lambda: self._set_dense(Dense.BATCHED),
                ),
            )
        self._prove(where, "dense rows", lambda: self._dense_error(ref), dense, report)

    def adopt(self, ref: Reference) -> None:
        """Take the reference's push route and kernels (the more conservative ones stay)."""
        before = (self.routes.push, self.routes.reference_kernels)
        if ref.route is Push.DOUBLE_VJP:
            self.routes.push = Push.DOUBLE_VJP
        self.routes.reference_kernels |= ref.kernels
        if (self.routes.push, self.routes.reference_kernels) != before:
            self.clear_cache()  # entries built with the other route

    def fallbacks(self) -> list[tuple[str, object]]:
        """Adjustments tried in order when the products disagree with the reference.

        Engines that keep closures first drop the ``linearize`` one; then every engine
        loops over right-hand sides instead of ``vmap``.
        """
        steps = [("right-hand sides by a loop (no vmap)", self._no_vmap)]
        if self.caches_closures:
            steps.insert(0, ("no torch.func.linearize closure", self._no_linearize))
        return steps

    def _no_linearize(self) -> None:
        self.routes.cache_linearize = False
        self.clear_cache()

    def _no_vmap(self) -> None:
        self.routes.vmap_columns = False
        self.clear_cache()

    def _set_dense(self, how: Dense) -> None:
        self.routes.dense = how

    def _prove(self, where, what, error, fallbacks, report) -> None:
        problem = error()
        tried = []
        for label, adjust in fallbacks:
            if problem is None:
                break
            tried.append(f"{problem} → {label}")
            adjust()
            problem = error()
        if problem is not None:
            raise ValueError(
                f"{where}: no exact route for the {what} of network "
                f"{type(self.network).__name__} on engine {self.name!r}: "
                f"{'; '.join(tried + [problem])}. Try implementation='functorch'."
            )
        for step in tried:
            report.add(f"{what} ({self.name})", "fallback", step)

    def _products_error(self, ref: Reference) -> str | None:
        """Why this engine's products disagree with ``ref`` (``None``: they agree)."""
        tol = tolerance(self.space.dtype)
        gen = torch.Generator(device="cpu").manual_seed(1)
        # fresh vectors on each call: an engine's cached closures are replayed (and a
        # linearize graph that drifts does so from the second call on)
        for call in range(3 if self.caches_closures else 1):
            V = torch.randn(self.space.num_params, 2, generator=gen, dtype=self.space.dtype)
            V = V.to(self.space.device)
            try:
                got = self.jvp(ref.X, V)
            except Exception as exc:  # noqa: BLE001 - becomes a fallback step
                return f"J·v raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            want = ref.push(V)
            if not agree(got, want, tol):
                return f"J·v call {call + 1} off by {_relative_error(got, want):.2g}"
            U = torch.randn(want.shape, generator=gen, dtype=self.space.dtype).to(V.device)
            try:
                got = self.vjp(ref.X, U)
            except Exception as exc:  # noqa: BLE001
                return f"Jᵀu raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            want = ref.pull(U)
            if not agree(got, want, tol):
                return f"Jᵀu call {call + 1} off by {_relative_error(got, want):.2g}"
        return None

    def _dense_error(self, ref: Reference) -> str | None:
        """Why the dense rows, diagonal or block disagree with ``ref`` (``None``: agree)."""
        tol = tolerance(self.space.dtype)
        O = ref.num_outputs
        probes = [ref]
        if 2 <= O <= 16 and O != ref.X.shape[0]:
            # batching-rule bugs can depend on the batch equalling O (nested vmap, PReLU)
            XO = probe_rows(ref.X, O)
            probes.append(plain_products(self.space, self.f_plain, XO, ref.route, ref.kernels))
        gen = torch.Generator(device="cpu").manual_seed(2)
        for r in probes:
            n = r.X.shape[0]
            V = torch.randn(self.space.num_params, 2, generator=gen, dtype=self.space.dtype)
            V = V.to(self.space.device)
            U = torch.randn(n, O, 2, generator=gen, dtype=self.space.dtype).to(V.device)
            try:
                J = self.jacobian(r.X)
                K = self.ntk_block(r.X, r.X, None)
                diag = self.ntk_diag(r.X, None)
            except Exception as exc:  # noqa: BLE001
                return f"dense rows raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            JV = torch.einsum("nop,pk->nok", J, V)
            want = r.push(V)
            if not agree(JV, want, tol):
                return f"Jacobian rows (n = {n}) off by {_relative_error(JV, want):.2g}"
            KU = K @ U.reshape(n * O, 2)
            want = r.push(r.pull(U)).reshape(n * O, 2)
            if not agree(KU, want, tol):
                return f"dense K (n = {n}) off by {_relative_error(KU, want):.2g}"
            if not agree(diag.reshape(-1), torch.diagonal(K), tol):
                return f"diag K (n = {n}) off by {_relative_error(diag.reshape(-1), torch.diagonal(K)):.2g}"
        return None

    def ntk_diag(self, X: Tensor, scale: Tensor | None) -> Tensor:
        """Diag of J diag(scale) Jᵀ for this chunk, shape ``(n, O)``; ``scale`` is ``(P,)``."""
        J = self.jacobian(X)
        return (J.square() * scale).sum(-1) if scale is not None else J.square().sum(-1)

    def ntk_block(self, X1: Tensor, X2: Tensor, scale: Tensor | None) -> Tensor:
        """Dense block J(X1) diag(scale) J(X2)ᵀ, shape ``(n1·O, n2·O)``."""
        J1 = self.jacobian(X1)
        J2 = J1 if X2 is X1 else self.jacobian(X2)
        if scale is not None:
            J1 = J1 * scale
        # (n1, O, P) · (n2, O, P) → (n1, O, n2, O), rows n·O + o
        K = torch.einsum("aop,bqp->aobq", J1, J2)
        return K.reshape(J1.shape[0] * J1.shape[1], J2.shape[0] * J2.shape[1])
