r"""The dense route of the linearized Laplace: the ``P × P`` Fisher, for small ``P``.

.. math:: S_T F S_T = U \operatorname{diag}(\lambda) U^\top \ (\texttt{eigh}), \qquad
    \log\det(I + S F S / T) = 2 \sum_i \log L_{ii}, \quad L L^\top = I + S F S / T.

Cost: the per-example Jacobian once, O(N·O·P²) for ``F``, O(P³) per eigendecomposition and
per log-determinant; O(P²) memory. ``F`` is kept unscaled, so the evidence at any σ²
(scalar or per layer) costs one Cholesky.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_ntk.laplace.route import LaplaceMethod, LaplaceRoute, map_fisher
from pyro_ntk.solvers import cholesky_with_jitter

__all__ = ["DenseRoute"]


class DenseRoute(LaplaceRoute):
    """``F`` formed densely, ``(P, P)``; exact eigen-form and log-determinant."""

    method = LaplaceMethod.DENSE

    def _eigenpairs(self, f_map, variance, temperature, seed):
        S = self.prior_std(variance, temperature)
        # unscaled F (P, P), kept for the evidence at other σ²; S F S = U diag(λ) Uᵀ
        self.F = map_fisher(self.problem, f_map).to_dense()
        lam, U = torch.linalg.eigh(S[:, None] * self.F * S)
        return U, lam

    def log_det(self, variance: Tensor, temperature: float, where: str) -> Tensor:
        """Cholesky of ``I + S F S / T`` at σ² = ``variance`` (scalar or per layer)."""
        S = self.prior_std(variance)
        A = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        L = cholesky_with_jitter(A + S[:, None] * self.F * S / temperature, where=where)
        return 2 * L.diagonal().log().sum()
