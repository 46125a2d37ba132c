r"""The Lanczos route of the linearized Laplace: matrix-free, for large ``P`` and ``N·O``.

``r`` Lanczos steps on ``S_T F S_T`` (one Fisher product each, :func:`~.map_fisher`) give the
top eigenpairs; the log-determinant is stochastic Lanczos quadrature (Ubaru, Chen & Saad
2017) from ``m`` Rademacher probes ``z_i`` and ``k`` steps each,

.. math:: \log\det(I + c\, S F S) \approx \frac{P}{m} \sum_{i=1}^m \sum_{j=1}^k
    w_{ij} \log(1 + c\, \theta_{ij}),

for any scale ``c`` (nodes ``θ`` and weights ``w`` from the probes' tridiagonal matrices),
or with ``slq_probes=0`` the sum over the kept eigenvalues ``Σ log(1 + c λ_i)`` (a lower
bound). Both can be re-evaluated at a new *scalar* σ² only (``S F S`` scales with it).

Cost: ``r + k`` batched Fisher products (JVP + VJP over N each); O(P·(r + m)) memory.
"""

from __future__ import annotations

import torch
from linear_operator.utils.lanczos import lanczos_tridiag
from torch import Tensor

from pyro_ntk.laplace.route import LaplaceMethod, LaplaceProblem, LaplaceRoute, map_fisher
from pyro_ntk.operators import FisherLinearOperator
from pyro_ntk.solvers import lanczos_quadrature

__all__ = ["LanczosRoute"]


class LanczosRoute(LaplaceRoute):
    """``rank`` Lanczos steps on the matrix-free ``S F S``; SLQ for the log-determinant."""

    method = LaplaceMethod.LANCZOS
    truncated = True

    def __init__(self, problem: LaplaceProblem, rank: int, slq_probes: int, slq_steps: int):
        super().__init__(problem)
        self.rank, self.slq_probes, self.slq_steps = rank, slq_probes, slq_steps

    def _eigenpairs(self, f_map, variance, temperature, seed):
        lin = self.problem.lin
        P = lin.num_params
        S = self.prior_std(variance, temperature)
        F = map_fisher(self.problem, f_map)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        init = torch.randn(P, 1, generator=gen, dtype=lin.dtype)
        Q, T = lanczos_tridiag(
            lambda V: S[:, None] * F._matmul(S[:, None] * V),
            max_iter=min(self.rank, P), dtype=lin.dtype, device=lin.device,
            matrix_shape=(P, P), init_vecs=init.to(lin.device),
        )  # fmt: skip
        theta, W = torch.linalg.eigh(T)
        self.variance = variance
        self.slq = self._slq_nodes(F, S, seed) if self.slq_probes else None
        return Q @ W, theta

    def log_det(self, variance: Tensor, temperature: float, where: str) -> Tensor:
        """At a scalar multiple ``c = variance / σ²_fit`` of the fitted σ² (``T`` is built in)."""
        c = variance / self.variance
        if self.slq is None:
            return torch.log1p(self.lam * c).sum()
        theta, w = self.slq
        return self.problem.lin.num_params * (w * torch.log1p(c * theta)).sum(-1).mean()

    def _slq_nodes(self, F: FisherLinearOperator, S: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Nodes θ and weights w ``(m, k)`` of ``S F S``, all probes batched in every product."""
        P, m = self.problem.lin.num_params, self.slq_probes
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        Z = torch.randint(0, 2, (P, m), generator=gen).to(S) * 2 - 1
        theta, w, _ = lanczos_quadrature(
            lambda V: S[:, None] * F._matmul(S[:, None] * V), Z, min(self.slq_steps, P), 1e-10
        )  # ‖z‖² = P for Rademacher probes: tr log(I + c SFS) ≈ P · mean_i Σ_j w_ij log(1 + c θ_ij)
        return theta.clamp_min(0), w
