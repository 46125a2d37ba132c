r"""The Fisher preconditioner on row-sharded data: sketches and Woodbury solves reduced across ranks.

.. math::

    Y = S^{1/2} J^\top G = \sum_r S^{1/2} J(X_r)^\top G_r,\quad Q = \mathrm{orth}(Y),\quad
    L_r = J(X_r) S^{1/2} Q,

    L^\top L = \sum_r L_r^\top L_r = V \operatorname{diag}(d) V^\top,\qquad
    U_r = L_r V \operatorname{diag}(d)^{-1/2}
    \quad (L L^\top = U \operatorname{diag}(d) U^\top,\ U^\top U = I_k).

``U`` is row-sharded like the data; ``d`` and the ``k × k`` matrices of the Woodbury
identity are the same on every rank, built from all-reduced ``k × t`` products
``Uᵀ R = Σ_r U_rᵀ R_r``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pyro_ntk.distributed.comm import Communicator
from pyro_ntk.distributed.linearization import ShardedLinearization
from pyro_ntk.preconditioners import EigenPreconditioner, FisherPreconditioner

__all__ = ["ShardedEigenPreconditioner", "ShardedFisherPreconditioner"]


class ShardedEigenPreconditioner(EigenPreconditioner):
    r"""``M = c U diag(d) Uᵀ + D`` with ``U`` and ``D`` row-sharded; solves reduce ``k·t`` numbers.

    .. math::

        M^{-1} R = D^{-1} R - D^{-1} W (I_k + W^\top D^{-1} W)^{-1} W^\top D^{-1} R,
        \qquad W^\top D^{-1} R = \textstyle\sum_r W_r^\top D_r^{-1} R_r,

        M^{-1/2} R = s^{-1} R + U \operatorname{diag}\big((c d + s^2)^{-1/2} - s^{-1}\big)
        U^\top R \quad (D = s^2 I).

    Args:
        U: this rank's rows ``(n_r, k)`` of a matrix with orthonormal columns.
        d: ``(k,)`` eigenvalues (the same on every rank).
        residual: optional ``(n_r,)`` diagonal correction.
        comm: the :class:`~pyro_ntk.distributed.Communicator`.
        size: the global side ``n = Σ_r n_r``.
        setup_seconds: time it took to build.
        products: K·v-equivalents it took to build.

    Cost per application to ``t`` columns: ``O(n_r k t)`` and one all-reduce of ``k·t``
    numbers; ``noise`` must be a scalar or this rank's ``(n_r,)`` rows.

    Example:
        >>> from pyro_ntk.distributed import Communicator
        >>> U = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64)).Q
        >>> pre = ShardedEigenPreconditioner(U, torch.tensor([3.0, 1.0], dtype=torch.float64),
        ...                                  comm=Communicator(), size=6)
        >>> R = torch.randn(6, 3, dtype=torch.float64)
        >>> M = (U * 2.0 * pre.d) @ U.T + 0.1 * torch.eye(6, dtype=torch.float64)
        >>> torch.allclose(pre.solve_closure(2.0, 0.1)(R), torch.linalg.solve(M, R))
        True
    """

    def __init__(
        self,
        U: Tensor,
        d: Tensor,
        residual: Tensor | None = None,
        *,
        comm: Communicator,
        size: int,
        setup_seconds: float = 0.0,
        products: float = 0.0,
    ):
        super().__init__(U, d, residual, setup_seconds=setup_seconds, products=products)
        self.comm = comm
        self._global_size = int(size)

    @property
    def global_size(self) -> int:
        """Side of the whole operator, the sum of the ranks' row counts."""
        return self._global_size

    def _reduce(self, partial: Tensor) -> Tensor:
        return self.comm.all_reduce(partial)

    def _diag(self, scale: float, noise: object) -> tuple[Tensor, bool]:
        D, _ = super()._diag(scale, noise)
        # constant only for a scalar noise and no residual: the same decision on every rank
        scalar = not isinstance(noise, Tensor) or noise.numel() == 1
        return D, scalar and self.residual is None

    def inverse_sqrt_closure(self, scale: float, noise: object) -> Callable[[Tensor], Tensor]:
        """``R ↦ M^{-1/2} R`` (scalar noise, no residual; a collective)."""
        scale = float(scale)
        D, constant = self._diag(scale, noise)
        if not constant:
            raise ValueError(
                "ShardedEigenPreconditioner.inverse_sqrt_closure: needs a scalar noise and no "
                "diagonal correction (M = c U diag(d) Uᵀ + s² I)."
            )
        s = D[0].sqrt()
        if self.rank == 0:  # M = s² I
            return lambda R: R / s
        coef = ((scale * self.d + s.square()).rsqrt() - 1.0 / s).unsqueeze(-1)
        U, reduce = self.U, self.comm.all_reduce

        def closure(R: Tensor) -> Tensor:
            return R / s + U @ (coef * reduce(U.mT @ R))

        return closure

    def linear_operator(self, scale: float, noise: object):
        """Not available: ``M`` is sharded across ranks (linear_operator's CG is single-process)."""
        raise NotImplementedError(
            "ShardedEigenPreconditioner.linear_operator: M is row-sharded across ranks; use "
            "solve_closure with pyro_ntk.solvers.conjugate_gradient(..., reduce=...)."
        )

    def to_dense(self, scale: float, noise: object) -> Tensor:
        """This rank's rows ``(n_r, n)`` of ``M`` (a collective: gathers ``U``)."""
        D, _ = self._diag(float(scale), noise)
        U_all, mine = self.comm.all_gather_rows(self.U)
        rows = (self.U * (float(scale) * self.d)) @ U_all.mT
        rows[:, mine] += torch.diag(D)
        return rows


