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

* :class:`FisherPreconditioner`: the top of the (variance-scaled) Fisher
  ``F = S^{1/2} Jᵀ J S^{1/2}`` (``P × P``), mapped to function space as ``L = J S^{1/2} Q``
  and diagonalized by a Rayleigh–Ritz step (``L Lᵀ ≈ U diag(d) Uᵀ``). ``Q`` holds, for the
  Linear and Conv1d/Conv2d (groups 1) layers whose factors the structured engine keeps, the
  Kronecker (K-FAC) eigen-directions with the largest Fisher Rayleigh quotients
  (:mod:`~pyro_ntk.preconditioners.kronecker`: no Jacobian products; refined by one
  subspace step when a convolution is among them), and for every other parameter a
  randomized range finder from Fisher-vector products (power iteration, oversampling, a
  subset of the inputs).
* :class:`NystromPreconditioner`: stabilized randomized Nyström on ``K`` (sketch ``K Ω``).
* :class:`PivotedCholeskyPreconditioner`: linear_operator's partial pivoted Cholesky
  (the routine behind gpytorch's default preconditioner), put in eigen-form so it too is
  reused across hyperparameters.

Cost is tracked in *K·v-equivalents* (``products``): one column of a JVP or of a VJP over
the ``N`` inputs is half an NTK product. See ``benchmarks/bench_precond.py`` and
``benchmarks/RESULTS.md`` for measured iteration counts.
"""

from __future__ import annotations

from pyro_ntk.preconditioners.base import Preconditioner as Preconditioner
from pyro_ntk.preconditioners.eigenform import EigenPreconditioner as EigenPreconditioner
from pyro_ntk.preconditioners.eigenform import PreconditionerFactors as PreconditionerFactors
from pyro_ntk.preconditioners.eigenform import randomized_eigh as randomized_eigh
from pyro_ntk.preconditioners.factory import KINDS as KINDS
from pyro_ntk.preconditioners.factory import IdentityPreconditioner as IdentityPreconditioner
from pyro_ntk.preconditioners.factory import make_preconditioner as make_preconditioner
from pyro_ntk.preconditioners.fisher import AUTO_SUBSAMPLE_ROWS as AUTO_SUBSAMPLE_ROWS
from pyro_ntk.preconditioners.fisher import FisherPreconditioner as FisherPreconditioner
from pyro_ntk.preconditioners.nystrom import NystromPreconditioner as NystromPreconditioner
from pyro_ntk.preconditioners.pivoted_cholesky import (
    PivotedCholeskyPreconditioner as PivotedCholeskyPreconditioner,
)

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
