r"""The Fisher / generalized Gauss-Newton matrix of a linearized network, matrix-free.

.. math::

    F = \sum_{n=1}^N J_n^\top \Lambda_n J_n \in \mathbb{R}^{P \times P},
    \qquad J_n = \partial f(x_n; \theta) / \partial \theta \,\big|_{\theta^*},

with ``Λ_n`` the likelihood's Hessian in its natural parameter ``f`` (the output of the
network; the table is in :mod:`pyro_ntk.likelihoods`). For these exponential families the
Fisher and the GGN coincide. Two ways to multiply (:class:`FisherMethod`):

* ``"exact"``: ``F V = Jᵀ (Λ (J V))``, one batched JVP and one batched VJP.
* ``"finite_difference"`` (Maddox et al., 2021): since ``KL(p_θ* ‖ p_θ')`` has zero
  gradient and Hessian ``F`` at ``θ' = θ*``,

  .. math:: F v \approx \lVert v \rVert\, \nabla_{\theta'} \mathrm{KL}(p_{\theta^*} \,\|\,
      p_{\theta'}) \big|_{\theta' = \theta^* + \varepsilon v / \lVert v \rVert} \,/\, \varepsilon,

  one forward pass at ``θ* + εv`` and one backward pass per column (no forward mode),
  through :meth:`pyro_ntk.Linearization.perturbed_gradient` (perturbed *copies* of θ*;
  the user's network is never touched; columns batched).

**Choice of ε.** Each column is rescaled to unit norm, the product is taken with
``ε = c·sqrt(u)`` (``u`` the dtype's unit roundoff, ``c = 1``: 1.5e-8 in float64, 3.5e-4
in float32), and rescaled back. The forward difference has truncation error ``O(ε)`` and
cancellation error ``O(u/ε)``; ``ε ∝ sqrt(u)`` balances them. Measured worst relative error
``max_j ‖F̂v_j − Fv_j‖ / ‖Fv_j‖`` against the exact product (tanh MLP 3-16-16-O, N = 64,
16 random directions, worst over the four likelihoods; compared with the exact product in
the same dtype, itself within 3e-7 of the dense ``JᵀΛJ`` in float32):

=========== ======================= ==========================
dtype       ε                       worst relative error
=========== ======================= ==========================
float64     1e-6                    2.3e-6
float64     **1.5e-8 (default)**    1.4e-7
float64     1e-10                   2.9e-5
float32     1e-4                    2.2e-2
float32     **3.5e-4 (default)**    2.6e-3
float32     1e-3                    2.6e-3
float32     3e-3                    7.0e-3
=========== ======================= ==========================

The tests assert ``≤ 1e-5`` in float64 for every likelihood.
"""

from __future__ import annotations

import enum
import math

import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator
from linear_operator.utils.getitem import _is_noop_index
from torch import Tensor, nn

from pyro_ntk._checks import check_choice
from pyro_ntk.likelihoods import Likelihood, get_likelihood
from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.operators.base import (
    RepeatedMatrixOperator,
    flat_index,
    from_columns,
    move,
    to_columns,
)
from pyro_ntk.parameters import ParamSelector

__all__ = ["FisherLinearOperator", "FisherMethod", "default_epsilon"]


class FisherMethod(str, enum.Enum):
    """How :class:`FisherLinearOperator` multiplies."""

    EXACT = "exact"
    """``Jᵀ (Λ (J V))``: one batched JVP and one batched VJP."""

    FINITE_DIFFERENCE = "finite_difference"
    """The gradient of the KL at ``θ* + εv`` (forward and backward passes only)."""


def default_epsilon(dtype: torch.dtype) -> float:
    """The finite-difference step ``ε = sqrt(u)`` for unit-norm directions in ``dtype``.

    Example:
        >>> f"{default_epsilon(torch.float64):.2e}", f"{default_epsilon(torch.float32):.2e}"
        ('1.49e-08', '3.45e-04')
    """
    return math.sqrt(torch.finfo(dtype).eps)


