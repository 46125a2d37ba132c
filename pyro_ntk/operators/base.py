r"""The base of the package's ``linear_operator`` classes, and the helpers they share.

:class:`RepeatedMatrixOperator` is one matrix defined by inputs ``X`` (examples along the
leading dimension), repeated along optional batch dimensions; :class:`JacobianOperatorBase`
holds the Jacobian products of :math:`J(X)` and :math:`J(X)^\top` on it. The helpers fold
batched right-hand sides ``(*batch, rows, C)`` into columns ``(rows, B·C)`` and back, and
map function-space row indices (rows ``n·O + o``) to examples.

Every product here runs the linearization's unchecked hot path
(:meth:`pyro_ntk.Linearization.jvp_unchecked` and friends): inputs are validated once, at
the operator's construction, and no product synchronizes with the device.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from linear_operator.utils.getitem import _is_noop_index
from torch import Tensor, nn

from pyro_ntk._checks import check_tensor
from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.parameters import ParamSelector

__all__ = [
    "JacobianOperatorBase",
    "RepeatedMatrixOperator",
    "as_data",
    "example_index",
    "flat_index",
    "from_columns",
    "move",
    "parse_to",
    "select_examples",
    "to_columns",
]


def to_columns(where: str, rhs: Tensor, rows: int) -> tuple[Tensor, tuple[int, ...] | None]:
    """Flatten ``(*batch, rows, C)`` (or ``(rows,)``) into ``(rows, B·C)`` columns.

    Returns the matrix and the ``(*batch, C)`` shape to restore (``None`` for a vector).
    """
    if rhs.dim() == 0 or rhs.shape[-2 if rhs.dim() > 1 else -1] != rows:
        raise ValueError(
            f"{where}: right-hand side has shape {tuple(rhs.shape)}; expected ({rows},) or "
            f"(*batch, {rows}, C)."
        )
    if rhs.dim() == 1:
        return rhs.unsqueeze(-1), None
    batch, C = tuple(rhs.shape[:-2]), rhs.shape[-1]
    cols = rhs.reshape(-1, rows, C).permute(1, 0, 2).reshape(rows, -1)
    return cols, (*batch, C)


def from_columns(out: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    """Inverse of :func:`to_columns` for a result with ``out.shape[0]`` rows."""
    if shape is None:
        return out.squeeze(-1)
    *batch, C = shape
    rows = out.shape[0]
    return out.reshape(rows, -1, C).permute(1, 0, 2).reshape(*batch, rows, C)


def flat_index(index, size: int, device: torch.device) -> Tensor:
    """A slice or tensor index into ``range(size)`` as a 1-D long tensor."""
    return torch.arange(size, device=device)[index].reshape(-1)


def example_index(index, size: int, O: int):
    """The example index selecting whole examples in order, or ``None`` if there is none.

    A row index of a function-space vector (rows ``n·O + o``) selects whole examples when
    ``O == 1`` (any slice or 1-D tensor) or when it is a unit-step slice aligned to
    multiples of ``O``.
    """
    if _is_noop_index(index):
        return index
    if isinstance(index, slice):
        start, stop, step = index.indices(size)
        if len(range(start, stop, step)) == 0:
            return None
        if O == 1:
            return slice(start, stop, step)
        if step == 1 and start % O == 0 and stop % O == 0:
            return slice(start // O, stop // O)
        return None
    if O == 1 and isinstance(index, Tensor) and index.dim() == 1 and index.numel() > 0:
        return index
    return None


def as_data(X: Tensor) -> Tensor:
    """Inputs are data: detach them, but keep the very object when it has no graph.

    Keeping the object lets the engines' per-input caches (keyed by the tensor's storage)
    recognise the same inputs across the many products of one solve.
    """
    return X.detach() if X.requires_grad else X


def select_examples(X: Tensor, examples: Tensor) -> Tensor:
    """``X[examples]`` for sorted unique example indices, as a view of ``X`` when possible.

    All examples give ``X`` itself and a contiguous range a slice, so that repeated row
    requests (pivoted Cholesky) hit the engines' per-input caches.
    """
    k = examples.numel()
    if k == X.shape[0]:
        return X
    first, last = int(examples[0]), int(examples[-1])
    if last - first + 1 == k:
        return X[first : last + 1]
    return X[examples]


def parse_to(dtype: torch.dtype, device: torch.device, *args, **kwargs):
    """The ``(dtype, device)`` that ``Tensor.to(*args, **kwargs)`` would give."""
    probe = torch.empty(0, dtype=dtype, device=device).to(*args, **kwargs)
    return probe.dtype, probe.device


class RepeatedMatrixOperator(LinearOperator):
    """Base of the package's operators: one matrix, repeated along optional batch dims.

    The matrix is defined by inputs ``X`` whose leading dimension is the number of
    examples, so batch dimensions cannot live in the tensors: ``batch_shape`` (a
    non-differentiable keyword) says how many identical copies the operator stands for.
    ``linear_operator`` uses it to broadcast (``expand``, ``unsqueeze``, sums with
    batched tensors). Subclasses implement the non-batch matrix.
    """

    # -------------------------------------------------------------- hooks
    def _matrix_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def _with_batch(self, batch_shape: torch.Size) -> LinearOperator:
        raise NotImplementedError

    def _getitem_matrix(self, row_index, col_index) -> LinearOperator:
        raise NotImplementedError

    def _entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Entries ``A[rows[i], cols[i]]`` for flat 1-D index tensors."""
        raise NotImplementedError

    def _rebuild(self, dtype: torch.dtype, device: torch.device) -> LinearOperator:
        raise NotImplementedError

    # -------------------------------------------------------------- batch copies
    def _size(self) -> torch.Size:
        return torch.Size((*self._batch, *self._matrix_size()))

    def _broadcast(self, out: Tensor) -> Tensor:
        """Broadcast a non-batch product over this operator's batch copies."""
        if not self._batch:
            return out
        if out.dim() == 1:
            out = out.unsqueeze(-1)
            return out.expand(*self._batch, *out.shape).squeeze(-1).contiguous()
        shape = torch.broadcast_shapes(self._batch, out.shape[:-2]) + out.shape[-2:]
        return out if out.shape == shape else out.expand(shape).contiguous()

    def _expand_batch(self, batch_shape) -> LinearOperator:
        return self._with_batch(torch.Size(batch_shape))

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        batch = list(self._batch)
        batch.insert(dim, 1)
        return self._with_batch(torch.Size(batch))

    def _permute_batch(self, *dims: int) -> LinearOperator:
        return self._with_batch(torch.Size(self._batch[d] for d in dims))

    def _sum_batch(self, dim: int) -> LinearOperator:
        batch = list(self._batch)
        copies = batch.pop(dim)
        return self._with_batch(torch.Size(batch)).mul(float(copies))

    def repeat(self, *sizes) -> LinearOperator:
        """Repeat along batch dimensions (``repeat(*batch, 1, 1)``): more identical copies."""
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        if len(sizes) < self.dim() or tuple(sizes[-2:]) != (1, 1):
            raise RuntimeError(
                f"Invalid repeat arguments {tuple(sizes)}: {type(self).__name__} repeats only "
                "batch dimensions, as repeat(*batch_sizes, 1, 1)."
            )
        current = (1,) * (len(sizes) - self.dim()) + tuple(self._batch)
        return self._with_batch(torch.Size(c * r for c, r in zip(current, sizes[:-2])))

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        batch = torch.empty(self._batch, dtype=torch.uint8)[tuple(batch_indices)].shape
        base = self._with_batch(torch.Size()) if self._batch else self
        res = base._getitem_matrix(row_index, col_index)
        return res._expand_batch(batch) if batch else res

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        shape = torch.broadcast_shapes(
            row_index.shape, col_index.shape, *(b.shape for b in batch_indices)
        )
        rows = row_index.expand(shape).reshape(-1)
        cols = col_index.expand(shape).reshape(-1)
        return self._entries(rows, cols).reshape(shape)

    def _dense_copies(self, dense: Tensor) -> Tensor:
        return dense.expand(*self._batch, *dense.shape).contiguous() if self._batch else dense

    # -------------------------------------------------------------- conversion
    def type(self, dtype: torch.dtype) -> LinearOperator:
        """This operator in ``dtype``, over a converted copy of the linearization.

        See :meth:`pyro_ntk.Linearization.to`; the user's network is not modified.
        """
        return self._rebuild(dtype, self.device)

    def to(self, *args, **kwargs) -> LinearOperator:
        """Move/convert like :meth:`torch.Tensor.to` (see :meth:`pyro_ntk.Linearization.to`)."""
        return self._rebuild(*parse_to(self.dtype, self.device, *args, **kwargs))

    def cpu(self) -> LinearOperator:
        """This operator on the CPU."""
        return self._rebuild(self.dtype, torch.device("cpu"))

    def cuda(self, device_id=None) -> LinearOperator:
        """This operator on a CUDA device."""
        device = torch.device("cuda") if device_id is None else torch.device("cuda", device_id)
        return self._rebuild(self.dtype, device)


