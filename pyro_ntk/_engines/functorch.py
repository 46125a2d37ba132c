"""The generic engine: ``torch.func`` vjp + jvp under ``vmap``, for any network."""

from __future__ import annotations

from torch import Tensor
from torch.func import vjp

from pyro_ntk._engines.base import Engine
from pyro_ntk._engines.routes import pull_columns, push_columns


class FuncTorchEngine(Engine):
    """Products by ``torch.func``: all right-hand sides in one ``vmap``-ed pass.

    Cost per chunk of ``n`` inputs: ``jvp`` ≈ 2–3 forward passes, ``vjp`` ≈ 1 forward +
    1 backward, independent of how many columns ``k`` (they are batched by ``vmap``);
    the per-example Jacobian costs ``O`` backward passes and ``n·O·P`` memory. The routes
    (forward mode or double VJP, ``vmap`` or a loop, reference kernels) are the ones the
    preflight proved for the network (:mod:`pyro_ntk._engines.routes`).
    """

    name = "functorch"

    def jvp(self, X: Tensor, V: Tensor) -> Tensor:
        tangents = self.space.unflatten_batched(V)  # {name: (k, *shape)}
        out = push_columns(lambda p: self.f(p, X), self.space.theta, tangents, self.routes)
        return out.permute(1, 2, 0)  # (k, n, O) → (n, O, k)

    def vjp(self, X: Tensor, U: Tensor) -> Tensor:
        _, pullback = vjp(lambda p: self.f(p, X), self.space.theta)
        grads = pull_columns(pullback, U.permute(2, 0, 1), self.routes)  # {name: (k, *shape)}
        return self.space.flatten_batched(grads).T  # (P, k)
