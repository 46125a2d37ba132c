r"""The empirical NTK Gram matrix as a matrix-free, differentiable ``linear_operator``.

.. math::

    K(X_1, X_2) = J(X_1)\, \mathrm{diag}(\sigma^2)\, J(X_2)^\top
    \in \mathbb{R}^{(N_1 \cdot O) \times (N_2 \cdot O)},
    \qquad \sigma^2_p = \sigma^2_{g(p)},

with one variance per parameter group ``g`` (layer) or one shared scalar. ``K`` is never
formed for products: ``K V`` is one VJP over ``X2`` and one JVP over ``X1`` for all
columns of ``V`` at once (:meth:`pyro_ntk.Linearization.ntk_mvm`). σ² is a tensor in the
operator's representation, so gradients reach it through every ``linear_operator``
routine (solves, ``inv_quad_logdet``, pivoted Cholesky, root decompositions).
"""

from __future__ import annotations

import torch
from linear_operator.operators import (
    DenseLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    MatmulLinearOperator,
    RootLinearOperator,
)
from linear_operator.utils.getitem import _is_noop_index
from linear_operator.utils.memoize import cached
from torch import Tensor, nn

from pyro_ntk._checks import check_tensor
from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.operators.base import (
    RepeatedMatrixOperator,
    as_data,
    example_index,
    flat_index,
    from_columns,
    move,
    select_examples,
    to_columns,
)
from pyro_ntk.operators.jacobian import JacobianLinearOperator
from pyro_ntk.parameters import ParamSelector

__all__ = ["NTKLinearOperator"]


def _same_inputs(X1: Tensor, X2: Tensor) -> bool:
    """Whether ``X1`` and ``X2`` hold the same inputs (same object, same view or equal)."""
    if X2 is X1:
        return True
    if X1.shape != X2.shape or X1.dtype != X2.dtype or X1.device != X2.device:
        return False
    if X1.data_ptr() == X2.data_ptr() and X1.stride() == X2.stride():
        return True
    return bool(torch.equal(X1, X2))


