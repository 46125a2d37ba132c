r"""The generic engine: ``torch.func`` vjp + jvp of the whole chunk, for any network.

.. math::

    J(X)^\top U = \mathrm{vjp}_\theta f(\theta^*, X)[U], \qquad
    J(X)\, V = \mathrm{jvp}_\theta f(\theta^*, X)[V],

each evaluated from scratch (nothing kept between products): :func:`stream_vjp` and
:func:`stream_jvp`, which the structured engine also uses for the products it does not
factor. Example::

    out = stream_jvp(engine, X, V)  # V (P, k) -> (n, O, k)
"""

from __future__ import annotations

from torch import Tensor
from torch.func import vjp

from pyro_ntk._engines.base import Engine
from pyro_ntk._engines.routes import pull_columns, push_columns


def stream_jvp(engine: Engine, X: Tensor, V: Tensor) -> Tensor:
    """``J(X) V`` by ``torch.func`` through the engine's proven push route, ``(n, O, k)``.

    ``V`` is ``(P, k)``. Cost: forward-mode AD, about 2–3 forward passes per column (one
    ``vmap``-ed pass for ``k > 1``); memory about one forward's live activations, twice.
    """
    tangents = engine.space.unflatten_batched(V)  # {name: (k, *shape)}
    out = push_columns(lambda p: engine.f(p, X), engine.space.theta, tangents, engine.routes)
    return out.permute(1, 2, 0)  # (k, n, O) → (n, O, k)


def stream_vjp(engine: Engine, X: Tensor, U: Tensor) -> Tensor:
    """``J(X)ᵀ U`` by ``torch.func`` through the engine's proven columns route, ``(P, k)``.

    ``U`` is ``(n, O, k)``. Cost: one forward and one backward pass (the ``k`` columns
    ``vmap``-ed through one pullback); memory: a forward+backward's saved activations.
    """
    _, pullback = vjp(lambda p: engine.f(p, X), engine.space.theta)
    grads = pull_columns(pullback, U.permute(2, 0, 1), engine.routes)  # {name: (k, *shape)}
    return engine.space.flatten_batched(grads).T  # (P, k)


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
        return stream_jvp(self, X, V)

    def vjp(self, X: Tensor, U: Tensor) -> Tensor:
        return stream_vjp(self, X, U)
