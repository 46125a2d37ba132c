r"""linear_operator's CG non-convergence warning, read in one place.

.. math:: \text{``CG terminated in } k \text{ iterations with average residual norm } \rho\text{''}

linear_operator (``linear_operator/utils/linear_cg.py``) reports the figures of an
unconverged CG only in this warning's text; :func:`linear_operator_cg_figures` turns it into
numbers for the escalation ladder (:func:`~pyro_ntk.solvers.escalate`).
"""

from __future__ import annotations

import re
import warnings

from linear_operator.utils.warnings import NumericalWarning

__all__ = ["linear_operator_cg_figures"]

_LO_CG_UNCONVERGED = re.compile(
    r"CG terminated in (\d+) iterations with average residual norm ([-+0-9.eE]+|nan|inf)"
)


def linear_operator_cg_figures(caught: list[warnings.WarningMessage]) -> tuple[int, float] | None:
    """``(iterations, mean relative residual)`` of linear_operator's unconverged-CG warning.

    linear_operator (``linear_operator/utils/linear_cg.py``) warns ``"CG terminated in k
    iterations with average residual norm ρ"`` when its CG stops above the tolerance; this
    returns ``(k, ρ)`` from the warnings ``caught`` (``None`` when it did not warn) and
    re-emits every other warning unchanged.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("CG terminated in 7 iterations with average residual norm 0.5",
        ...                   NumericalWarning)
        >>> linear_operator_cg_figures(caught)
        (7, 0.5)
    """
    figures = None
    for w in caught:
        found = _LO_CG_UNCONVERGED.search(str(w.message))
        if found is not None and issubclass(w.category, NumericalWarning):
            figures = (int(found.group(1)), float(found.group(2)))
        else:  # not ours to handle: pass it on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return figures
