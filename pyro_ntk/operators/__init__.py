"""Matrix-free ``linear_operator`` views of a linearized network.

* :class:`JacobianLinearOperator`: ``J(X)``, shape ``(N·O, P)``.
* :class:`NTKLinearOperator`: ``K(X1, X2) = J(X1) diag(σ²) J(X2)ᵀ``, shape ``(N1·O, N2·O)``.
* :func:`convert_linearization`: the same linearization in another dtype or device.
"""

from pyro_ntk.operators.jacobian import JacobianLinearOperator as JacobianLinearOperator
from pyro_ntk.operators.jacobian import convert_linearization as convert_linearization
from pyro_ntk.operators.ntk import NTKLinearOperator as NTKLinearOperator

__all__ = ["JacobianLinearOperator", "NTKLinearOperator", "convert_linearization"]
