r"""The Jacobian of a linearized network as a matrix-free ``linear_operator``.

.. math::

    J(X) \in \mathbb{R}^{(N \cdot O) \times P}, \qquad
    J(X)_{n \cdot O + o,\, p} = \frac{\partial f_o(x_n; \theta)}{\partial \theta_p}\Big|_{\theta^*}.

Products go through the engine of a :class:`~pyro_ntk.Linearization`: ``J v`` is one
batched JVP, ``Jᵀ u`` one batched VJP; ``J`` itself is formed only by :meth:`to_dense`
and by row selections (rows of a few examples).
"""

from __future__ import annotations

from linear_operator.operators import DenseLinearOperator, LinearOperator
from linear_operator.utils.getitem import _is_noop_index
from linear_operator.utils.memoize import cached
from torch import Tensor

from pyro_ntk.operators.base import JacobianOperatorBase, example_index

__all__ = ["JacobianLinearOperator"]


class JacobianLinearOperator(JacobianOperatorBase):
    r"""The Jacobian :math:`J(X)` of a linearized network, matrix-free.

    .. math::

        J(X)_{n \cdot O + o,\, p} = \partial f_o(x_n; \theta) / \partial \theta_p
        \,\big|_{\theta^*},
        \qquad J v = \texttt{lin.jvp}(X, v), \qquad J^\top u = \texttt{lin.vjp}(X, u).

    Shape ``(*batch_shape, N·O, P)``; rows are sample-major (``n·O + o``), columns follow
    ``linearization.space`` (parameters flattened in ``named_parameters()`` order).

    Cost: ``J @ V`` with ``V`` of shape ``(*batch, P, C)`` is *one* batched JVP over ``X``
    (all batch × ``C`` columns in one ``vmap``-ed pass, no loop over columns); ``Jᵀ @ U``
    is one batched VJP. Selecting rows (``J[rows]``) costs the per-example Jacobians of the
    selected examples only, selecting columns one JVP with one-hot tangents;
    :meth:`to_dense` forms the ``(N·O, P)`` matrix (small problems only).

    The inputs are data: they are detached and no gradient flows to them. ``.double()``,
    ``.float()`` and ``.to(...)`` convert a copy of the linearization
    (:meth:`pyro_ntk.Linearization.to`), never the user's network.

    Args:
        X: inputs ``(N, ...)`` that the network accepts (dtype/device of the network).
        network: the trained ``nn.Module``, or a :class:`~pyro_ntk.Linearization` to share
            its θ* copy and products (keyword-only, after the tensors, as
            ``linear_operator`` rebuilds operators from their tensor arguments).
        params: which parameters to linearize when ``network`` is an ``nn.Module`` (as
            :class:`~pyro_ntk.Linearization`; ``None``: all with ``requires_grad``).
        chunk_size: inputs per chunk when ``network`` is an ``nn.Module``.
        batch_shape: batch dimensions over which the same ``J`` is repeated (set by
            ``linear_operator`` when it broadcasts; rarely needed by hand).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> J = JacobianLinearOperator(torch.randn(5, 3), network=net)
        >>> J.shape
        torch.Size([10, 26])
        >>> (J @ torch.randn(26, 3)).shape, (J.mT @ torch.randn(10)).shape
        (torch.Size([10, 3]), torch.Size([26]))
    """

    def _matrix_size(self) -> tuple[int, int]:
        return (self.X.shape[0] * self.num_outputs, self.linearization.num_params)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self._apply_J(rhs)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._apply_JT(rhs)

    def _transpose_nonbatch(self) -> LinearOperator:
        return _JacobianTransposeLinearOperator(
            self.X, network=self.linearization, batch_shape=self._batch
        )

    @cached
    def to_dense(self) -> Tensor:
        """The dense ``(N·O, P)`` Jacobian (``lin.jacobian``; small problems)."""
        J = self.linearization.jacobian(self.X)
        return self._dense_copies(J.reshape(-1, J.shape[-1]))

    def _getitem_matrix(self, row_index, col_index) -> LinearOperator:
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            return self
        examples = example_index(row_index, self._matrix_size()[0], self.num_outputs)
        if examples is not None and _is_noop_index(col_index):
            return JacobianLinearOperator(self.X[examples], network=self.linearization)
        return DenseLinearOperator(self._jacobian_block(row_index, col_index))

    def _entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        return self._jacobian_entries(rows, cols)


class _JacobianTransposeLinearOperator(JacobianOperatorBase):
    """``J(X)ᵀ``, shape ``(*batch_shape, P, N·O)``: products swap the JVP and the VJP."""

    def _matrix_size(self) -> tuple[int, int]:
        return (self.linearization.num_params, self.X.shape[0] * self.num_outputs)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self._apply_JT(rhs)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._apply_J(rhs)

    def _transpose_nonbatch(self) -> LinearOperator:
        return JacobianLinearOperator(self.X, network=self.linearization, batch_shape=self._batch)

    @cached
    def to_dense(self) -> Tensor:
        """The dense ``(P, N·O)`` transposed Jacobian."""
        J = self.linearization.jacobian(self.X)
        return self._dense_copies(J.reshape(-1, J.shape[-1]).mT.contiguous())

    def _getitem_matrix(self, row_index, col_index) -> LinearOperator:
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            return self
        return DenseLinearOperator(self._jacobian_block(col_index, row_index).mT)

    def _entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        return self._jacobian_entries(cols, rows)