class ShardedFisherPreconditioner(FisherPreconditioner):
    r""":class:`~pyro_ntk.FisherPreconditioner` on row-sharded data.

    .. math::

        Y = S^{1/2} J^\top G \ (\text{all-reduced}),\quad Q = \mathrm{orth}(Y),\quad
        L_r = J(X_r) S^{1/2} Q,\quad \textstyle\sum_r L_r^\top L_r = V \operatorname{diag}(d) V^\top

    The range finder runs unchanged on a :class:`ShardedLinearization` (its VJPs are
    all-reduced, so ``Y`` and ``Q`` are the same on every rank); the function-space sketch
    ``G_r`` is drawn per rank (seed ``(seed, rank)``), and the thin SVD of the row-sharded
    ``L`` goes through its all-reduced ``m × m`` Gram matrix (its eigenpairs are broadcast
    from rank 0, so every rank keeps the same rank ``k``). Eigenvalues below
    ``m · eps · d_max`` are dropped. The eigen-form is a :class:`ShardedEigenPreconditioner`.

    Args:
        linearization: a :class:`ShardedLinearization`.
        X: this rank's inputs ``(N_r, ...)``.
        rank: ``k`` (at most the global ``n``).
        seed: sketch seed.
        **options: as :class:`~pyro_ntk.FisherPreconditioner` (``oversampling``,
            ``power_iterations``, ``sketch``, ``diagonal_correction``, ``variance``,
            ``rebuild_factor``); always the range finder (``kronecker=False``).

    Cost: as the single-process preconditioner, split over ranks, plus one all-reduce of
    ``P·m`` numbers per VJP of the sketch, one of ``m²`` for the Gram matrix and one
    broadcast of ``m² + m``; every
    application one all-reduce of ``k·t``. Memory per rank ``O((P + n_r) m)``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = ShardedLinearization(net.double())
        >>> pre = ShardedFisherPreconditioner(lin, torch.randn(20, 2, dtype=torch.float64), rank=5)
        >>> pre.build().eigenform()[0].d.shape
        torch.Size([5])
    """

    def __init__(
        self,
        linearization: ShardedLinearization,
        X: Tensor,
        *,
        rank: int = 100,
        seed: int = 0,
        **options,
    ):
        if not isinstance(linearization, ShardedLinearization):
            raise TypeError(
                "ShardedFisherPreconditioner: linearization must be a "
                f"pyro_ntk.distributed.ShardedLinearization, got {type(linearization).__name__}."
            )
        if options.get("subsample", "auto") not in (None, "auto"):
            raise ValueError(
                "ShardedFisherPreconditioner: subsample is not supported on sharded data (each "
                f"rank's rows are already a shard), got subsample={options['subsample']!r}."
            )
        if options.get("kronecker", False):
            raise ValueError(
                "ShardedFisherPreconditioner: kronecker=True is not supported on sharded data "
                "(the Kronecker factors' Gram matrices are not reduced across ranks); the range "
                "finder is used."
            )
        options["subsample"] = None  # every rank sketches all of its rows
        options["kronecker"] = False
        super().__init__(linearization, X, rank=rank, seed=seed, **options)
        self.comm = linearization.comm
        self.global_size = self.comm.sum_int(self.size)
        self.rank = min(rank, self.global_size)

    def _build(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor | None, float]:
        lin, X, comm = self.linearization, self.X, self.comm
        P, n = lin.num_params, self.size
        m = min(self.rank + self.oversampling, P, self.global_size)
        s = self._sqrt_scale(ref)
        N, O = X.shape[0], n // X.shape[0]

        def J(V: Tensor) -> Tensor:  # (P, m) → (n_r, m), local
            return lin.jvp(X, V if s is None else s.unsqueeze(-1) * V).reshape(n, -1)

        def JT(U: Tensor) -> Tensor:  # (n_r, m) → (P, m), all-reduced
            out = lin.vjp(X, U.reshape(N, O, -1))
            return out if s is None else s.unsqueeze(-1) * out

        opts = dict(dtype=lin.dtype, device=lin.device)
        products = 0.0
        if self.sketch == "parameter":
            gen = torch.Generator(device=lin.device).manual_seed(self.seed)
            Y = JT(J(torch.randn(P, m, generator=gen, **opts)))
            products += m
        else:  # every rank draws its own rows of G
            gen = torch.Generator(device=lin.device).manual_seed(self.seed * 1_000_003 + comm.rank)
            Y = JT(torch.randn(n, m, generator=gen, **opts))
            products += 0.5 * m
        for _ in range(self.power_iterations):
            Y = JT(J(torch.linalg.qr(Y).Q))
            products += m
        L = J(torch.linalg.qr(Y).Q)  # (n_r, m)
        products += 0.5 * m
        gram = comm.all_reduce(L.mT @ L)
        evals, V = torch.linalg.eigh((gram + gram.mT) / 2)
        # rank 0's eigenpairs everywhere: the kept rank k fixes the shape of every later
        # all-reduce, so it must not depend on a rank's floating-point library
        eigen = comm.broadcast(torch.cat([evals.flip(0).unsqueeze(0), V.flip(1)]))
        evals, V = eigen[0], eigen[1:]
        floor = m * torch.finfo(L.dtype).eps * float(evals[0].clamp_min(0))
        k = min(self.rank, int((evals > floor).sum()))
        d, V = evals[:k], V[:, :k]
        U = (L @ V) / d.sqrt()
        residual = None
        if self.diagonal_correction:
            diagK = lin.ntk_diag(X, None if s is None else ref)
            residual = diagK - (U.square() * d).sum(-1)
        return U, d, residual, products

    def eigenform(self, variance: object = None) -> tuple[ShardedEigenPreconditioner, float]:
        """``(sharded eigen-form, c)`` with ``σ² K ≈ c · U diag(d) Uᵀ``; builds lazily."""
        eig, c = super().eigenform(variance)
        if not isinstance(eig, ShardedEigenPreconditioner):
            eig = ShardedEigenPreconditioner(
                eig.U,
                eig.d,
                eig.residual,
                comm=self.comm,
                size=self.global_size,
                setup_seconds=eig.setup_seconds,
                products=eig.products,
            )
            self._eigen = eig
        return eig, c
