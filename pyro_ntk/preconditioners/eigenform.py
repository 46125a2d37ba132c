r"""The eigen-form ``M = c U diag(d) Uᵀ + D`` every preconditioner is applied in.

.. math::

    M^{-1} = D^{-1} - D^{-1} W (I_k + W^\top D^{-1} W)^{-1} W^\top D^{-1},\quad
    W = U \operatorname{diag}(\sqrt{c\,d}),\qquad
    \log\det M = \textstyle\sum \log D + \log\det(I_k + W^\top D^{-1} W)

(Woodbury and the matrix determinant lemma), and :func:`randomized_eigh`, the stabilized
randomized Nyström approximation ``A ≈ U diag(d) Uᵀ`` of a PSD operator that builds one
from products ``X ↦ A X``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from linear_operator.operators import (
    DiagLinearOperator,
    LinearOperator,
    PsdSumLinearOperator,
    RootLinearOperator,
)
from torch import Tensor

from pyro_ntk._checks import check_positive_int, check_tensor

__all__ = ["EigenPreconditioner", "PreconditionerFactors", "randomized_eigh"]

PreconditionerFactors = tuple[
    Callable[[Tensor], Tensor] | None, LinearOperator | None, Tensor | None
]


def _noise_vector(where: str, noise: object, n: int, dtype, device) -> tuple[Tensor, bool]:
    """``(D, constant)``: the noise as a detached ``(n,)`` vector, and whether it is constant."""
    t = torch.as_tensor(noise.detach() if isinstance(noise, Tensor) else noise, dtype=dtype)
    t = t.to(device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, n)):
        raise ValueError(f"{where}: noise has shape {tuple(t.shape)}; expected a scalar or ({n},).")
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"{where}: noise must be positive and finite, got {noise!r}.")
    constant = t.numel() == 1 or bool((t == t[0]).all())
    return t.reshape(-1).expand(n) if t.numel() == 1 else t, constant


class EigenPreconditioner:
    r"""``M = c U diag(d) Uᵀ + D`` with Woodbury solves and an exact log-determinant.

    .. math::
        M^{-1} = D^{-1} - D^{-1} W (I_k + W^\top D^{-1} W)^{-1} W^\top D^{-1}, \quad
        W = U \operatorname{diag}(\sqrt{c\,d}),\quad D = s^2 + c\, r

    Args:
        U: ``(n, k)`` with orthonormal columns (not checked).
        d: ``(k,)`` non-negative eigenvalues.
        residual: optional ``(n,)`` diagonal correction ``r ≥ 0``.
        setup_seconds: time it took to build (reported in diagnostics).
        products: K·v-equivalents it took to build.

    Cost: ``O(n k)`` per application (``t`` columns: ``O(n k t)``), ``O(n k² + k³)`` per
    new (``c``, non-constant ``D``) pair, ``O(n k)`` otherwise.

    Example:
        >>> U = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64)).Q
        >>> pre = EigenPreconditioner(U, torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> M = pre.to_dense(2.0, 0.1)
        >>> R = torch.randn(6, 3, dtype=torch.float64)
        >>> torch.allclose(pre.solve_closure(2.0, 0.1)(R), torch.linalg.solve(M, R))
        True
        >>> torch.allclose(pre.logdet(2.0, 0.1), torch.logdet(M))
        True
    """

    def __init__(
        self,
        U: Tensor,
        d: Tensor,
        residual: Tensor | None = None,
        *,
        setup_seconds: float = 0.0,
        products: float = 0.0,
    ):
        where = "EigenPreconditioner"
        U, d = check_tensor(where, "U", U), check_tensor(where, "d", d)
        if U.dim() != 2 or d.shape != (U.shape[1],):
            raise ValueError(
                f"{where}: U must be (n, k) and d (k,), got {tuple(U.shape)} and {tuple(d.shape)}."
            )
        if residual is not None and residual.shape != (U.shape[0],):
            raise ValueError(
                f"{where}: residual must be ({U.shape[0]},), got {tuple(residual.shape)}."
            )
        self.U = U.detach()
        self.d = d.detach().clamp_min(0)
        self.residual = None if residual is None else residual.detach().clamp_min(0)
        self.setup_seconds = float(setup_seconds)
        self.products = float(products)

    @property
    def size(self) -> int:
        """``n``, the operator's side."""
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        """``k``, the number of eigenpairs kept."""
        return self.U.shape[1]

    @property
    def global_size(self) -> int:
        """Side of the whole operator (``n`` here; the sum over ranks when ``U`` is sharded)."""
        return self.size

    def _reduce(self, partial: Tensor) -> Tensor:
        """Sum a ``k``-sized partial product over row shards of ``U`` (identity here).

        The seam for :class:`pyro_ntk.distributed.ShardedEigenPreconditioner`, which
        all-reduces it, so every Woodbury product below is the global one.
        """
        return partial

    def _diag(self, scale: float, noise: object) -> tuple[Tensor, bool]:
        D, constant = _noise_vector(
            "EigenPreconditioner", noise, self.size, self.U.dtype, self.U.device
        )
        if self.residual is not None:
            return D + scale * self.residual, False
        return D, constant

    def _woodbury(self, scale: float, D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``W = U diag(√(c d))``, ``D⁻¹`` as a column and the Cholesky of ``I + Wᵀ D⁻¹ W``."""
        W = self.U * (scale * self.d).sqrt()
        Dinv = (1.0 / D).unsqueeze(-1)
        eye = torch.eye(self.rank, dtype=W.dtype, device=W.device)
        return W, Dinv, torch.linalg.cholesky(eye + self._reduce(W.mT @ (Dinv * W)))

    def solve_closure(self, scale: float, noise: object) -> Callable[[Tensor], Tensor]:
        """``R ↦ M⁻¹ R`` for ``R`` of shape ``(n,)`` or ``(n, t)``, precomputed for (c, D)."""
        scale = float(scale)
        D, constant = self._diag(scale, noise)
        U, reduce = self.U, self._reduce
        if constant:
            s2 = D[0]
            coef = (1.0 / (scale * self.d + s2) - 1.0 / s2).unsqueeze(-1)  # (k, 1)

            def closure(R: Tensor) -> Tensor:
                Rm = R.unsqueeze(-1) if R.dim() == 1 else R
                out = Rm / s2 + U @ (coef * reduce(U.mT @ Rm))
                return out.squeeze(-1) if R.dim() == 1 else out

            return closure
        W, Dinv, LC = self._woodbury(scale, D)

        def closure(R: Tensor) -> Tensor:
            Rm = R.unsqueeze(-1) if R.dim() == 1 else R
            DR = Dinv * Rm
            out = DR - Dinv * (W @ torch.cholesky_solve(reduce(W.mT @ DR), LC))
            return out.squeeze(-1) if R.dim() == 1 else out

        return closure

    def logdet(self, scale: float, noise: object) -> Tensor:
        """``log det M`` by the matrix determinant lemma (exact)."""
        scale = float(scale)
        D, constant = self._diag(scale, noise)
        if constant:
            s2 = D[0]
            rest = (self.global_size - self.rank) * torch.log(s2)
            return torch.log(scale * self.d + s2).sum() + rest
        _, _, LC = self._woodbury(scale, D)
        return self._reduce(torch.log(D).sum()) + 2 * torch.log(LC.diagonal()).sum()

    def linear_operator(self, scale: float, noise: object) -> LinearOperator:
        """``M`` as a LinearOperator (``W Wᵀ + D``; linear_operator draws SLQ probes from it)."""
        D, _ = self._diag(float(scale), noise)
        W = self.U * (float(scale) * self.d).sqrt()
        return PsdSumLinearOperator(RootLinearOperator(W), DiagLinearOperator(D))

    def factors(self, scale: float, noise: object) -> PreconditionerFactors:
        """``(M⁻¹ closure, M as LinearOperator, log det M)``, linear_operator's triple."""
        return (
            self.solve_closure(scale, noise),
            self.linear_operator(scale, noise),
            self.logdet(scale, noise),
        )

    def to_dense(self, scale: float, noise: object) -> Tensor:
        """Dense ``M`` (tests, small ``n``)."""
        D, _ = self._diag(float(scale), noise)
        return (self.U * (float(scale) * self.d)) @ self.U.mT + torch.diag(D)


def randomized_eigh(
    matmul: Callable[[Tensor], Tensor],
    n: int,
    rank: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    oversampling: int = 10,
    power_iterations: int = 0,
    seed: int = 0,
) -> EigenPreconditioner:
    r"""Rank-``k`` eigen-approximation of a PSD operator by stabilized randomized Nyström.

    .. math::
        Y = A^{q+1} \Omega,\; Q = \mathrm{orth}(A^q \Omega),\;
        A \approx Y (Q^\top Y)^{-1} Y^\top = U \operatorname{diag}(d) U^\top

    (with ``Ω`` Gaussian ``(n, k + p)`` and a small shift ``ν`` for stability, Tropp et al.
    2017), truncated to the top ``k`` pairs. Used for parameter-space Fisher solves with
    :func:`pyro_ntk.solvers.solve_damped`.

    Args:
        matmul: ``X ↦ A X`` for ``X`` of shape ``(n, m)``.
        n: the side of ``A``.
        rank: ``k``.
        dtype: dtype of the sketch.
        device: device of the sketch.
        oversampling: ``p`` extra sketch columns.
        power_iterations: ``q``.
        seed: seed of the Gaussian sketch.

    Returns:
        An :class:`EigenPreconditioner` (``products`` counts ``A``-columns).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
        >>> pre = randomized_eigh(A.matmul, 8, 3, dtype=torch.float64, oversampling=5)
        >>> torch.allclose(pre.d, torch.tensor([8.0, 7.0, 6.0], dtype=torch.float64))
        True
    """
    check_positive_int("randomized_eigh", "rank", rank)
    start = time.perf_counter()
    m = min(n, rank + oversampling)
    gen = torch.Generator(device=device).manual_seed(seed)
    Omega = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=dtype, device=device)).Q
    products = 0
    for _ in range(power_iterations):
        Omega = torch.linalg.qr(matmul(Omega)).Q
        products += m
    Y = matmul(Omega)
    products += m
    U, d = _nystrom_from_sketch(Omega, Y)
    k = min(rank, n)
    return EigenPreconditioner(
        U[:, :k], d[:k], setup_seconds=time.perf_counter() - start, products=products
    )


def _nystrom_from_sketch(Omega: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """Stabilized Nyström ``Y (Ωᵀ Y)⁻¹ Yᵀ = U diag(d) Uᵀ`` for orthonormal ``Ω``."""
    nu = math.sqrt(Y.shape[0]) * torch.finfo(Y.dtype).eps * torch.linalg.matrix_norm(Y)
    Ynu = Y + nu * Omega
    core = Omega.mT @ Ynu
    core = (core + core.mT) / 2
    Lc, info = torch.linalg.cholesky_ex(core)
    if int(info) != 0:  # fall back to an eigen-decomposition of the core
        evals, evecs = torch.linalg.eigh(core)
        keep = evals > evals.max() * torch.finfo(Y.dtype).eps * core.shape[0]
        B = Ynu @ (evecs[:, keep] / evals[keep].sqrt())
    else:
        B = torch.linalg.solve_triangular(Lc, Ynu.mT, upper=False).mT
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    return U, (S.square() - nu).clamp_min(0)