def move(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t`` on ``device``; floating tensors also in ``dtype`` (integer ones keep theirs)."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else None)


class JacobianOperatorBase(RepeatedMatrixOperator):
    """Shared by :class:`JacobianLinearOperator` and its transpose: inputs and products."""

    def __init__(
        self,
        X: Tensor,
        *,
        network: nn.Module | Linearization,
        params: ParamSelector = None,
        chunk_size: int | None = None,
        batch_shape: tuple[int, ...] = (),
    ):
        where = type(self).__name__.lstrip("_")
        lin = as_linearization(where, network, params, chunk_size)
        X = as_data(check_tensor(where, "X", X))
        self.num_outputs = lin.output_dim(lin.check_inputs(where, "X", X))
        batch_shape = torch.Size(batch_shape)
        super().__init__(X, network=lin, batch_shape=batch_shape)
        self.X = X
        self.linearization = lin
        self._batch = batch_shape

    def _set_requires_grad(self, val: bool) -> None:
        # X is data: the operator has no differentiable representation.
        return None

    def _with_batch(self, batch_shape: torch.Size) -> LinearOperator:
        return type(self)(self.X, network=self.linearization, batch_shape=batch_shape)

    def _rebuild(self, dtype: torch.dtype, device: torch.device) -> LinearOperator:
        lin = self.linearization.to(dtype, device)
        X = move(self.X, dtype, device)
        return type(self)(X, network=lin, batch_shape=self._batch)

    # -------------------------------------------------------------- products
    def _apply_J(self, rhs: Tensor) -> Tensor:
        """``J (*batch, P, C) -> (*batch, N·O, C)``: one batched JVP for all columns."""
        lin = self.linearization
        cols, shape = to_columns("JacobianLinearOperator.matmul", rhs, lin.num_params)
        out = lin.jvp_unchecked(self.X, cols)  # (N, O, k)
        return self._broadcast(from_columns(out.reshape(-1, cols.shape[-1]), shape))

    def _apply_JT(self, rhs: Tensor) -> Tensor:
        """``Jᵀ (*batch, N·O, C) -> (*batch, P, C)``: one batched VJP for all columns."""
        N, O = self.X.shape[0], self.num_outputs
        cols, shape = to_columns("JacobianLinearOperator.t_matmul", rhs, N * O)
        out = self.linearization.vjp_unchecked(self.X, cols.reshape(N, O, -1))  # (P, k)
        return self._broadcast(from_columns(out, shape))

    def _jacobian_rows(self, rows: Tensor) -> Tensor:
        """Rows ``rows`` (flat, 1-D) of J from the Jacobians of their examples only."""
        O, P = self.num_outputs, self.linearization.num_params
        if rows.numel() == 0:
            return torch.zeros(0, P, dtype=self.dtype, device=self.device)
        examples, local = torch.unique(rows // O, return_inverse=True)
        J = self.linearization.jacobian(select_examples(self.X, examples))  # (u, O, P)
        return J.reshape(-1, P)[local * O + rows % O]

    def _jacobian_columns(self, cols: Tensor) -> Tensor:
        """Columns ``cols`` of J: one batched JVP with one-hot tangents, ``(N·O, k)``."""
        P = self.linearization.num_params
        N, O = self.X.shape[0], self.num_outputs
        if cols.numel() == 0:
            return torch.zeros(N * O, 0, dtype=self.dtype, device=self.device)
        E = torch.zeros(P, cols.numel(), dtype=self.dtype, device=self.device)
        E[cols, torch.arange(cols.numel(), device=self.device)] = 1.0
        return self.linearization.jvp_unchecked(self.X, E).reshape(N * O, cols.numel())

    def _jacobian_block(self, row_index, col_index) -> Tensor:
        """Dense ``J[row_index][:, col_index]`` from the cheaper of rows or columns."""
        N, O, P = self.X.shape[0], self.num_outputs, self.linearization.num_params
        cols = flat_index(col_index, P, self.device)
        if _is_noop_index(row_index):
            return self._jacobian_columns(cols)
        rows = flat_index(row_index, N * O, self.device)
        return self._jacobian_rows(rows)[:, cols]

    def _jacobian_entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        unique_rows, local = torch.unique(rows, return_inverse=True)
        return self._jacobian_rows(unique_rows)[local, cols]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, {self.linearization!r})"
