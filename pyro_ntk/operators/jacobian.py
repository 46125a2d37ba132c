r"""The Jacobian of a linearized network as a matrix-free ``linear_operator``.

.. math::

    J(X) \in \mathbb{R}^{(N \cdot O) \times P}, \qquad
    J(X)_{n \cdot O + o,\, p} = \frac{\partial f_o(x_n; \theta)}{\partial \theta_p}\Big|_{\theta^*}.

Products go through the engine of a :class:`~pyro_ntk.Linearization`: ``J v`` is one
batched JVP, ``Jᵀ u`` one batched VJP; ``J`` itself is formed only by :meth:`to_dense`
and by row selections (rows of a few examples).

The module also holds the helpers the operators share: flattening batched right-hand
sides into columns, mapping row indices to examples, and converting a
:class:`~pyro_ntk.Linearization` to another dtype or device.
"""

from __future__ import annotations

import copy
import weakref

import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator
from linear_operator.utils.getitem import _is_noop_index
from linear_operator.utils.memoize import cached
from torch import Tensor

from pyro_ntk._checks import check_tensor
from pyro_ntk.linearization import Linearization, check_linearization

__all__ = ["JacobianLinearOperator", "convert_linearization"]


# ---------------------------------------------------------------------------- helpers
def _to_columns(where: str, rhs: Tensor, rows: int) -> tuple[Tensor, tuple[int, ...] | None]:
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


