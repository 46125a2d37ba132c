r"""Low-rank preconditioners for NTK systems, built once and reused for every σ² and s².

The systems are ``(σ² K + s² I) x = b`` in function space, ``K = J diag(σ_ref²) Jᵀ`` the
empirical NTK (``n = N·O`` rows). Every preconditioner here is an *eigen-form*

.. math::

    K \approx U \operatorname{diag}(d)\, U^\top, \qquad U^\top U = I_k, \quad d \ge 0,

computed once per (X, θ*, linearized parameters), and applied for any scale ``c`` (σ²
relative to the reference) and noise ``s²`` as

.. math::

    M = c\, U \operatorname{diag}(d)\, U^\top + D, \qquad
    M^{-1} = D^{-1} - D^{-1} W (I + W^\top D^{-1} W)^{-1} W^\top D^{-1},\;
    W = U \operatorname{diag}(\sqrt{c d}),

    \log\det M = \textstyle\sum \log D + \log\det(I + W^\top D^{-1} W)
    \quad \text{(matrix determinant lemma; exact, so SLQ stays consistent)},

with ``D = s² I`` (closed form: ``M⁻¹ = s⁻² I + U diag(1/(c d + s²) − s⁻²) Uᵀ``), a
heteroscedastic diagonal, or ``D = s² + c·r`` with the *diagonal correction*
``r = diag(K) − diag(U diag(d) Uᵀ) ≥ 0``. Changing σ² or s² costs ``O(n k)`` (a ``k × k``
Cholesky in the non-constant case), never a new sketch.

**Per-layer variances.** ``K`` depends on the ratios ``σ_g² / σ_h²``, so the eigen-form is
built for a reference ``σ_ref²`` (default: all ones). A requested ``σ²`` with ratios
``ρ_g = σ_g² / σ_ref,g²`` is served as ``c = exp(mean_g log ρ_g)`` times the reference
form while ``max ρ / min ρ ≤ rebuild_factor`` (default 2: the preconditioner is then within
a factor 2 of ``σ² K`` on every layer's contribution); beyond that the form is rebuilt
lazily for the new ratios (``rebuilds`` counts them). A scalar σ² is always exact.

Kinds:

* :class:`FisherPreconditioner`: randomized range finder on the (variance-scaled) Fisher
  ``F = S^{1/2} Jᵀ J S^{1/2}`` (``P × P``) from Fisher-vector products, with a power
  iteration and oversampling (the defaults that won the benchmark), mapped to function
  space as ``L = J S^{1/2} Q`` and diagonalized by a thin SVD (``L Lᵀ = U diag(d) Uᵀ``).
* :class:`NystromPreconditioner`: stabilized randomized Nyström on ``K`` (sketch ``K Ω``).
* :class:`PivotedCholeskyPreconditioner`: linear_operator's partial pivoted Cholesky
  (the routine behind gpytorch's default preconditioner), put in eigen-form so it too is
  reused across hyperparameters.

Cost is tracked in *K·v-equivalents* (``products``): one column of a JVP or of a VJP over
the ``N`` inputs is half an NTK product. See ``benchmarks/bench_precond.py`` and
``benchmarks/RESULTS.md`` for measured iteration counts.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from linear_operator.operators import (
    DiagLinearOperator,
    LinearOperator,
    PsdSumLinearOperator,
    RootLinearOperator,
)
from torch import Tensor

from pyro_ntk._checks import check_nonnegative_int, check_positive_int, check_tensor
from pyro_ntk.linearization import Linearization, check_linearization

__all__ = [
    "EigenPreconditioner",
    "Preconditioner",
    "FisherPreconditioner",
    "NystromPreconditioner",
    "PivotedCholeskyPreconditioner",
    "IdentityPreconditioner",
    "make_preconditioner",
    "randomized_eigh",
    "KINDS",
]

KINDS = ("auto", "fisher", "nystrom", "pivoted_cholesky", None)

AUTO_SUBSAMPLE_ROWS = 4
"""``subsample="auto"`` keeps at least this many rows of ``J`` per sketch column."""

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

    def _diag(self, scale: float, noise: object) -> tuple[Tensor, bool]:
        D, constant = _noise_vector(
            "EigenPreconditioner", noise, self.size, self.U.dtype, self.U.device
        )
        if self.residual is not None:
            return D + scale * self.residual, False
        return D, constant

    def solve_closure(self, scale: float, noise: object) -> Callable[[Tensor], Tensor]:
        """``R ↦ M⁻¹ R`` for ``R`` of shape ``(n,)`` or ``(n, t)``, precomputed for (c, D)."""
        scale = float(scale)
        D, constant = self._diag(scale, noise)
        U = self.U
        if constant:
            s2 = D[0]
            coef = 1.0 / (scale * self.d + s2) - 1.0 / s2  # (k,)

            def closure(R: Tensor) -> Tensor:
                Rm = R.unsqueeze(-1) if R.dim() == 1 else R
                out = Rm / s2 + U @ (coef.unsqueeze(-1) * (U.mT @ Rm))
                return out.squeeze(-1) if R.dim() == 1 else out

            return closure
        W = U * (scale * self.d).sqrt()
        Dinv = (1.0 / D).unsqueeze(-1)
        C = torch.eye(self.rank, dtype=U.dtype, device=U.device) + W.mT @ (Dinv * W)
        LC = torch.linalg.cholesky(C)

        def closure(R: Tensor) -> Tensor:
            Rm = R.unsqueeze(-1) if R.dim() == 1 else R
            DR = Dinv * Rm
            out = DR - Dinv * (W @ torch.cholesky_solve(W.mT @ DR, LC))
            return out.squeeze(-1) if R.dim() == 1 else out

        return closure

    def logdet(self, scale: float, noise: object) -> Tensor:
        """``log det M`` by the matrix determinant lemma (exact)."""
        scale = float(scale)
        D, constant = self._diag(scale, noise)
        if constant:
            s2 = D[0]
            return torch.log(scale * self.d + s2).sum() + (self.size - self.rank) * torch.log(s2)
        W = self.U * (scale * self.d).sqrt()
        C = torch.eye(self.rank, dtype=W.dtype, device=W.device) + W.mT @ (W / D.unsqueeze(-1))
        return torch.log(D).sum() + 2 * torch.log(torch.linalg.cholesky(C).diagonal()).sum()

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


class Preconditioner(ABC):
    """A function-space preconditioner for ``σ² K(X, X) + s² I``, reused across σ² and s².

    Subclasses implement :meth:`_build` (the eigen-form of ``K`` for a reference variance).

    Args:
        linearization: the :class:`pyro_ntk.Linearization`.
        X: the inputs ``(N, ...)``; ``n = N·O``.
        rank: ``k``.
        seed: seed of the random sketch (ignored by deterministic kinds).
        variance: reference σ² (``None``: ones), scalar or ``(G,)``.
        rebuild_factor: largest per-layer ratio spread served without rebuilding.
    """

    kind: str = "base"

    def __init__(
        self,
        linearization: Linearization,
        X: Tensor,
        *,
        rank: int = 100,
        seed: int = 0,
        variance: Tensor | float | None = None,
        rebuild_factor: float = 2.0,
    ):
        where = type(self).__name__
        check_linearization(where, linearization)
        check_positive_int(where, "rank", rank)
        if not (isinstance(rebuild_factor, float | int) and rebuild_factor >= 1):
            raise ValueError(f"{where}: rebuild_factor must be >= 1, got {rebuild_factor!r}.")
        self.linearization = linearization
        self.X = linearization._check_X(where, "X", X)
        self.size = self.X.shape[0] * linearization.output_dim(self.X)
        self.rank = min(rank, self.size)
        self.seed = seed
        self.rebuild_factor = float(rebuild_factor)
        self.rebuilds = 0
        self._ref = self._group_variance(where, variance)
        self._eigen: EigenPreconditioner | None = None

    # ------------------------------------------------------------------ variances
    def _group_variance(self, where: str, variance: object) -> Tensor:
        """σ² as a detached ``(G,)`` tensor (a scalar is broadcast)."""
        lin = self.linearization
        G = lin.space.num_groups
        if variance is None:
            return torch.ones(G, dtype=lin.dtype, device=lin.device)
        v = variance.detach() if isinstance(variance, Tensor) else variance
        v = torch.as_tensor(v, dtype=lin.dtype).to(lin.device)
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != G):
            raise ValueError(
                f"{where}: variance has shape {tuple(v.shape)}; expected a scalar or ({G},)."
            )
        if not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
            raise ValueError(f"{where}: variance must be positive and finite, got {variance!r}.")
        return v.expand(G).clone() if v.dim() == 0 else v.clone()

    def _sqrt_scale(self, ref: Tensor) -> Tensor | None:
        """``S^{1/2}`` per parameter ``(P,)``, or ``None`` when all reference variances are 1."""
        if bool((ref == 1).all()):
            return None
        return self.linearization.space.expand_group_values(ref).sqrt()

    def eigenform(self, variance: object = None) -> tuple[EigenPreconditioner, float]:
        """``(eigen-form, c)`` with ``σ² K ≈ c · U diag(d) Uᵀ``; builds or rebuilds lazily."""
        where = f"{type(self).__name__}.eigenform"
        v = self._ref if variance is None else self._group_variance(where, variance)
        ratio = v / self._ref
        spread = float(ratio.max() / ratio.min())
        if spread > self.rebuild_factor:  # adopt the requested ratios as the reference
            if self._eigen is not None:
                self.rebuilds += 1
            self._ref, self._eigen = v, None
            ratio = torch.ones_like(v)
        if self._eigen is None:
            start = time.perf_counter()
            U, d, residual, products = self._build(self._ref)
            self._eigen = EigenPreconditioner(
                U, d, residual, setup_seconds=time.perf_counter() - start, products=products
            )
        return self._eigen, float(torch.exp(torch.log(ratio).mean()))

    @property
    def setup_seconds(self) -> float:
        """Seconds spent on the latest build (0 before the first)."""
        return 0.0 if self._eigen is None else self._eigen.setup_seconds

    @property
    def products(self) -> float:
        """K·v-equivalents spent on the latest build."""
        return 0.0 if self._eigen is None else self._eigen.products

    def build(self) -> Preconditioner:
        """Build the eigen-form now (otherwise it is built on first use); returns ``self``."""
        self.eigenform()
        return self

    @abstractmethod
    def _build(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor | None, float]:
        """``(U, d, residual or None, K·v-equivalents)`` for ``K = J diag(ref) Jᵀ``."""

    # ------------------------------------------------------------------ application
    def factors(self, variance: object = None, noise: object = 1.0) -> PreconditionerFactors:
        """``(M⁻¹ closure, M, log det M)`` for ``σ² K + s² I``."""
        eig, c = self.eigenform(variance)
        return eig.factors(c, noise)

    def solve_closure(self, variance: object = None, noise: object = 1.0):
        """``R ↦ M⁻¹ R`` for ``σ² K + s² I``."""
        eig, c = self.eigenform(variance)
        return eig.solve_closure(c, noise)

    def logdet(self, variance: object = None, noise: object = 1.0) -> Tensor:
        """``log det M`` (exact, matrix determinant lemma)."""
        eig, c = self.eigenform(variance)
        return eig.logdet(c, noise)

    def to_dense(self, variance: object = None, noise: object = 1.0) -> Tensor:
        """Dense ``M`` (tests)."""
        eig, c = self.eigenform(variance)
        return eig.to_dense(c, noise)

    def override(
        self, variance: object = None, noise: object = None
    ) -> Callable[[LinearOperator], PreconditionerFactors]:
        r"""A ``preconditioner_override`` for ``AddedDiagLinearOperator(σ²K, D, ...)``.

        Args:
            variance: the σ² inside the NTK operator (``None``: its ``variance`` attribute
                if it has one, else the reference).
            noise: ``s²`` (``None``: read from the operator's diagonal at call time).

        Returns:
            ``f(added_diag_op) -> (closure, precond_lt, logdet)``; everything detached.

        Example:
            >>> # AddedDiagLinearOperator(K, DiagLinearOperator(noise),
            >>> #     preconditioner_override=pre.override(variance))
        """
        n = self.size

        def f(op: LinearOperator) -> PreconditionerFactors:
            if op.shape[-2:] != (n, n) or op.dim() != 2:
                raise ValueError(
                    f"{type(self).__name__}.override: the operator has shape {tuple(op.shape)}; "
                    f"this preconditioner was built for ({n}, {n}) (N·O of its X)."
                )
            s2 = noise
            if s2 is None:
                s2 = op._diag_tensor.diagonal().detach()
            v = variance
            if v is None:
                v = getattr(op._linear_op, "variance", None)
            return self.factors(v, s2)

        return f


class FisherPreconditioner(Preconditioner):
    r"""Fisher-vector-product range finder, mapped to function space.

    .. math::
        F_S = S^{1/2} J^\top J S^{1/2},\quad Y = F_S^{\,q+1} \Omega,\quad Q = \mathrm{orth}(Y),
        \quad L = J S^{1/2} Q = U \Sigma V^\top,\quad K \approx L L^\top = U \Sigma^2 U^\top

    ``Ω`` is Gaussian ``(P, k + p)`` (``sketch="parameter"``), or ``Ω = S^{1/2} Jᵀ G`` with
    ``G`` Gaussian ``(n, k + p)`` (``sketch="function"``: half a product cheaper; with
    ``q = 0`` it equals Nyström on ``K`` in exact arithmetic, computed without inverting the
    Nyström core). The top ``k`` pairs are kept. ``diagonal_correction=True`` adds
    ``r = diag(K) − diag(L Lᵀ)`` to the noise (one exact ``diag K``).

    Cost (K·v-equivalents): ``(k + p)·(q + 1.5)`` (parameter sketch) or ``(k + p)·(q + 1)``
    (function sketch), all in batched products; memory ``O((P + n)(k + p))``.

    **Defaults** (function sketch, ``q = 1``, ``p = k // 2``, ``subsample="auto"``) were chosen
    with ``benchmarks/bench_precond.py`` and ``bench_precond_variants.py`` (trained
    26-128-128-1 tanh MLP, P = 20,097, N = 5000 and 20,000, s² = 1e-2 and 1e-3 × mean diag K,
    CG to 1e-4; ``benchmarks/RESULTS.md``): 0.63–0.73× the iterations of gpytorch's pivoted
    Cholesky at equal rank k = 100 and 13–16× fewer than no preconditioner, against
    0.74–0.82× for the plain range finder (``sketch="parameter", power_iterations=0,
    oversampling=0``). Oversampling gave the largest gain; a second power iteration less;
    running the range finder on half of the inputs (``"auto"``) kept the iterations (20 / 62
    / 37 / 115 against 19 / 59 / 37 / 113 on all of them) for two thirds of the set-up
    products (200 against 300); the diagonal correction *raised* iterations (e.g. 312
    against 132 at N = 20,000, s² = 1e-3 m̄) because it inflates the preconditioner's small
    eigenvalues beyond ``s²``, so it is off by default.

    Args:
        linearization: the :class:`pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        rank: ``k``.
        seed: sketch seed.
        oversampling: ``p`` (``None``: ``k // 2``).
        power_iterations: ``q``.
        sketch: ``"function"`` or ``"parameter"``.
        diagonal_correction: add the residual diagonal.
        variance: reference σ² (scalar or ``(G,)``; ``None``: ones).
        rebuild_factor: see the module docstring.
        subsample: run the sketch and the power iterations on a seeded random subset of the
            inputs, keep that subset Fisher's top ``k`` directions, and map only those ``k``
            columns through all ``N`` inputs: cost ``(k + p)(q + 1)·n_s/N + k/2``
            K·v-equivalents instead of ``(k + p)(q + 1)``. An ``int`` count, a fraction in
            ``(0, 1]``, ``None`` (all inputs) or ``"auto"``: half of the inputs, but at least
            ``4(k + p)`` rows of ``J`` (so small problems use all of them). A small subset
            is the cheapest single solve: 2000 of 20,000 inputs cost 80 set-up products
            against Nyström's 100 and took 41 / 129 iterations against its 52 / 155
            (s² = 1e-2 / 1e-3 m̄); the default's larger subset pays off when the
            preconditioner is reused across a fit.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = Linearization(net.double())
        >>> X = torch.randn(20, 2, dtype=torch.float64)
        >>> pre = FisherPreconditioner(lin, X, rank=5)
        >>> M = pre.to_dense(variance=2.0, noise=0.1)
        >>> torch.allclose(pre.logdet(2.0, 0.1), torch.logdet(M))
        True
    """

    kind = "fisher"

    def __init__(
        self,
        linearization: Linearization,
        X: Tensor,
        *,
        rank: int = 100,
        seed: int = 0,
        oversampling: int | None = None,
        power_iterations: int = 1,
        sketch: str = "function",
        diagonal_correction: bool = False,
        variance: Tensor | float | None = None,
        rebuild_factor: float = 2.0,
        subsample: int | float | str | None = "auto",
    ):
        where = "FisherPreconditioner"
        if subsample not in (None, "auto") and not (
            (isinstance(subsample, int) and not isinstance(subsample, bool) and subsample >= 1)
            or (isinstance(subsample, float) and 0.0 < subsample <= 1.0)
        ):
            raise ValueError(
                f"{where}: subsample must be None, 'auto', a number of inputs >= 1 or a "
                f"fraction in (0, 1], got {subsample!r}."
            )
        self.subsample = subsample
        if oversampling is None:
            oversampling = rank // 2 if isinstance(rank, int) else 0
        check_nonnegative_int(where, "oversampling", oversampling)
        check_nonnegative_int(where, "power_iterations", power_iterations)
        if sketch not in ("parameter", "function"):
            raise ValueError(f"{where}: sketch must be 'parameter' or 'function', got {sketch!r}.")
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        self.sketch = sketch
        self.diagonal_correction = bool(diagonal_correction)
        super().__init__(
            linearization,
            X,
            rank=rank,
            seed=seed,
            variance=variance,
            rebuild_factor=rebuild_factor,
        )

    def _sketch_rows(self, N: int, O: int) -> Tensor | None:
        """The inputs the range finder runs on: all (``None``) or a seeded random subset."""
        if self.subsample is None:
            return None
        if self.subsample == "auto":
            columns = self.rank + self.oversampling
            size = max(math.ceil(N / 2), math.ceil(AUTO_SUBSAMPLE_ROWS * columns / O))
        elif isinstance(self.subsample, int):
            size = self.subsample
        else:
            size = math.ceil(self.subsample * N)
        size = max(1, min(N, size))
        if size == N:
            return None
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 7919)
        rows = torch.randperm(N, generator=gen)[:size].sort().values
        return rows.to(self.linearization.device)

    def _build(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor | None, float]:
        lin, X = self.linearization, self.X
        P, n = lin.num_params, self.size
        N, O = X.shape[0], n // X.shape[0]
        rows = self._sketch_rows(N, O)
        Xs = X if rows is None else X[rows]
        ns = Xs.shape[0] * O
        frac = ns / n  # a product over the subset costs this share of a full one
        m = min(self.rank + self.oversampling, P, ns)
        s = self._sqrt_scale(ref)

        def J(V: Tensor, X: Tensor = X) -> Tensor:  # (P, m) → (rows·O, m)
            return lin.jvp(X, V if s is None else s.unsqueeze(-1) * V).reshape(-1, V.shape[1])

        def JT(U: Tensor, X: Tensor = X) -> Tensor:  # (rows·O, m) → (P, m)
            out = lin.vjp(X, U.reshape(X.shape[0], O, -1))
            return out if s is None else s.unsqueeze(-1) * out

        gen = torch.Generator(device=lin.device).manual_seed(self.seed)
        products = 0.0
        if self.sketch == "parameter":
            Omega = torch.randn(P, m, generator=gen, dtype=lin.dtype, device=lin.device)
            Y = JT(J(Omega, Xs), Xs)  # F_S Ω (on the subset's rows)
            products += m * frac
        else:
            G = torch.randn(ns, m, generator=gen, dtype=lin.dtype, device=lin.device)
            Y = JT(G, Xs)  # S^{1/2} Jᵀ G
            products += 0.5 * m * frac
        for _ in range(self.power_iterations):
            Q = torch.linalg.qr(Y).Q
            Y = JT(J(Q, Xs), Xs)
            products += m * frac
        Q = torch.linalg.qr(Y).Q
        k = min(self.rank, m)
        if rows is not None:
            # the subset's top-k directions within span Q (its Fisher's leading eigenvectors),
            # so that only k columns are pushed through all N rows
            _, _, Vh = torch.linalg.svd(J(Q, Xs), full_matrices=False)
            products += 0.5 * m * frac
            Q = Q @ Vh[:k].mT
        L = J(Q)  # (n, m): L Lᵀ = J S^{1/2} Q Qᵀ S^{1/2} Jᵀ ≼ K
        products += 0.5 * Q.shape[1]
        U, S, _ = torch.linalg.svd(L, full_matrices=False)
        U, d = U[:, :k], S[:k].square()
        residual = None
        if self.diagonal_correction:
            diagK = lin.ntk_diag(X, None if s is None else ref)
            residual = diagK - (U.square() * d).sum(-1)
        return U, d, residual, products


class NystromPreconditioner(Preconditioner):
    r"""Stabilized randomized Nyström on ``K`` (sketch ``K Ω``, ``Ω`` orthonormal ``(n, k + p)``).

    .. math:: K \approx (K\Omega)(\Omega^\top K \Omega)^{-1}(K\Omega)^\top = U \operatorname{diag}(d) U^\top

    Cost: ``k + p`` K·v-equivalents (one batched NTK product), memory ``O(n (k + p))``.

    Args:
        linearization: the :class:`pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        rank: ``k``.
        seed: sketch seed.
        oversampling: ``p``.
        power_iterations: ``q`` (each one more NTK product of ``k + p`` columns).
        variance: reference σ².
        rebuild_factor: see the module docstring.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = Linearization(net.double())
        >>> pre = NystromPreconditioner(lin, torch.randn(20, 2, dtype=torch.float64), rank=5)
        >>> pre.build().rank, pre.products
        (5, 5.0)
    """

    kind = "nystrom"

    def __init__(
        self,
        linearization: Linearization,
        X: Tensor,
        *,
        rank: int = 100,
        seed: int = 0,
        oversampling: int = 0,
        power_iterations: int = 0,
        variance: Tensor | float | None = None,
        rebuild_factor: float = 2.0,
    ):
        check_nonnegative_int("NystromPreconditioner", "oversampling", oversampling)
        check_nonnegative_int("NystromPreconditioner", "power_iterations", power_iterations)
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        super().__init__(
            linearization,
            X,
            rank=rank,
            seed=seed,
            variance=variance,
            rebuild_factor=rebuild_factor,
        )

    def _build(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor | None, float]:
        lin, X = self.linearization, self.X
        variance = None if bool((ref == 1).all()) else ref

        def K(V: Tensor) -> Tensor:
            return lin.ntk_mvm(X, X, V, variance=variance)

        pre = randomized_eigh(
            K,
            self.size,
            self.rank,
            dtype=lin.dtype,
            device=lin.device,
            oversampling=self.oversampling,
            power_iterations=self.power_iterations,
            seed=self.seed,
        )
        return pre.U, pre.d, None, pre.products


class PivotedCholeskyPreconditioner(Preconditioner):
    r"""linear_operator's partial pivoted Cholesky of ``K`` (gpytorch's default), in eigen-form.

    .. math:: K \approx L L^\top = U \Sigma^2 U^\top \quad (L = U \Sigma V^\top)

    ``L`` is ``linear_operator.operators.LinearOperator.pivoted_cholesky(rank)`` of the
    package's ``NTKLinearOperator``: the exact ``diag K`` plus ``k`` rows of ``K`` (each a
    one-point VJP and an ``N``-point JVP). With a constant noise, ``M = L Lᵀ + s² I`` is
    the matrix gpytorch's default preconditioner inverts; here it is factored once and reused
    across σ² and s².

    Cost: ``diag K`` (``O`` per-example gradients) + ``k`` sequential rows, each ≈ ½ K·v
    (counted as ``k/2`` in ``products``; ``diag K`` is not counted).

    Args:
        linearization: the :class:`pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        rank: ``k``.
        seed: unused (deterministic).
        error_tol: stop early once the trace of the residual is below it (``None``:
            ``linear_operator.settings.preconditioner_tolerance``, 1e-3, as gpytorch).
        variance: reference σ².
        rebuild_factor: see the module docstring.
    """

    kind = "pivoted_cholesky"

    def __init__(
        self,
        linearization: Linearization,
        X: Tensor,
        *,
        rank: int = 100,
        seed: int = 0,
        error_tol: float | None = None,
        variance: Tensor | float | None = None,
        rebuild_factor: float = 2.0,
    ):
        self.error_tol = error_tol
        super().__init__(
            linearization, X, rank=rank, seed=seed, variance=variance, rebuild_factor=rebuild_factor
        )

    def _build(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor | None, float]:
        from pyro_ntk.operators.ntk import NTKLinearOperator

        variance = None if bool((ref == 1).all()) else ref
        K = NTKLinearOperator(self.X, None, variance, linearization=self.linearization)
        L = K.pivoted_cholesky(rank=self.rank, error_tol=self.error_tol)
        U, S, _ = torch.linalg.svd(L.detach(), full_matrices=False)
        return U, S.square(), None, 0.5 * float(L.shape[-1])  # a row ≈ ½ K·v


class IdentityPreconditioner:
    """No preconditioning: ``override`` makes linear_operator run plain CG.

    (``AddedDiagLinearOperator(..., preconditioner_override=None)`` would instead fall back to
    gpytorch's default pivoted Cholesky.)

    Example:
        >>> IdentityPreconditioner().override()(None)
        (None, None, None)
    """

    kind = None
    rebuilds = 0
    setup_seconds = 0.0
    products = 0.0

    def override(self, variance: object = None, noise: object = None):
        """``f(op) -> (None, None, None)``."""
        return lambda op: (None, None, None)

    def solve_closure(self, variance: object = None, noise: object = 1.0):
        """``None``: no preconditioner."""
        return None


def make_preconditioner(
    kind: str | None,
    linearization: Linearization,
    X: Tensor,
    *,
    rank: int = 100,
    seed: int = 0,
    **options,
) -> Preconditioner | IdentityPreconditioner:
    r"""Build a preconditioner for ``σ² K(X, X) + s² I`` by name.

    Lazily: the sketch is taken on first use and then reused for every σ² and s².

    ``"auto"`` is ``"fisher"`` with its defaults (function sketch, one power iteration,
    oversampling ``k // 2``: the fewest iterations per build in ``benchmarks/RESULTS.md``);
    ``None`` is no preconditioner.

    Args:
        kind: ``"auto"``, ``"fisher"``, ``"nystrom"``, ``"pivoted_cholesky"`` or ``None``.
        linearization: the :class:`pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        rank: ``k``.
        seed: sketch seed.
        **options: passed to the class (e.g. ``power_iterations``, ``variance``).

    Returns:
        A :class:`Preconditioner` (or :class:`IdentityPreconditioner` for ``None``); use
        ``.override(variance, noise)`` as ``preconditioner_override``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = Linearization(net.double())
        >>> make_preconditioner("nystrom", lin, torch.randn(10, 2, dtype=torch.float64), rank=4).kind
        'nystrom'
    """
    if kind is None:
        return IdentityPreconditioner()
    if kind == "auto":
        kind = "fisher"
    classes = {
        "fisher": FisherPreconditioner,
        "nystrom": NystromPreconditioner,
        "pivoted_cholesky": PivotedCholeskyPreconditioner,
    }
    if kind not in classes:
        raise ValueError(f"make_preconditioner: kind must be one of {list(KINDS)}, got {kind!r}.")
    return classes[kind](linearization, X, rank=rank, seed=seed, **options)
