"""The generic engine: ``torch.func`` vjp + jvp under ``vmap``, for any network."""

from __future__ import annotations

from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap

from pyro_ntk._engines.base import Engine


class FuncTorchEngine(Engine):
    """Products by ``torch.func``: all right-hand sides in one ``vmap``-ed pass.

    Cost per chunk of ``n`` inputs: ``jvp`` ≈ 2–3 forward passes, ``vjp`` ≈ 1 forward +
    1 backward, independent of how many columns ``k`` (they are batched by ``vmap``);
    the per-example Jacobian costs ``O`` backward passes and ``n·O·P`` memory.
    """

    name = "functorch"

    def jvp(self, X: Tensor, V: Tensor) -> Tensor:
        theta = self.space.theta
        tangents = self.space.unflatten_batched(V)  # {name: (k, *shape)}

        def column(t: dict[str, Tensor]) -> Tensor:
            # v → J v (one forward-mode pass; the primal is shared across columns by vmap)
            return jvp(lambda p: self.f(p, X), (theta,), (t,))[1]

        return vmap(column)(tangents).permute(1, 2, 0)  # (k, n, O) → (n, O, k)

    def vjp(self, X: Tensor, U: Tensor) -> Tensor:
        _, pullback = vjp(lambda p: self.f(p, X), self.space.theta)
        # u → Jᵀ u for every column at once
        grads = vmap(lambda u: pullback(u)[0])(U.permute(2, 0, 1))  # {name: (k, *shape)}
        return self.space.flatten_batched(grads).T  # (P, k)

    def jacobian(self, X: Tensor) -> Tensor:
        def single(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return self.f(p, x.unsqueeze(0)).reshape(-1)

        # per-example reverse mode (never jacrev over the batched forward)
        jac = vmap(jacrev(single), in_dims=(None, 0))(self.space.theta, X)  # {name: (n, O, *shape)}
        return self.space.flatten_batched(jac, lead=2)