def _check_noise(where: str, noise: object, lin: Linearization, N: int, O: int) -> Tensor:
    """The Gaussian noise variance as a positive ``(N, O)`` tensor (a broadcast view).

    A tensor that requires grad keeps its graph: ``F`` is differentiable in ``s²``.
    """
    noise_t = torch.as_tensor(noise, dtype=lin.dtype, device=lin.device)
    try:
        ok = torch.broadcast_shapes(noise_t.shape, (N, O)) == (N, O)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{where}: noise has shape {tuple(noise_t.shape)}, not broadcastable to "
            f"(N, O) = ({N}, {O})."
        )
    if not bool(torch.isfinite(noise_t).all()) or bool((noise_t <= 0).any()):
        raise ValueError(f"{where}: noise must be positive and finite, got {noise!r}.")
    # the very tensor when it has the full shape (linear_operator rebuilds F from it)
    return noise_t if noise_t.shape == (N, O) else noise_t.expand(N, O)


def _check_outputs(where: str, outputs: object, lin: Linearization, N: int, O: int) -> Tensor:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"{where}: outputs must be a tensor (N, O), got {type(outputs).__name__}.")
    if tuple(outputs.shape) != (N, O) or not bool(torch.isfinite(outputs).all()):
        raise ValueError(
            f"{where}: outputs must be finite with shape (N, O) = ({N}, {O}), got "
            f"shape {tuple(outputs.shape)}."
        )
    return outputs.detach().to(dtype=lin.dtype, device=lin.device)


