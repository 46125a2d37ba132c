r"""The ``auto`` engine: products by whichever engine is faster for this network, measured.

For a network with factored layers (``nn.Linear``, ``nn.Conv2d``) the structured engine's
dense kernel needs no Jacobian for plain ``Linear`` layers and is never slower than the
generic per-example Jacobian contraction by more than its small factor overhead, so dense
blocks, diagonals and Jacobians always come from it. Its matrix-free products, however,
lose to the cached ``torch.func`` closures on some networks (several outputs through wide
layers, where the per-example contraction with the output sensitivities ``B`` is a batch of
small matrix products; a large generic remainder, whose tangent pass the structured engine
runs in addition to its factored layers). So the two are timed on the first input:

.. math::

    t_e = \min_{3\ \mathrm{rounds}}\ \big(\text{time of } J(X_m)\,(J(X_m)^\top u)\big),
    \qquad X_m = \text{the first } m = \min(N, 64) \text{ rows of the first input},

in their steady state (each engine's per-chunk cache built beforehand), and ``J V`` /
``Jᵀ U`` go to the cached engine when :math:`t_{\mathrm{cached}} < t_{\mathrm{structured}}
/ 1.1` (ties stay structured, whose factors the Kronecker preconditioner also uses). Both
engines are proven against the reference products before they are timed, and share one set
of routes (a fallback either needs applies to both).

Cost: one cache build and six products per engine on ``m`` rows, once per network.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from pyro_ntk._engines.base import Engine
from pyro_ntk._engines.cached import CachedEngine
from pyro_ntk._engines.preflight import Reference, Report
from pyro_ntk._engines.structured import StructuredEngine
from pyro_ntk._parameters import ParameterSpace

MARGIN = 1.1
"""The cached engine takes the products only when this much faster."""


class AutoEngine(Engine):
    """Dense products from the structured engine; ``J V`` and ``Jᵀ U`` from the faster one.

    Args:
        network: the user's network.
        space: the linearized parameter space.
    """

    name = "auto"

    def __init__(self, network: nn.Module, space: ParameterSpace):
        super().__init__(network, space)
        self.structured = StructuredEngine(network, space)
        self.cached = CachedEngine(network, space)
        self.structured.routes = self.cached.routes = self.routes
        self.products: Engine = self.structured
        self.timings: dict[str, float] = {}
        self.timing_rows: Tensor | None = None
        """Rows the engines are timed on (set by the caller from its first input)."""

    @property
    def plan(self):
        """The structured engine's plan (factored layers and the generic remainder)."""
        return self.structured.plan

    @property
    def cache(self):
        """The chunk cache of the engine that computes the products."""
        return self.products.cache

    def set_copy_inputs(self, value: bool) -> None:
        """Copy inputs before every forward (in all three engines)."""
        for engine in (self, self.structured, self.cached):
            engine.copy_inputs = value

    def clear_cache(self) -> None:
        """Release both engines' cached chunks."""
        self.structured.clear_cache()
        self.cached.clear_cache()

    # ------------------------------------------------------------------ proof and choice
    def prepare(self, where: str, ref: Reference, report: Report) -> None:
        """Prove both engines (until the shared routes settle), then time their products."""
        self.adopt(ref)  # both engines share these routes
        for _ in range(3):
            before = vars(self.routes).copy()
            self.cached.prepare(where, ref, report)
            self.structured.prepare(where, ref, report)
            if vars(self.routes) == before:
                break
        if not self.timings:
            self._choose(ref, report)

    def prove_dense(self, where: str, ref: Reference, report: Report) -> None:
        """The dense route is the structured engine's."""
        self.structured.prove_dense(where, ref, report)

    def _choose(self, ref: Reference, report: Report) -> None:
        if not self.structured.plan.layers:  # nothing factored: the closures do it all
            self.products = self.cached
            report.add("products (auto)", "cached", "no layer could be factored")
            return
        X = self.timing_rows if self.timing_rows is not None else ref.X
        O = ref.num_outputs
        gen = torch.Generator(device="cpu").manual_seed(4)  # the caller's RNG is not touched
        u = torch.randn(X.shape[0], O, 1, generator=gen, dtype=self.space.dtype)
        u = u.to(self.space.device)
        for name, engine in (("structured", self.structured), ("cached", self.cached)):
            engine.jvp(X, engine.vjp(X, u))  # builds the chunk's cache
            best = float("inf")
            for _ in range(3):
                _sync(X)
                t0 = time.perf_counter()
                engine.jvp(X, engine.vjp(X, u))
                _sync(X)
                best = min(best, time.perf_counter() - t0)
            self.timings[name] = best
            engine.clear_cache()
            engine.cache.reset_counts()
        s, c = self.timings["structured"], self.timings["cached"]
        self.products = self.cached if c * MARGIN < s else self.structured
        report.add(
            "products (auto)",
            self.products.name,
            f"J(Jᵀu) on {X.shape[0]} examples: structured {s * 1e3:.3g} ms, cached "
            f"{c * 1e3:.3g} ms (cached is taken when {MARGIN}× faster); dense by structured",
        )

    # ------------------------------------------------------------------ products
    def jvp(self, X: Tensor, V: Tensor) -> Tensor:
        return self.products.jvp(X, V)

    def vjp(self, X: Tensor, U: Tensor) -> Tensor:
        return self.products.vjp(X, U)

    def jacobian(self, X: Tensor) -> Tensor:
        return self.structured.jacobian(X)

    def ntk_diag(self, X: Tensor, scale: Tensor | None) -> Tensor:
        return self.structured.ntk_diag(X, scale)

    def ntk_block(self, X1: Tensor, X2: Tensor, scale: Tensor | None) -> Tensor:
        return self.structured.ntk_block(X1, X2, scale)


def _sync(X: Tensor) -> None:
    if X.device.type == "cuda":
        torch.cuda.synchronize(X.device)
