r"""Stochastic Lanczos quadrature: Gauss nodes and weights of ``gᵀ f(B) g`` for SPD ``B``.

.. math::

    g_i^\top f(B)\, g_i \approx \|g_i\|^2 \sum_{j=1}^{k} w_{ij}\, f(\theta_{ij}),
    \qquad T_i = V_i \operatorname{diag}(\theta_i) V_i^\top,\quad w_{ij} = (V_i)_{1j}^2,

with ``T_i`` the ``k × k`` Lanczos tridiagonal of ``B`` started at ``g_i / ‖g_i‖``. With
Gaussian (or Rademacher) probes, ``tr f(B) ≈ (1/t) Σ_i ‖g_i‖² Σ_j w_ij f(θ_ij)``, e.g.
``f = log`` for a log-determinant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pyro_ntk._checks import check_positive_int, check_tensor

__all__ = ["lanczos_quadrature"]


def lanczos_quadrature(
    matmul: Callable[[Tensor], Tensor],
    probes: Tensor,
    max_steps: int,
    tol: float,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, int]:
    r"""Gauss quadrature nodes and weights of ``B`` for each probe, by batched Lanczos.

    .. math:: g_i^\top f(B)\, g_i \approx \|g_i\|^2 \textstyle\sum_j w_{ij} f(\theta_{ij})

    All ``t`` probes run together (one product of ``t`` columns per step), with full
    reorthogonalization against every earlier Lanczos vector. A probe stops when
    ``β ≤ tol · |α|`` (an invariant subspace: its quadrature is then exact); its unused
    nodes are padded with ``1`` and weights with ``0``.

    Args:
        matmul: ``V ↦ B V`` for SPD ``B``, on ``(n, t)`` (on row-sharded data: this rank's
            rows of the product).
        probes: ``(n, t)`` starting vectors (this rank's rows when sharded).
        max_steps: Lanczos steps ``k`` at most.
        tol: breakdown threshold on ``β / |α|``.
        reduce: sums per-column partial inner products ``(…, t)`` over shards (an
            all-reduce); ``None``: one process.

    Returns:
        ``(nodes, weights, steps)``: ``(t, k)`` Ritz values ``θ`` and weights ``w`` (each
        row sums to 1), and ``k``, the steps run. Cost: ``k`` products with ``B`` of ``t``
        columns, ``O(n t k²)`` for the reorthogonalization, ``t`` eigendecompositions of
        ``k × k``.

    Example:
        >>> B = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> g = torch.ones(3, 1, dtype=torch.float64)
        >>> nodes, weights, k = lanczos_quadrature(B.matmul, g, 10, 1e-12)
        >>> round(float(3 * (weights * nodes.log()).sum()), 12)  # gᵀ log(B) g = log 8
        2.07944154168
    """
    where = "lanczos_quadrature"
    probes = check_tensor(where, "probes", probes)
    if probes.dim() != 2:
        raise ValueError(f"{where}: probes must have shape (n, t), got {tuple(probes.shape)}.")
    check_positive_int(where, "max_steps", max_steps)
    if reduce is None:
        reduce = _identity
    norms2 = reduce(probes.square().sum(0))  # (t,)
    Q = probes / norms2.sqrt()
    basis = [Q]
    alphas, betas = [], []
    previous, beta = None, None
    lengths = torch.zeros_like(norms2, dtype=torch.long)
    active = torch.ones_like(norms2, dtype=torch.bool)
    for step in range(max_steps):
        W = matmul(Q)
        a = reduce((Q * W).sum(0))
        W = W - a * Q if previous is None else W - a * Q - beta * previous
        stacked = torch.stack(basis)  # (j, n, t)
        W = W - torch.einsum("kt,knt->nt", reduce(torch.einsum("knt,nt->kt", stacked, W)), stacked)
        b = reduce(W.square().sum(0)).sqrt()
        alphas.append(a)
        lengths = lengths + active.long()
        active = active & (b > tol * a.abs())
        if not bool(active.any()) or step == max_steps - 1:
            break
        betas.append(b)
        previous, beta = Q, b
        Q = W / torch.where(b > 0, b, torch.ones_like(b))
        basis.append(Q)
    k, t = len(alphas), probes.shape[1]
    al, be = torch.stack(alphas), torch.stack(betas) if betas else None
    nodes = torch.ones(t, k, dtype=probes.dtype, device=probes.device)
    weights = torch.zeros(t, k, dtype=probes.dtype, device=probes.device)
    for i in range(t):
        L = int(lengths[i])
        T = torch.diag(al[:L, i])
        if L > 1:
            off = be[: L - 1, i]
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        nodes[i, :L] = evals
        weights[i, :L] = evecs[0].square()
    return nodes, weights, k


def _identity(x: Tensor) -> Tensor:
    return x