class NTKLinearOperator(RepeatedMatrixOperator):
    r"""The empirical NTK :math:`K(X_1, X_2) = J(X_1)\,\mathrm{diag}(\sigma^2)\,J(X_2)^\top`.

    .. math::

        K_{n \cdot O + o,\; m \cdot O + q}
        = \sum_g \sigma_g^2 \sum_{p \in g}
          \frac{\partial f_o(x_n)}{\partial \theta_p}\,
          \frac{\partial f_q(x'_m)}{\partial \theta_p}.

    Shape ``(*batch_shape, N1·O, N2·O)``, rows/columns sample-major (``n·O + o``). Positive
    semi-definite when ``X2`` is ``X1`` (rank at most ``P``: add noise or jitter before
    solving).

    Cost (``P`` parameters, ``k`` right-hand-side columns, batch dims folded into
    columns):

    * ``K @ V``: one VJP over ``X2`` + one JVP over ``X1``, all ``k`` columns in one
      ``vmap``-ed pass; memory ``P·k`` plus ``chunk_size`` × activations;
    * ``diagonal()``: exact, ``O`` per-example backward passes per input
      (:meth:`pyro_ntk.Linearization.ntk_diag`); also used as ``_approx_diagonal``;
    * ``K[rows]`` (pivoted Cholesky): one VJP over the selected examples + one JVP over
      ``X2``; slices of whole examples stay lazy (``K[:n, :n]`` is again an
      ``NTKLinearOperator``);
    * gradient in σ²: two VJPs per bilinear form (one when symmetric), no JVP;
    * samples (``zero_mean_mvn_samples``, hence gpytorch's ``rsample()``): exact, through
      the root ``R = J(X) diag(σ)`` of shape ``(N·O, P)`` (one JVP for all samples); the
      same root from ``root_decomposition(method="exact")``;
    * ``to_dense()``: :meth:`pyro_ntk.Linearization.ntk_dense` (small problems).

    ``.double()``, ``.float()``, ``.to(...)`` build the operator over a converted copy of
    the linearization (:meth:`pyro_ntk.Linearization.to`); the user's
    network is never modified. The inputs are data: they are detached, no gradient
    flows to them.

    Args:
        X1: inputs ``(N1, ...)`` that the network accepts.
        X2: inputs ``(N2, ...)``; ``None`` means ``X1`` (the symmetric Gram matrix).
        variance: σ², ``None`` (1), a non-negative number, a 0-dim tensor, or a ``(G,)``
            tensor with one variance per parameter group (``linearization.groups``). A
            tensor that requires grad receives gradients.
        network: the trained ``nn.Module``, or a :class:`~pyro_ntk.Linearization` to share
            its θ* copy and products (as kernels and solvers built on it do). Keyword-only,
            after the tensors: ``linear_operator`` rebuilds operators from their tensor
            arguments.
        params: which parameters to linearize when ``network`` is an ``nn.Module`` (as
            :class:`~pyro_ntk.Linearization`; ``None``: all with ``requires_grad``).
        chunk_size: inputs per chunk when ``network`` is an ``nn.Module``.
        batch_shape: batch dimensions over which the same ``K`` is repeated (set by
            ``linear_operator`` when it broadcasts; rarely needed by hand). A right-hand
            side with batch dimensions ``(*batch, N2·O, C)`` needs none: its batch is
            folded into columns.
        variance_checked: ``variance`` is already the tensor this operator normalized
            (set by the operator itself and kept when ``linear_operator`` rebuilds it, so
            products run no check and no host synchronization).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = Linearization(net)
        >>> X = torch.randn(6, 3)
        >>> K = NTKLinearOperator(X, variance=torch.tensor([0.5, 2.0]), network=lin)
        >>> K.shape
        torch.Size([6, 6])
        >>> (K @ torch.randn(6, 2)).shape
        torch.Size([6, 2])
        >>> bool(torch.allclose(K.diagonal(), K.to_dense().diagonal()))
        True
        >>> NTKLinearOperator(X, torch.randn(4, 3), network=net).shape
        torch.Size([6, 4])
    """

    def __init__(
        self,
        X1: Tensor,
        X2: Tensor | None = None,
        variance: Tensor | float | None = None,
        *,
        network: nn.Module | Linearization,
        params: ParamSelector = None,
        chunk_size: int | None = None,
        batch_shape: tuple[int, ...] = (),
        variance_checked: bool = False,
    ):
        where = "NTKLinearOperator"
        lin = as_linearization(where, network, params, chunk_size)
        X1 = as_data(check_tensor(where, "X1", X1))
        X2 = X1 if X2 is None else as_data(check_tensor(where, "X2", X2))
        self.num_outputs = lin.output_dim(lin.check_inputs(where, "X1", X1))  # validates X1
        if X2 is not X1:
            lin.check_inputs(where, "X2", X2)  # validates X2 (and that it has the same outputs)
        if not variance_checked:  # once, at the public entry (not when linear_operator rebuilds)
            variance, _ = lin.space.normalize_variance(where, variance)
        batch_shape = torch.Size(batch_shape)
        super().__init__(
            X1, X2, variance, network=lin, batch_shape=batch_shape, variance_checked=True
        )
        self.X1, self.X2, self.variance, self.linearization = X1, X2, variance, lin
        self._batch = batch_shape
        # Symmetric iff the inputs are equal (decided once; survives clones/reconstructions).
        self.symmetric = _same_inputs(X1, X2)

    # -------------------------------------------------------------- structure
    def _matrix_size(self) -> tuple[int, int]:
        O = self.num_outputs
        return (self.X1.shape[0] * O, self.X2.shape[0] * O)

    def _with_batch(self, batch_shape: torch.Size) -> LinearOperator:
        return NTKLinearOperator(
            self.X1, self.X2, self.variance, network=self.linearization, batch_shape=batch_shape
        )

    def _set_requires_grad(self, val: bool) -> None:
        # Only σ² is a differentiable parameter; the inputs are data.
        if self.variance.dtype.is_floating_point:
            self.variance.requires_grad_(val)

    def _scale(self) -> Tensor:
        """Per-parameter σ², shape ``(P,)`` (a gather: no check, no host synchronization)."""
        return self.linearization.space.expand_group_values(self.variance)

    def _transpose_nonbatch(self) -> LinearOperator:
        if self.symmetric:
            return self
        return NTKLinearOperator(
            self.X2, self.X1, self.variance, network=self.linearization, batch_shape=self._batch
        )

    # -------------------------------------------------------------- products
    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape = to_columns("NTKLinearOperator.matmul", rhs, self.shape[-1])
        X2 = None if self.symmetric else self.X2
        out = self.linearization.ntk_mvm_unchecked(self.X1, X2, cols, self._scale())
        return self._broadcast(from_columns(out, shape))

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        if self.symmetric:
            return self._matmul(rhs)
        cols, shape = to_columns("NTKLinearOperator.t_matmul", rhs, self.shape[-2])
        out = self.linearization.ntk_mvm_unchecked(self.X2, self.X1, cols, self._scale())
        return self._broadcast(from_columns(out, shape))

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple:
        r"""∂/∂σ² of ``Σ_c u_cᵀ K v_c``: per group, ``⟨J_gᵀ U, J_gᵀ V⟩`` (two VJPs, no JVP)."""
        if not self.variance.requires_grad:
            return (None, None, None)
        lin, O = self.linearization, self.num_outputs
        N1, N2 = self.X1.shape[0], self.X2.shape[0]
        U, _ = to_columns("NTKLinearOperator", left_vecs, N1 * O)
        V, _ = to_columns("NTKLinearOperator", right_vecs, N2 * O)
        U, V = U.detach(), V.detach()
        with torch.no_grad():
            if self.symmetric:  # one VJP for both sides
                both = lin.vjp_unchecked(self.X1, torch.cat([U, V], -1).reshape(N1, O, -1))
                JU, JV = both.split([U.shape[-1], V.shape[-1]], dim=-1)
            else:
                JU = lin.vjp_unchecked(self.X1, U.reshape(N1, O, -1))
                JV = lin.vjp_unchecked(self.X2, V.reshape(N2, O, -1))
            per_param = (JU * JV).sum(-1)  # (P,)
            if self.variance.dim() == 0:
                grad = per_param.sum()
            else:
                grad = torch.zeros_like(self.variance).index_add_(
                    0, lin.space.group_index(), per_param
                )
        return (None, None, grad)

    # -------------------------------------------------------------- diagonal and dense
    def _diagonal(self) -> Tensor:
        lin = self.linearization
        if self.symmetric:
            return self._broadcast(lin.ntk_diag(self.X1, variance=self.variance))
        if self.shape[-2] != self.shape[-1]:
            raise RuntimeError(
                f"NTKLinearOperator.diagonal: the operator is {tuple(self.shape)}, not square."
            )
        # X1 ≠ X2 with N1 = N2: K[i, i] = J1[i] Σ J2[i]ᵀ, chunk by chunk of examples.
        scale = self._scale()
        parts = []
        for c in lin.chunks(self.X1.shape[0]):
            J1, J2 = lin.jacobian(self.X1[c]), lin.jacobian(self.X2[c])
            parts.append((J1 * scale * J2).sum(-1).reshape(-1))
        return self._broadcast(torch.cat(parts))

    def _approx_diagonal(self) -> Tensor:
        # The exact diagonal costs O backward passes per input: cheap enough to be the
        # "approximation" that pivoted Cholesky asks for.
        return self._diagonal()

    @cached
    def to_dense(self) -> Tensor:
        """Dense ``K``, ``(N1·O, N2·O)``, via :meth:`pyro_ntk.Linearization.ntk_dense`."""
        X2 = None if self.symmetric else self.X2
        return self._dense_copies(self.linearization.ntk_dense(self.X1, X2, variance=self.variance))

    # -------------------------------------------------------------- rows and entries
    def _slab(self, XA: Tensor, a: Tensor, XB: Tensor, b: Tensor) -> Tensor:
        """``M[j, i] = J(XB)[b_j] Σ J(XA)[a_i]ᵀ``, shape ``(len(b), len(a))``.

        One VJP over the examples of ``a`` (one one-hot column per entry of ``a``), one JVP
        over the examples of ``b``.
        """
        lin, O = self.linearization, self.num_outputs
        ex_a, loc_a = torch.unique(a // O, return_inverse=True)
        E = torch.zeros(ex_a.shape[0], O, a.shape[0], dtype=self.dtype, device=self.device)
        E[loc_a, a % O, torch.arange(a.shape[0], device=self.device)] = 1.0
        W = lin.vjp_unchecked(select_examples(XA, ex_a), E) * self._scale().unsqueeze(-1)
        ex_b, loc_b = torch.unique(b // O, return_inverse=True)
        out = lin.jvp_unchecked(select_examples(XB, ex_b), W).reshape(ex_b.shape[0] * O, -1)
        return out[loc_b * O + b % O]

    def _block(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Dense ``K[rows][:, cols]`` for flat 1-D indices, from the cheaper side."""
        if rows.numel() == 0 or cols.numel() == 0:
            return torch.zeros(rows.numel(), cols.numel(), dtype=self.dtype, device=self.device)
        ur, r_inv = torch.unique(rows, return_inverse=True)
        uc, c_inv = torch.unique(cols, return_inverse=True)
        if ur.numel() <= uc.numel():  # VJP columns = selected rows
            block = self._slab(self.X1, ur, self.X2, uc).mT  # (ur, uc)
        else:  # VJP columns = selected columns
            block = self._slab(self.X2, uc, self.X1, ur)  # (ur, uc)
        return block[r_inv][:, c_inv]

    def _getitem_matrix(self, row_index, col_index) -> LinearOperator:
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            return self
        O = self.num_outputs
        M, N = self._matrix_size()
        if not isinstance(row_index, Tensor) and not isinstance(col_index, Tensor):
            # Slices of whole examples stay lazy (e.g. train/test blocks of a joint kernel).
            r, c = example_index(row_index, M, O), example_index(col_index, N, O)
            if r is not None and c is not None:
                X1, X2 = self.X1[r], self.X2[c]
                if self.symmetric and r == c:
                    X2 = X1
                return NTKLinearOperator(X1, X2, self.variance, network=self.linearization)
        rows = flat_index(row_index, M, self.device)
        cols = flat_index(col_index, N, self.device)
        return DenseLinearOperator(self._block(rows, cols))

    def _entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        ur, r_inv = torch.unique(rows, return_inverse=True)
        uc, c_inv = torch.unique(cols, return_inverse=True)
        return self._block(ur, uc)[r_inv, c_inv]

    # -------------------------------------------------------------- roots
    def jacobian_root(self) -> LinearOperator:
        r"""The exact root :math:`R = J(X)\,\mathrm{diag}(\sigma)`, ``(N·O, P)``, ``R Rᵀ = K``.

        Only for the symmetric case (``X2`` is ``X1``). ``R @ z`` is one JVP, so
        ``R @ randn(P, s)`` draws ``s`` exact samples of ``N(0, K)``.
        """
        if not self.symmetric:
            raise RuntimeError(
                "NTKLinearOperator.jacobian_root: only defined when X2 is X1 (a symmetric K); "
                f"this operator is K(X1, X2) of shape {tuple(self.shape)}."
            )
        J = JacobianLinearOperator(self.X1, network=self.linearization, batch_shape=self._batch)
        return MatmulLinearOperator(J, DiagLinearOperator(self._scale().sqrt()))

    @cached(name="root_decomposition")
    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        """A root ``R`` with ``R Rᵀ = K``.

        ``method="exact"`` (symmetric operators only) returns ``RootLinearOperator`` of
        :meth:`jacobian_root`, ``(N·O, P)``. Every other ``method`` (default ``None``:
        Cholesky for small, Lanczos for large operators) is ``linear_operator``'s; the
        default keeps a square root, as gpytorch's ``MultivariateNormal.rsample(base_samples=...)``
        expects ``N·O`` base samples.
        """
        if method == "exact":
            return RootLinearOperator(self.jacobian_root())
        return super().root_decomposition(method=method)

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        r"""Exact samples of :math:`\mathcal{N}(0, K)`, shape ``(num_samples, *batch, N·O)``.

        Symmetric case: :math:`J(X)\,\mathrm{diag}(\sigma)\,z` with
        :math:`z \sim \mathcal{N}(0, I_P)`, one batched JVP for all samples (no Lanczos, no
        Cholesky); differentiable in σ². Otherwise ``linear_operator``'s default.
        """
        if not self.symmetric:
            return super().zero_mean_mvn_samples(num_samples)
        root = self.jacobian_root()
        z = torch.randn(
            *self.batch_shape,
            root.shape[-1],
            num_samples,
            dtype=self.dtype,
            device=self.device,
        )
        return root.matmul(z).permute(-1, *range(self.dim() - 1)).contiguous()

    # -------------------------------------------------------------- conversion
    def _rebuild(self, dtype: torch.dtype, device: torch.device) -> LinearOperator:
        lin = self.linearization.to(dtype, device)
        X1 = move(self.X1, dtype, device)
        X2 = X1 if self.X2 is self.X1 else move(self.X2, dtype, device)
        variance = move(self.variance, dtype, device)
        return NTKLinearOperator(X1, X2, variance, network=lin, batch_shape=self._batch)

    def __repr__(self) -> str:
        kind = "K(X, X)" if self.symmetric else "K(X1, X2)"
        return (
            f"NTKLinearOperator({kind}, shape={tuple(self.shape)}, "
            f"variance shape={tuple(self.variance.shape)}, {self.linearization!r})"
        )
