"""The base of :class:`pyro_ntk.Linearization`: its input gate, the one chunk loop, the hot path.

Every product of the package runs through the row chunks of :meth:`ChunkedProducts.chunks`
(the single loop over data, and the seam where data sharding sums over ranks:
:meth:`ChunkedProducts.sum_over_shards`). The ``*_unchecked`` products and
:meth:`ChunkedProducts.perturbed_gradient` are the engine contract that operators build
on: inputs validated once at a public entry (:meth:`ChunkedProducts.check_inputs`,
:func:`pyro_ntk.parameters.normalize_variance`), then no checks and no host
synchronization per product. Cost: see each product; memory is bounded by ``chunk_size``
× activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from pyro_ntk._checks import check_vector
from pyro_ntk._engines.base import Engine
from pyro_ntk._engines.inputs import InputGate, eval_mode
from pyro_ntk._engines.preflight import Report
from pyro_ntk._engines.structured import LayerFactors, StructuredEngine
from pyro_ntk.parameters import ParameterSpace


class ChunkedProducts:
    """Products of ``engine`` over the row chunks of validated inputs.

    Args:
        network: the user's network (evaluated in eval mode, flags restored).
        space: the linearized parameter space.
        engine: the per-chunk product engine.
        chunk_size: inputs per chunk (``None``: all at once).
        report: where the preflight records its decisions.
    """

    def __init__(
        self,
        network: nn.Module,
        space: ParameterSpace,
        engine: Engine,
        chunk_size: int | None,
        report: Report,
    ):
        self.network, self.space, self.engine, self.chunk_size = network, space, engine, chunk_size
        self._gate = InputGate(network, space, engine, report)

    # ------------------------------------------------------------------ properties
    @property
    def num_params(self) -> int:
        """P, the number of linearized scalar parameters."""
        return self.space.num_params

    @property
    def dtype(self) -> torch.dtype:
        """The network parameters' dtype; inputs and vectors must match it."""
        return self.space.dtype

    @property
    def device(self) -> torch.device:
        """The network parameters' device; inputs and vectors must live there."""
        return self.space.device

    @property
    def theta(self) -> dict[str, Tensor]:
        """θ*: detached copies of the linearized parameters (do not modify in place)."""
        return self.space.theta

    @property
    def groups(self) -> list[str]:
        """Parameter groups (owning modules, i.e. layers), the index set of σ_g²."""
        return self.space.groups

    def output_dim(self, X: Tensor) -> int:
        """O, the number of outputs per example (validates ``X``)."""
        self.check_inputs("Linearization.output_dim", "X", X)
        return self._gate.output_dim

    # ------------------------------------------------------------------ validation
    def check_inputs(self, where: str, name: str, X: object) -> Tensor:
        """Validate inputs ``X`` ``(N, ...)`` for this network; the one check of every public entry.

        A tensor of the network's device, a floating dtype equal to the network's (integer
        inputs such as token ids pass as they are), finite, with at least one row. The first
        input of each feature shape and dtype also runs the preflight (the network's
        determinism, independence of examples, state writes, the proven product routes);
        a tensor validated before and unchanged since passes without another pass.

        Args:
            where: the public entry point, first in every message.
            name: the argument's name, for the message.
            X: the candidate inputs.

        Returns:
            ``X`` (detached when it requires grad: no gradient reaches the inputs).

        Raises:
            TypeError, ValueError: naming ``where``, ``name``, what was given and what was expected.
        """
        return self._gate.check(where, name, X)

    def variance_scale(self, where: str, variance: Tensor | float | None) -> Tensor | None:
        """Per-parameter σ² ``(P,)`` from ``None``, a scalar or per-group ``(G,)`` σ² ≥ 0.

        The check of the products' ``variance`` argument
        (:meth:`ParameterSpace.normalize_variance <pyro_ntk.parameters.ParameterSpace.normalize_variance>`);
        ``None`` stays ``None`` (unit variance).
        """
        if variance is None:
            return None
        value, _ = self.space.normalize_variance(where, variance)
        return self.space.expand_group_values(value)

    # ------------------------------------------------------------------ the chunk loop
    def chunks(self, N: int) -> Iterator[slice]:
        """The row chunks of ``N`` inputs: the one loop over data (the seam for sharding)."""
        step = self.chunk_size or N
        for start in range(0, N, step):
            yield slice(start, min(start + step, N))

    def _over_rows(self, fn, X: Tensor, *args: Tensor) -> Tensor:
        """``fn(X[c], *args)`` over the row chunks of ``X``, concatenated along rows.

        One chunk (the common case) is passed whole: no slicing and no concatenation copy.
        """
        N = X.shape[0]
        if not self.chunk_size or self.chunk_size >= N:
            return fn(X, *args)
        return torch.cat([fn(X[c], *args) for c in self.chunks(N)])

    def sum_over_shards(self, partial: Tensor) -> Tensor:
        """Sum a parameter-space partial sum over data shards (the seam for data sharding).

        Identity here; :class:`pyro_ntk.distributed.ShardedLinearization` all-reduces it
        across ranks, so every Jᵀu (and with it K·V, F·v) is the sum over all shards.
        """
        return partial

    # ------------------------------------------------------------------ hot path
    # The forms of jvp / vjp / ntk_mvm for callers that validated everything at their own
    # public entry (operators, solvers): no checks and no host synchronization.
    def jvp_unchecked(self, X: Tensor, V: Tensor) -> Tensor:
        """J(X) V for ``X`` that passed :meth:`check_inputs` and ``V (P, k)``: ``(N, O, k)``."""
        with eval_mode(self.network):
            return self._over_rows(self.engine.jvp, X, V)

    def vjp_unchecked(self, X: Tensor, U: Tensor) -> Tensor:
        """Σ over row chunks of J(X_c)ᵀ U_c for checked ``X`` and ``U (N, O, k)``: ``(P, k)``."""
        N = X.shape[0]
        with eval_mode(self.network):
            if not self.chunk_size or self.chunk_size >= N:
                return self.sum_over_shards(self.engine.vjp(X, U))
            out = None
            for c in self.chunks(N):
                part = self.engine.vjp(X[c], U[c])
                out = part if out is None else out + part
        return self.sum_over_shards(out)

    def ntk_mvm_unchecked(
        self, X1: Tensor, X2: Tensor | None, V: Tensor, scale: Tensor | None
    ) -> Tensor:
        """K(X1, X2) V for checked inputs, ``V (N2·O, k)`` and per-parameter σ² ``scale (P,)``.

        ``scale`` is ``None`` (unit variance) or the output of :meth:`variance_scale` (or of
        ``space.expand_group_values`` on a normalized σ²). Returns ``(N1·O, k)``.
        """
        X2 = X1 if X2 is None else X2
        N2, O = X2.shape[0], V.shape[0] // X2.shape[0]
        # V → J(X2)ᵀ V → diag(σ²) J(X2)ᵀ V → J(X1) diag(σ²) J(X2)ᵀ V
        JTV = self.vjp_unchecked(X2, V.reshape(N2, O, -1))
        if scale is not None:
            JTV = JTV * scale.unsqueeze(-1)
        return self.jvp_unchecked(X1, JTV).reshape(X1.shape[0] * O, -1)

    def perturbed_gradient(
        self, X: Tensor, steps: Tensor, loss: Callable[[Tensor, slice], Tensor]
    ) -> Tensor:
        r"""Gradients of a row-chunked loss at perturbed parameters, one per column of ``steps``.

        .. math::

            G_{:, j} = \sum_c \nabla_\theta\, \mathrm{loss}\big(f(X_c; \theta), c\big)
            \Big|_{\theta = \theta^* + s_j}

        (the finite-difference Fisher's building block). Evaluated in eval mode, row chunk by
        row chunk, the columns batched by ``vmap``, and summed over data shards.

        Args:
            X: inputs ``(N, ...)``.
            steps: parameter-space perturbations ``(P, k)``; column ``j`` is ``s_j``.
            loss: ``loss(f, rows) -> scalar``, with ``f`` the outputs ``(n_c, O)`` at the row
                chunk ``rows`` (a ``slice`` over the rows of ``X``); it must be ``vmap``-able.

        Returns:
            ``(P, k)``. Cost per chunk: one forward and one backward pass for all ``k``
            columns (``vmap``-ed); memory ``k`` × activations of a chunk.
        """
        where = "Linearization.perturbed_gradient"
        X = self.check_inputs(where, "X", X)
        steps = check_vector(where, "steps", steps, self.num_params, self.dtype, self.device, "P")
        if steps.dim() != 2:
            raise ValueError(
                f"{where}: steps has shape {tuple(steps.shape)}; expected ({self.num_params}, k)."
            )
        if not callable(loss):
            raise TypeError(
                f"{where}: loss must be a callable (f, rows) -> scalar, got {type(loss).__name__}."
            )
        space, f = self.space, self.engine.f
        theta = space.theta
        tree = space.unflatten_batched(steps)  # {name: (k, *shape)}
        out = torch.zeros_like(steps)
        with eval_mode(self.network):
            for rows in self.chunks(X.shape[0]):
                Xc = X[rows]

                def at(params: dict[str, Tensor], Xc: Tensor = Xc, rows: slice = rows) -> Tensor:
                    return loss(f(params, Xc), rows)

                def column(step: dict[str, Tensor], at=at) -> dict[str, Tensor]:
                    return grad(at)({n: theta[n] + step[n] for n in theta})

                out = out + space.flatten_batched(vmap(column)(tree)).T
        return self.sum_over_shards(out)

    def layer_factors(self, X: Tensor) -> list[LayerFactors] | None:
        r"""The per-layer (K-FAC) factors of the factored Linear/Conv2d layers at ``X``.

        For each layer whose factors the engine keeps, its parameter slices and, per row
        chunk, the inputs ``A (n_c, S, d_in)`` and output sensitivities
        ``B (n_c, O, S, d_out)`` with :math:`\partial f_o(x_n)/\partial W = \sum_s B_{nos}
        A_{ns}^\top` (:class:`LayerFactors`). ``None`` when the engine has no per-layer
        structure (``implementation`` other than ``structured``). Cost: the structured
        engine's factor pass (one forward and ``O`` backward passes per chunk, cached and
        shared with every later product on the same rows).
        """
        X = self.check_inputs("Linearization.layer_factors", "X", X)
        if not isinstance(self.engine, StructuredEngine):
            return None
        with eval_mode(self.network):
            return self.engine.layer_factors([X[c] for c in self.chunks(X.shape[0])])
