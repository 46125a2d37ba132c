r"""The base class: a preconditioner for ``σ² K(X, X) + s² I`` reused across σ² and s².

.. math::

    \sigma^2 K \approx c\, U \operatorname{diag}(d)\, U^\top,\qquad
    c = \exp\big(\operatorname{mean}_g \log(\sigma_g^2 / \sigma_{\mathrm{ref},g}^2)\big),

with the eigen-form built once for a reference ``σ_ref²`` by a subclass's ``_build`` and
rebuilt only when the per-layer ratios spread beyond ``rebuild_factor`` (see
:mod:`pyro_ntk.preconditioners`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from pyro_ntk._checks import check_positive_int
from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.parameters import ParamSelector
from pyro_ntk.preconditioners.eigenform import EigenPreconditioner, PreconditionerFactors

__all__ = ["DEFAULT_RANK", "Preconditioner"]

DEFAULT_RANK = 100
"""The rank ``k`` of every preconditioner unless one is asked for."""


class Preconditioner(ABC):
    """A function-space preconditioner for ``σ² K(X, X) + s² I``, reused across σ² and s².

    Subclasses implement :meth:`_build` (the eigen-form of ``K`` for a reference variance)
    and pass these arguments through (``**common``).

    Args:
        network: the trained ``nn.Module``, or a :class:`~pyro_ntk.Linearization` to share
            its θ* copy and products (e.g. the one of the system being preconditioned).
        X: the inputs ``(N, ...)``; ``n = N·O``.
        rank: ``k``.
        seed: seed of the random sketch (ignored by deterministic kinds).
        variance: reference σ² (``None``: ones), scalar or ``(G,)``.
        rebuild_factor: largest per-layer ratio spread served without rebuilding.
        params: which parameters to linearize when ``network`` is an ``nn.Module`` (as
            :class:`~pyro_ntk.Linearization`; ``None``: all with ``requires_grad``).
        chunk_size: inputs per chunk when ``network`` is an ``nn.Module``.
    """

    kind: str = "base"

    def __init__(
        self,
        network: nn.Module | Linearization,
        X: Tensor,
        *,
        rank: int = DEFAULT_RANK,
        seed: int = 0,
        variance: Tensor | float | None = None,
        rebuild_factor: float = 2.0,
        params: ParamSelector = None,
        chunk_size: int | None = None,
    ):
        where = type(self).__name__
        linearization = as_linearization(where, network, params, chunk_size)
        check_positive_int(where, "rank", rank)
        if not (isinstance(rebuild_factor, float | int) and rebuild_factor >= 1):
            raise ValueError(f"{where}: rebuild_factor must be >= 1, got {rebuild_factor!r}.")
        self.linearization = linearization
        self.X = linearization.check_inputs(where, "X", X)
        self.size = self.X.shape[0] * linearization.output_dim(self.X)
        self.rank = min(rank, self.size)
        self.seed = seed
        self.rebuild_factor = float(rebuild_factor)
        self.rebuilds = 0
        ref, _ = linearization.space.normalize_variance(
            where, variance, positive=True, convert=True
        )
        self._ref = ref.detach().expand(linearization.space.num_groups).clone()
        self._eigen: EigenPreconditioner | None = None

    # ------------------------------------------------------------------ variances
    def _sqrt_scale(self, ref: Tensor) -> Tensor | None:
        """``S^{1/2}`` per parameter ``(P,)``, or ``None`` when all reference variances are 1."""
        if bool((ref == 1).all()):
            return None
        return self.linearization.space.expand_group_values(ref).sqrt()

    def eigenform(self, variance: object = None) -> tuple[EigenPreconditioner, float]:
        """``(eigen-form, c)`` with ``σ² K ≈ c · U diag(d) Uᵀ``; builds or rebuilds lazily."""
        where = f"{type(self).__name__}.eigenform"
        v = self._ref
        if variance is not None:
            space = self.linearization.space
            v, _ = space.normalize_variance(where, variance, positive=True, convert=True)
            v = v.detach().expand(space.num_groups).clone()
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