def _from_columns(out: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    """Inverse of :func:`_to_columns` for a result with ``out.shape[0]`` rows."""
    if shape is None:
        return out.squeeze(-1)
    *batch, C = shape
    rows = out.shape[0]
    return out.reshape(rows, -1, C).permute(1, 0, 2).reshape(*batch, rows, C)


def _flat_index(index, size: int, device: torch.device) -> Tensor:
    """A slice or tensor index into ``range(size)`` as a 1-D long tensor."""
    return torch.arange(size, device=device)[index].reshape(-1)


def _example_index(index, size: int, O: int):
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


def _as_data(X: Tensor) -> Tensor:
    """Inputs are data: detach them, but keep the very object when it has no graph.

    Keeping the object lets the engines' per-input caches (keyed by the tensor's storage)
    recognise the same inputs across the many products of one solve.
    """
    return X.detach() if X.requires_grad else X


def _select_examples(X: Tensor, examples: Tensor) -> Tensor:
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


def _parse_to(dtype: torch.dtype, device: torch.device, *args, **kwargs):
    """The ``(dtype, device)`` that ``Tensor.to(*args, **kwargs)`` would give."""
    probe = torch.empty(0, dtype=dtype, device=device).to(*args, **kwargs)
    return probe.dtype, probe.device


# converted Linearization -> weak reference to the one it was converted from
_ORIGIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# original Linearization -> {(dtype, device): converted Linearization}
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def convert_linearization(
    linearization: Linearization,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Linearization:
    r"""The same linearization (same θ*, same parameter selection) in another dtype/device.

    The user's network is never touched: a deep copy of it is loaded with θ* and the fixed
    tensors of ``linearization`` and then converted. Converting back to the original dtype
    and device returns the original object (no precision is lost on a round trip), and
    conversions are cached per original linearization.

    Cost: one deep copy of the network (once per target); nothing when nothing changes.

    Args:
        linearization: the :class:`~pyro_ntk.Linearization` to convert.
        dtype: a floating-point dtype; ``None`` keeps the current one.
        device: the target device; ``None`` keeps the current one.

    Returns:
        A :class:`~pyro_ntk.Linearization` with ``.dtype == dtype`` and
        ``.device == device``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> lin = Linearization(net.double())
        >>> convert_linearization(lin, dtype=torch.float32).dtype
        torch.float32
        >>> convert_linearization(lin, dtype=torch.float64) is lin
        True
    """
    where = "convert_linearization"
    linearization = check_linearization(where, linearization)
    dtype = linearization.dtype if dtype is None else dtype
    device = linearization.device if device is None else torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a floating-point torch.dtype, got {dtype!r}.")
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device  # resolve "cuda" to "cuda:k"
    origin = _ORIGIN.get(linearization)
    root = (origin() if origin is not None else None) or linearization
    if (root.dtype, root.device) == (dtype, device):
        return root
    cache = _CONVERTED.setdefault(root, {})
    if (dtype, device) in cache:
        return cache[(dtype, device)]
    try:
        network = copy.deepcopy(root.network)
    except Exception as exc:  # any failure of deepcopy is reported the same way
        raise TypeError(
            f"{where}: cannot convert to dtype {dtype} / device {device} because the network "
            f"{type(root.network).__name__} cannot be deep-copied ({exc}); build a "
            f"Linearization of a converted network instead."
        ) from exc
    owned = dict(network.named_parameters())
    owned.update(dict(network.named_buffers()))
    with torch.no_grad():
        for name, value in {**root.space.theta, **root.space.fixed}.items():
            owned[name].copy_(value)
    network.to(device=device, dtype=dtype)
    converted = Linearization(
        network,
        params=list(root.space.names),
        chunk_size=root.chunk_size,
        implementation=root.requested,
    )
    cache[(dtype, device)] = converted
    _ORIGIN[converted] = weakref.ref(root)  # weak both ways: no cycle keeps copies alive
    return converted


# ---------------------------------------------------------------------------- operators
class _RepeatedMatrixOperator(LinearOperator):
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

        See :func:`convert_linearization`; the user's network is not modified.
        """
        return self._rebuild(dtype, self.device)

    def to(self, *args, **kwargs) -> LinearOperator:
        """Move/convert like :meth:`torch.Tensor.to` (see :func:`convert_linearization`)."""
        return self._rebuild(*_parse_to(self.dtype, self.device, *args, **kwargs))

    def cpu(self) -> LinearOperator:
        """This operator on the CPU."""
        return self._rebuild(self.dtype, torch.device("cpu"))

    def cuda(self, device_id=None) -> LinearOperator:
        """This operator on a CUDA device."""
        device = torch.device("cuda") if device_id is None else torch.device("cuda", device_id)
        return self._rebuild(self.dtype, device)


def _move(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else None)


class _JacobianOperatorBase(_RepeatedMatrixOperator):
    """Shared by :class:`JacobianLinearOperator` and its transpose: inputs and products."""

    def __init__(
        self, X: Tensor, *, linearization: Linearization, batch_shape: tuple[int, ...] = ()
    ):
        where = type(self).__name__.lstrip("_")
        linearization = check_linearization(where, linearization)
        X = _as_data(check_tensor(where, "X", X))
        self.num_outputs = linearization.output_dim(linearization.check_inputs(where, "X", X))
        batch_shape = torch.Size(batch_shape)
        super().__init__(X, linearization=linearization, batch_shape=batch_shape)
        self.X = X
        self.linearization = linearization
        self._batch = batch_shape

    def _set_requires_grad(self, val: bool) -> None:
        # X is data: the operator has no differentiable representation.
        return None

    def _with_batch(self, batch_shape: torch.Size) -> LinearOperator:
        return type(self)(self.X, linearization=self.linearization, batch_shape=batch_shape)

    def _rebuild(self, dtype: torch.dtype, device: torch.device) -> LinearOperator:
        lin = convert_linearization(self.linearization, dtype=dtype, device=device)
        X = _move(self.X, dtype, device)
        return type(self)(X, linearization=lin, batch_shape=self._batch)

    # -------------------------------------------------------------- products
    def _apply_J(self, rhs: Tensor) -> Tensor:
        """``J (*batch, P, C) -> (*batch, N·O, C)``: one batched JVP for all columns."""
        lin = self.linearization
        cols, shape = _to_columns("JacobianLinearOperator.matmul", rhs, lin.num_params)
        out = lin.jvp(self.X, cols)  # (N, O, k)
        return self._broadcast(_from_columns(out.reshape(-1, cols.shape[-1]), shape))

    def _apply_JT(self, rhs: Tensor) -> Tensor:
        """``Jᵀ (*batch, N·O, C) -> (*batch, P, C)``: one batched VJP for all columns."""
        N, O = self.X.shape[0], self.num_outputs
        cols, shape = _to_columns("JacobianLinearOperator.t_matmul", rhs, N * O)
        out = self.linearization.vjp(self.X, cols.reshape(N, O, -1))  # (P, k)
        return self._broadcast(_from_columns(out, shape))

    def _jacobian_rows(self, rows: Tensor) -> Tensor:
        """Rows ``rows`` (flat, 1-D) of J from the Jacobians of their examples only."""
        O, P = self.num_outputs, self.linearization.num_params
        if rows.numel() == 0:
            return torch.zeros(0, P, dtype=self.dtype, device=self.device)
        examples, local = torch.unique(rows // O, return_inverse=True)
        J = self.linearization.jacobian(_select_examples(self.X, examples))  # (u, O, P)
        return J.reshape(-1, P)[local * O + rows % O]

    def _jacobian_columns(self, cols: Tensor) -> Tensor:
        """Columns ``cols`` of J: one batched JVP with one-hot tangents, ``(N·O, k)``."""
        P = self.linearization.num_params
        N, O = self.X.shape[0], self.num_outputs
        if cols.numel() == 0:
            return torch.zeros(N * O, 0, dtype=self.dtype, device=self.device)
        E = torch.zeros(P, cols.numel(), dtype=self.dtype, device=self.device)
        E[cols, torch.arange(cols.numel(), device=self.device)] = 1.0
        return self.linearization.jvp(self.X, E).reshape(N * O, cols.numel())

    def _jacobian_block(self, row_index, col_index) -> Tensor:
        """Dense ``J[row_index][:, col_index]`` from the cheaper of rows or columns."""
        N, O, P = self.X.shape[0], self.num_outputs, self.linearization.num_params
        cols = _flat_index(col_index, P, self.device)
        if _is_noop_index(row_index):
            return self._jacobian_columns(cols)
        rows = _flat_index(row_index, N * O, self.device)
        return self._jacobian_rows(rows)[:, cols]

    def _jacobian_entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        unique_rows, local = torch.unique(rows, return_inverse=True)
        return self._jacobian_rows(unique_rows)[local, cols]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, {self.linearization!r})"


class JacobianLinearOperator(_JacobianOperatorBase):
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
    (:func:`convert_linearization`), never the user's network.

    Args:
        X: inputs ``(N, ...)`` that the network accepts (dtype/device of the network).
        linearization: the :class:`~pyro_ntk.Linearization` providing the products.
        batch_shape: batch dimensions over which the same ``J`` is repeated (set by
            ``linear_operator`` when it broadcasts; rarely needed by hand).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> lin = Linearization(net)
        >>> J = JacobianLinearOperator(torch.randn(5, 3), linearization=lin)
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
            self.X, linearization=self.linearization, batch_shape=self._batch
        )

    @cached
    def to_dense(self) -> Tensor:
        """The dense ``(N·O, P)`` Jacobian (``lin.jacobian``; small problems)."""
        J = self.linearization.jacobian(self.X)
        return self._dense_copies(J.reshape(-1, J.shape[-1]))

    def _getitem_matrix(self, row_index, col_index) -> LinearOperator:
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            return self
        examples = _example_index(row_index, self._matrix_size()[0], self.num_outputs)
        if examples is not None and _is_noop_index(col_index):
            return JacobianLinearOperator(self.X[examples], linearization=self.linearization)
        return DenseLinearOperator(self._jacobian_block(row_index, col_index))

    def _entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        return self._jacobian_entries(rows, cols)


class _JacobianTransposeLinearOperator(_JacobianOperatorBase):
    """``J(X)ᵀ``, shape ``(*batch_shape, P, N·O)``: products swap the JVP and the VJP."""

    def _matrix_size(self) -> tuple[int, int]:
        return (self.linearization.num_params, self.X.shape[0] * self.num_outputs)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self._apply_JT(rhs)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._apply_J(rhs)

    def _transpose_nonbatch(self) -> LinearOperator:
        return JacobianLinearOperator(
            self.X, linearization=self.linearization, batch_shape=self._batch
        )

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