class FisherLinearOperator(RepeatedMatrixOperator):
    r"""The Fisher / GGN ``F = Σ_n J_nᵀ Λ_n J_n`` over inputs ``X``, as a ``(P, P)`` operator.

    .. math:: F = J(X)^\top \Lambda(f(X; \theta^*))\, J(X)
        \quad\text{or}\quad J(X)^\top \Lambda(\texttt{outputs})\, J(X)

    See :mod:`pyro_ntk.likelihoods` for ``Λ`` per likelihood and the module docstring for
    the finite-difference product. Symmetric positive semi-definite (rank at most ``N·O``).

    Args:
        X: inputs ``(N, ...)`` (dtype and device of the network).
        network: the trained ``nn.Module``, or a :class:`~pyro_ntk.Linearization` to share
            its θ* copy, parameter selection and products (keyword-only, after the tensors,
            as ``linear_operator`` rebuilds operators from their tensor arguments).
        likelihood: a :class:`~pyro_ntk.likelihoods.Likelihood` or its value
            (``"gaussian"``, ``"bernoulli"``, ``"categorical"``, ``"poisson"``).
        noise: Gaussian observation variance ``s²``: a positive scalar or a tensor
            broadcastable to ``(N, O)`` (heteroscedastic). Only for ``"gaussian"``. A tensor
            that requires grad receives gradients (``F`` is linear in ``1/s²``).
        method: a :class:`FisherMethod` or its value, ``"exact"`` (JVP, Λ, VJP) or
            ``"finite_difference"``.
        epsilon: finite-difference step for unit-norm directions (``None``:
            :func:`default_epsilon`).
        outputs: function values ``(N, O)`` at which to evaluate ``Λ_n`` instead of
            ``f(X; θ*)`` (``method="exact"`` only), e.g. the outputs
            ``f(X; θ*) + J δ*`` of a linearized model at its MAP: ``F = Jᵀ Λ(outputs) J``
            is then that model's exact Hessian of ``−log p(y | δ)``. The Jacobian stays at θ*.
        params: which parameters to linearize when ``network`` is an ``nn.Module`` (as
            :class:`~pyro_ntk.Linearization`; ``None``: all with ``requires_grad``).
        chunk_size: inputs per chunk when ``network`` is an ``nn.Module``.
        batch_shape: batch dimensions over which the same ``F`` is repeated (set by
            ``linear_operator`` when it broadcasts; rarely needed by hand).

    Cost per product with ``k`` columns: exact, one JVP + one VJP over ``N`` (≈ one NTK
    product); finite difference, one forward + one backward at ``θ* + εv`` per column,
    batched. ``f(X; θ*)`` is computed once at construction. Memory: the chunk's
    activations times ``k``. Rows and entries (``F[rows]``) cost one product with one-hot
    columns; :meth:`to_dense` and the diagonal form the per-example Jacobian (small problems).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> lin = Linearization(net.double())
        >>> X = torch.randn(6, 2, dtype=torch.float64)
        >>> F = FisherLinearOperator(X, network=lin, noise=0.5)
        >>> J = lin.jacobian(X).reshape(6, -1)
        >>> torch.allclose(F.to_dense(), J.T @ J / 0.5)
        True
    """

    def __init__(
        self,
        X: Tensor,
        *,
        network: nn.Module | Linearization,
        likelihood: str | Likelihood = "gaussian",
        noise: Tensor | float | None = 1.0,
        method: str | FisherMethod = "exact",
        epsilon: float | None = None,
        outputs: Tensor | None = None,
        params: ParamSelector = None,
        chunk_size: int | None = None,
        batch_shape: tuple[int, ...] = (),
    ):
        where = "FisherLinearOperator"
        lin = as_linearization(where, network, params, chunk_size)
        lik = get_likelihood(where, likelihood)
        check_choice(where, "method", method, [m.value for m in FisherMethod])
        method = FisherMethod(method)
        X = lin.check_inputs(where, "X", X)
        N, O = X.shape[0], lin.output_dim(X)
        noise_t = None
        if lik.kind == Likelihood.GAUSSIAN:
            noise_t = _check_noise(where, noise, lin, N, O)
        elif not (isinstance(noise, float | int) and noise == 1.0) and noise is not None:
            raise ValueError(
                f"{where}: noise applies to the gaussian likelihood only; got noise={noise!r} "
                f"with likelihood={lik.kind.value!r}."
            )
        lik.check_outputs(where, O)
        if epsilon is not None and not (isinstance(epsilon, float | int) and epsilon > 0):
            raise ValueError(f"{where}: epsilon must be a positive float, got {epsilon!r}.")
        if outputs is not None:
            outputs = _check_outputs(where, outputs, lin, N, O)
            if method == FisherMethod.FINITE_DIFFERENCE:
                raise ValueError(
                    f"{where}: outputs= needs method='exact'; the finite-difference product "
                    "differentiates the KL at θ*, so Λ is always taken at f(X; θ*) there."
                )
        batch_shape = torch.Size(batch_shape)
        super().__init__(
            X,
            network=lin,
            likelihood=lik.kind.value,
            noise=noise_t,
            method=method.value,
            epsilon=epsilon,
            outputs=outputs,
            batch_shape=batch_shape,
        )
        self.X = X
        self.linearization = lin
        self.likelihood = lik.kind.value
        self.method = method.value
        self.noise = noise_t
        self.epsilon = float(epsilon) if epsilon is not None else default_epsilon(X.dtype)
        self._lik = lik
        self._outputs = outputs
        self._batch = batch_shape
        # the outputs at which Λ is evaluated, (N, O)
        self.f_star = lin(X).detach() if outputs is None else outputs

    # ------------------------------------------------------------------ structure
    def _matrix_size(self) -> tuple[int, int]:
        P = self.linearization.num_params
        return (P, P)

    def _rebuild(self, dtype: torch.dtype, device: torch.device) -> LinearOperator:
        return FisherLinearOperator(
            move(self.X, dtype, device),
            network=self.linearization.to(dtype, device),
            likelihood=self.likelihood,
            noise=1.0 if self.noise is None else move(self.noise, dtype, device),
            method=self.method,
            epsilon=self.epsilon,
            outputs=None if self._outputs is None else move(self._outputs, dtype, device),
            batch_shape=self._batch,
        )

    def _with_batch(self, batch_shape: torch.Size) -> LinearOperator:
        return FisherLinearOperator(
            self.X,
            network=self.linearization,
            likelihood=self.likelihood,
            noise=1.0 if self.noise is None else self.noise,
            method=self.method,
            epsilon=self.epsilon,
            outputs=self._outputs,
            batch_shape=batch_shape,
        )

    def _set_requires_grad(self, val: bool) -> None:
        # X and the outputs are data; the Gaussian noise is the one differentiable tensor.
        if self.noise is not None:
            self.noise.requires_grad_(val)

    def _transpose_nonbatch(self) -> FisherLinearOperator:
        return self

    # ------------------------------------------------------------------ products
    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape = to_columns("FisherLinearOperator.matmul", rhs, self.shape[-1])
        if self.method == FisherMethod.FINITE_DIFFERENCE:
            out = self._fd_matmul(cols)
        else:
            out = self._exact_matmul(cols)
        return self._broadcast(from_columns(out, shape))

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)

    def _exact_matmul(self, V: Tensor) -> Tensor:
        """``Jᵀ Λ J V`` for ``V`` ``(P, k)``: one JVP and one VJP."""
        lin = self.linearization  # X was checked at construction: no check per product
        JV = lin.jvp_unchecked(self.X, V)  # (N, O, k)
        return lin.vjp_unchecked(self.X, self._lik.hessian_product(self.f_star, JV, self.noise))

    def _fd_matmul(self, V: Tensor) -> Tensor:
        """``‖v‖ ∇KL(θ* + ε v/‖v‖) / ε`` per column of ``V`` ``(P, k)``."""
        norms = torch.linalg.vector_norm(V, dim=0)  # (k,)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        eps = self.epsilon
        lik, f_star, noise = self._lik, self.f_star, self.noise

        def kl(f: Tensor, rows: slice) -> Tensor:
            return lik.kl(f_star[rows], f, None if noise is None else noise[rows])

        grads = self.linearization.perturbed_gradient(self.X, V * (eps / safe), kl)
        # zero columns stay zero (their step is zero and they are scaled by ‖v‖ = 0)
        return grads * (norms / eps)

    # ------------------------------------------------------------------ dense, rows, entries
    def _jacobian_and_hessian(self) -> tuple[Tensor, Tensor]:
        J = self.linearization.jacobian(self.X)  # (N, O, P), small problems only
        return J, self._lik.hessian_product(self.f_star, J, self.noise)

    def _diagonal(self) -> Tensor:
        J, LJ = self._jacobian_and_hessian()
        return self._broadcast((J * LJ).sum((0, 1)))

    def to_dense(self) -> Tensor:
        """Dense ``F`` ``(*batch, P, P)`` from the per-example Jacobian (small problems)."""
        J, LJ = self._jacobian_and_hessian()
        return self._dense_copies(torch.einsum("nop,noq->pq", J, LJ))

    def _columns(self, cols: Tensor) -> Tensor:
        """``F[:, cols]`` ``(P, len(cols))``: one product with one-hot columns."""
        P = self.linearization.num_params
        E = torch.zeros(P, cols.numel(), dtype=self.dtype, device=self.device)
        E[cols, torch.arange(cols.numel(), device=self.device)] = 1.0
        return self._matmul(E)

    def _getitem_matrix(self, row_index, col_index) -> LinearOperator:
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            return self
        P = self.linearization.num_params
        rows = flat_index(row_index, P, self.device)
        cols = flat_index(col_index, P, self.device)
        if rows.numel() == 0 or cols.numel() == 0:
            block = torch.zeros(rows.numel(), cols.numel(), dtype=self.dtype, device=self.device)
        elif rows.numel() <= cols.numel():  # F symmetric: F[rows, cols] = F[:, rows]ᵀ[:, cols]
            block = self._columns(rows).mT[:, cols]
        else:
            block = self._columns(cols)[rows]
        return DenseLinearOperator(block)

    def _entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        unique, local = torch.unique(cols, return_inverse=True)
        return self._columns(unique)[rows, local]

    def __repr__(self) -> str:
        return (
            f"FisherLinearOperator(N={self.X.shape[0]}, P={self.linearization.num_params}, "
            f"likelihood={self.likelihood!r}, method={self.method!r})"
        )
