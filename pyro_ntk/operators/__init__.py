"""Matrix-free ``linear_operator`` views of a linearized network.

* :class:`JacobianLinearOperator`: ``J(X)``, shape ``(N·O, P)``.
* :class:`NTKLinearOperator`: ``K(X1, X2) = J(X1) diag(σ²) J(X2)ᵀ``, shape ``(N1·O, N2·O)``.
* :class:`FisherLinearOperator`: ``F = Jᵀ Λ J`` (generalized Gauss-Newton), shape ``(P, P)``.

:mod:`pyro_ntk.operators.base` holds their base classes and shared helpers.
"""

from pyro_ntk.operators.fisher import FisherLinearOperator as FisherLinearOperator
from pyro_ntk.operators.jacobian import JacobianLinearOperator as JacobianLinearOperator
from pyro_ntk.operators.ntk import NTKLinearOperator as NTKLinearOperator

__all__ = ["FisherLinearOperator", "JacobianLinearOperator", "NTKLinearOperator"]
