r"""Cholesky factorization of a symmetric positive definite matrix, with a jitter retry.

.. math:: A + \epsilon I = L L^\top

with ``ε = 0`` when ``A`` factorizes as it is, else the smallest of a growing sequence of
jitters that makes it factorize (with a warning carrying the figures).
"""

from __future__ import annotations

import math
import warnings

import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from pyro_ntk._checks import check_positive_int, check_tensor

__all__ = ["DEFAULT_MAX_RELATIVE_JITTER", "DEFAULT_RELATIVE_JITTER", "cholesky_with_jitter"]


DEFAULT_RELATIVE_JITTER = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 1e-3}
"""First jitter of :func:`cholesky_with_jitter`, relative to the mean |diagonal|, per dtype
(other dtypes: ``10 · finfo(dtype).eps``)."""

DEFAULT_MAX_RELATIVE_JITTER = 1e-2
"""Default cap of :func:`cholesky_with_jitter`'s jitter, relative to the mean |diagonal|: beyond
1 % the factor no longer describes the matrix it was asked for."""


def cholesky_with_jitter(
    A: Tensor,
    *,
    jitter: float | None = None,
    max_tries: int = 9,
    max_jitter: float | None = None,
    where: str = "cholesky_with_jitter",
) -> Tensor:
    r"""Lower Cholesky factor of an SPD matrix, retrying with a growing diagonal jitter.

    .. math::

        A + \epsilon_k I = L L^\top, \qquad
        \epsilon_k = \epsilon_0\, 10^{k}, \quad k = 0, 1, \ldots

    First the plain factorization of ``A``; if it fails, ``ε₀`` (default
    ``DEFAULT_RELATIVE_JITTER[dtype] × mean |diag A|``: 1e-10 in float64, 1e-6 in float32)
    is added and multiplied by 10 on each further failure, at most ``max_tries`` times and
    never above ``max_jitter`` (default ``1e-2 × mean |diag A|``). A success after jitter
    warns :class:`~linear_operator.utils.warnings.NumericalWarning` with the jitter used, its
    size relative to the diagonal, the smallest diagonal entry and the number of tries;
    failure raises ``ValueError`` with the same figures. A matrix with NaN or Inf entries
    raises at once (no jitter can fix it).

    Args:
        A: symmetric ``(..., n, n)`` (batched: one jitter for the whole batch).
        jitter: first jitter ``ε₀`` (absolute); ``None``: relative default above.
        max_tries: factorizations with jitter after the plain one.
        max_jitter: largest jitter tried (absolute); ``None``: ``1e-2 × mean |diag A|``.
        where: the calling entry point, for messages.

    Returns:
        ``L`` with ``L Lᵀ = A + ε I`` (``ε = 0`` when ``A`` factorizes as is). Cost: one
        ``O(n³/3)`` factorization per try.

    Example:
        >>> A = torch.ones(3, 3, dtype=torch.float64)          # rank 1: singular
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     L = cholesky_with_jitter(A)
        >>> bool(torch.allclose(L @ L.T, A, atol=1e-6)), "jitter" in str(w[0].message)
        (True, True)
    """
    A = check_tensor(where, "A", A)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{where}: A must be a square (..., n, n) matrix, got {tuple(A.shape)}.")
    check_positive_int(where, "max_tries", max_tries)
    n = A.shape[-1]
    bad = int((~torch.isfinite(A.detach())).sum())
    if bad:
        raise ValueError(
            f"{where}: the {n}×{n} matrix A has {bad} NaN or Inf entries; no jitter can make "
            "it positive definite (check the inputs, variance and noise)."
        )
    L, info = torch.linalg.cholesky_ex(A)
    if not bool((info > 0).any()):
        return L
    diag = A.detach().diagonal(dim1=-2, dim2=-1)
    scale = float(diag.abs().mean().clamp_min(torch.finfo(A.dtype).tiny))
    rel0 = DEFAULT_RELATIVE_JITTER.get(A.dtype, 10 * torch.finfo(A.dtype).eps)
    eps = rel0 * scale if jitter is None else float(jitter)
    cap = DEFAULT_MAX_RELATIVE_JITTER * scale if max_jitter is None else float(max_jitter)
    if not (eps > 0 and math.isfinite(eps)) or not (cap > 0 and math.isfinite(cap)):
        raise ValueError(
            f"{where}: jitter and max_jitter must be positive and finite, got jitter={jitter!r}, "
            f"max_jitter={max_jitter!r} (mean |diag A| = {scale:.3g})."
        )
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    tried = []
    for _ in range(max_tries):
        if eps > cap * (1 + 1e-12):
            break
        tried.append(eps)
        L, info = torch.linalg.cholesky_ex(A + eps * eye)
        if not bool((info > 0).any()):
            warnings.warn(
                f"{where}: the {n}×{n} matrix ({A.dtype}) is not positive definite; "
                f"factorized with jitter {eps:.3g} added to the diagonal ({eps / scale:.1e} × "
                f"mean |diagonal| {scale:.3g}; smallest diagonal entry {float(diag.min()):.3g}) "
                f"after {len(tried)} tries. Use float64, a larger noise or jitter.",
                NumericalWarning,
                stacklevel=2,
            )
            return L
        eps *= 10.0
    largest = f"{tried[-1]:.3g}" if tried else "none (first jitter above the cap)"
    raise ValueError(
        f"{where}: the {n}×{n} matrix ({A.dtype}) is not positive definite even with jitter "
        f"{largest} on its diagonal (cap max_jitter = {cap:.3g}, {len(tried)} tries; mean "
        f"|diagonal| {scale:.3g}, smallest diagonal entry {float(diag.min()):.3g}); check "
        "the variance, noise and jitter."
    )
