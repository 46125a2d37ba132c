r"""The Fisher preconditioner: Kronecker eigen-directions and a range finder on Fisher products.

.. math::

    Q = [\,Q_\otimes,\ Q_{\mathrm{rf}}\,],\quad C = J S^{1/2} Q,\quad
    C^\top C = V \Lambda V^\top,\quad K \approx C V_k V_k^\top C^\top = U \operatorname{diag}(d) U^\top
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyro_ntk._checks import check_choice, check_nonnegative_int, check_positive_int
from pyro_ntk.linearization import Linearization
from pyro_ntk.preconditioners.base import DEFAULT_RANK, Preconditioner
from pyro_ntk.preconditioners.kronecker import kronecker_columns, top_eigenpairs

__all__ = ["AUTO_SUBSAMPLE_ROWS", "KRONECKER_MIN_POOL", "KRONECKER_POOL", "FisherPreconditioner"]

AUTO_SUBSAMPLE_ROWS = 4
"""``subsample="auto"`` keeps at least this many rows of ``J`` per sketch column."""

KRONECKER_POOL = 5
"""``pool=None`` keeps ``max(KRONECKER_POOL · k, KRONECKER_MIN_POOL)`` Kronecker directions."""

KRONECKER_MIN_POOL = 500


class FisherPreconditioner(Preconditioner):
    r"""Top of the Fisher ``F = S^{1/2} JᵀJ S^{1/2}``, mapped to function space (rank ``k``).

    .. math::
        C = J S^{1/2} [\,Q_\otimes,\ Q_{\mathrm{rf}}\,],\qquad
        C^\top C = V \Lambda V^\top,\qquad
        K \approx C V_k V_k^\top C^\top = U \operatorname{diag}(d)\, U^\top \preceq K

    Two sources of orthonormal parameter directions, on disjoint parameters:

    * ``Q_⊗`` (``kronecker=True``, the default): for the ``nn.Linear``, ``Conv1d`` and
      ``Conv2d`` (groups 1) layers whose factors the structured engine keeps, the ``pool``
      K-FAC eigen-directions ``u_i ⊗ w_j`` with the largest exact Rayleigh quotients
      ``‖J S^{1/2}(u_i ⊗ w_j)‖²``, reaching function space from the factors the engine
      already holds (:func:`~pyro_ntk.preconditioners.kronecker.kronecker_columns`), with
      no Jacobian products. When a convolution is among them (its directions sum over
      positions), their top-``k`` function-space eigenvectors ``U`` are refined by one
      subspace step, ``Q = orth(S^{1/2} Jᵀ U)``, columns ``J S^{1/2} Q`` (``k`` K·v
      equivalents), which reaches every parameter, so no range finder is run: a conv's
      rank-one directions alone took 6–23 % more CG iterations than the range finder on
      trained CNNs, the refined ones 0–4 % fewer (``benchmarks/RESULTS.md``).
    * ``Q_rf``: for every other linearized parameter (convolutions, normalization layers,
      any parameter when the engine is not the structured one, or all of them with
      ``kronecker=False``), a randomized range finder ``Q = orth(F_S^{q+1} Ω)`` on those
      parameters. ``Ω`` is Gaussian ``(P, k + p)`` (``sketch="parameter"``), or
      ``Ω = S^{1/2} Jᵀ G`` with ``G`` Gaussian ``(n, k + p)`` (``sketch="function"``: half
      a product cheaper; with ``q = 0`` it equals Nyström on ``K``). ``F_S`` may be the
      Fisher of a random subset of the inputs (``subsample``).

    A Rayleigh–Ritz step on the exact Fisher restricted to ``span Q``
    (:func:`~pyro_ntk.preconditioners.kronecker.top_eigenpairs`) keeps the best ``k``
    directions; since ``Q`` is orthonormal, ``C V_k V_kᵀ Cᵀ ≼ K``.
    ``diagonal_correction=True`` adds ``r = diag(K) − diag(U diag(d) Uᵀ)`` to the noise.

    Cost (K·v-equivalents, ``products``): the Kronecker part ``(1 + O)/2`` for the engine's
    factor pass (one forward and ``O`` backward passes, cached and reused by every later
    product), then ``O(n·(d_in² + d_out²))`` per layer and ``O(n·m²)`` for the
    Rayleigh–Ritz step (``m`` = pool + range-finder columns), no Jacobian products; the
    range finder ``(k + p)(q + 1)·n_s/N + k/2`` (function sketch on ``n_s`` of ``N``
    inputs). Memory ``O((P + n)(k + p) + n·m)``.

    **Defaults, measured** (``benchmarks/bench_precond.py``, trained 26-128-128-1 tanh MLP
    on ``diamonds``, P = 20,097, N = 5000, s² = 1e-2 / 1e-3 × mean diag K, CG to 1e-4,
    k = 100, ``benchmarks/RESULTS.md``): the Kronecker pool (``max(5k, 500)``) takes 20 / 62
    iterations — the exact top-100 eigenvectors of ``K`` take 19 / 60, gpytorch's pivoted
    Cholesky 30 / 87, Nyström 28 / 81, the range finder (q = 1, p = k/2, half the inputs)
    20 / 62 — for a set-up of about 12 K·v in seconds against 80–170 for the others.
    Three more trained MLPs on the same data (ReLU, under-trained, narrower; N = 3000,
    ``bench_precond_networks.py``) took 0–8 % more iterations than the exact top 100 and
    fewer than the range finder.
    Its weak case: a small, briefly trained MLP (sklearn's diabetes, P = 889, k = 20) took
    184 iterations against the range finder's 165 and the exact eigenvectors' 156; use
    ``kronecker=False`` there. The diagonal correction *raised* iterations on every problem
    measured (it inflates the preconditioner's small eigenvalues beyond ``s²``), so it is off.

    Args:
        network: the trained ``nn.Module`` or a :class:`~pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        oversampling: ``p`` of the range finder (``None``: ``k // 2``).
        power_iterations: ``q`` of the range finder.
        sketch: ``"function"`` or ``"parameter"`` (range finder).
        diagonal_correction: add the residual diagonal.
        subsample: run the range finder's sketch and power iterations on a seeded random
            subset of the inputs, keep that subset Fisher's top ``k`` directions, and map
            only those ``k`` columns through all ``N`` inputs. An ``int`` count, a fraction
            in ``(0, 1]``, ``None`` (all inputs) or ``"auto"``: half of the inputs, but at
            least ``4(k + p)`` rows of ``J`` (so small problems use all of them).
        kronecker: take the Kronecker eigen-directions for the layers the structured engine
            factors (``False``: the range finder for every parameter).
        pool: number of Kronecker directions kept for the Rayleigh–Ritz step (``None``:
            ``max(5k, 500)``).
        **common: ``rank`` (``k``), ``seed`` (of the sketch), ``variance`` (reference σ²,
            scalar or ``(G,)``; ``None``: ones), ``rebuild_factor``, ``params``,
            ``chunk_size``, as :class:`~pyro_ntk.preconditioners.Preconditioner`.

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
        network: nn.Module | Linearization,
        X: Tensor,
        *,
        oversampling: int | None = None,
        power_iterations: int = 1,
        sketch: str = "function",
        diagonal_correction: bool = False,
        subsample: int | float | str | None = "auto",
        kronecker: bool = True,
        pool: int | None = None,
        **common,
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
        self.kronecker = bool(check_choice(where, "kronecker", kronecker, (True, False)))
        if pool is not None:
            check_positive_int(where, "pool", pool)
        self.pool = pool
        if oversampling is None:
            rank = common.get("rank", DEFAULT_RANK)
            oversampling = rank // 2 if isinstance(rank, int) else 0
        check_nonnegative_int(where, "oversampling", oversampling)
        check_nonnegative_int(where, "power_iterations", power_iterations)
        if sketch not in ("parameter", "function"):
            raise ValueError(f"{where}: sketch must be 'parameter' or 'function', got {sketch!r}.")
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        self.sketch = sketch
        self.diagonal_correction = bool(diagonal_correction)
        super().__init__(network, X, **common)

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
        s = s0 = self._sqrt_scale(ref)
        columns, products, mask = [], 0.0, None
        if self.kronecker:
            pool = self.pool or max(KRONECKER_POOL * self.rank, KRONECKER_MIN_POOL)
            kron = kronecker_columns(lin, X, s, pool)
            if kron is not None and kron.positions > 1:
                # a convolution's rank-one directions are a poor basis on their own: one
                # subspace step from their top-k reaches every parameter (no range finder)
                U, _ = top_eigenpairs(kron.columns, self.rank)
                Q = torch.linalg.qr(_pull(lin, X, s, U)).Q
                columns.append(_push(lin, X, s, Q))
                products += kron.products + U.shape[1]
                mask = torch.zeros(lin.num_params, dtype=torch.bool, device=lin.device)
            elif kron is not None:
                columns.append(kron.columns)
                products += kron.products
                mask = ~kron.covered
        if mask is None or bool(mask.any()):
            # the range finder on the parameters the Kronecker directions do not cover
            if mask is not None:
                s = (torch.ones(lin.num_params, dtype=lin.dtype, device=lin.device)
                     if s is None else s) * mask  # fmt: skip
            L, sketched = self._range_finder(s, None if mask is None else int(mask.sum()))
            columns.append(L)
            products += sketched
        U, d = top_eigenpairs(torch.cat(columns, 1), self.rank)
        residual = None
        if self.diagonal_correction:
            diagK = lin.ntk_diag(X, None if s0 is None else ref)
            residual = diagK - (U.square() * d).sum(-1)
        return U, d, residual, products

    def _range_finder(self, s: Tensor | None, P: int | None) -> tuple[Tensor, float]:
        """``L = J S^{1/2} Q`` (``(n, ≤ k + p)``) and its K·v-equivalents; ``P``: live params."""
        lin, X = self.linearization, self.X
        P = lin.num_params if P is None else P
        n = self.size
        N, O = X.shape[0], n // X.shape[0]
        rows = self._sketch_rows(N, O)
        Xs = X if rows is None else X[rows]
        ns = Xs.shape[0] * O
        frac = ns / n  # a product over the subset costs this share of a full one
        m = min(self.rank + self.oversampling, P, ns)

        def J(V: Tensor, X: Tensor = X) -> Tensor:  # (P, m) → (rows·O, m)
            return _push(lin, X, s, V)

        def JT(U: Tensor, X: Tensor = X) -> Tensor:  # (rows·O, m) → (P, m)
            return _pull(lin, X, s, U)

        gen = torch.Generator(device=lin.device).manual_seed(self.seed)
        products = 0.0
        if self.sketch == "parameter":
            Omega = torch.randn(
                lin.num_params, m, generator=gen, dtype=lin.dtype, device=lin.device
            )
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
        return L, products


def _push(lin, X: Tensor, s: Tensor | None, V: Tensor) -> Tensor:
    """``J S^{1/2} V``: ``(P, m) → (N·O, m)``."""
    return lin.jvp(X, V if s is None else s.unsqueeze(-1) * V).reshape(-1, V.shape[1])


def _pull(lin, X: Tensor, s: Tensor | None, U: Tensor) -> Tensor:
    """``S^{1/2} Jᵀ U``: ``(N·O, m) → (P, m)``."""
    out = lin.vjp(X, U.reshape(X.shape[0], -1, U.shape[1]))
    return out if s is None else s.unsqueeze(-1) * out
