"""The linearized Laplace approximation of a trained network under a GLM likelihood.

* :class:`LinearizedLaplace`: the MAP of the linearized model, its Gaussian posterior
  (eigen-form), predictive and evidence (:mod:`~pyro_ntk.laplace.linearized`);
* :class:`LaplaceMethod`: the route of its posterior, ``dense``
  (:mod:`~pyro_ntk.laplace.dense`), ``kernel`` (:mod:`~pyro_ntk.laplace.kernel`, with the
  function-space MAP of :mod:`~pyro_ntk.laplace.function_space`) or ``lanczos``
  (:mod:`~pyro_ntk.laplace.lanczos`);
* :func:`cross_validate_temperature`: the temperature of a tempered posterior by held-out
  likelihood (:mod:`~pyro_ntk.laplace.tempering`).
"""

from pyro_ntk.laplace.linearized import LinearizedLaplace as LinearizedLaplace
from pyro_ntk.laplace.route import LaplaceMethod as LaplaceMethod
from pyro_ntk.laplace.tempering import TEMPERATURES as TEMPERATURES
from pyro_ntk.laplace.tempering import TemperatureCV as TemperatureCV
from pyro_ntk.laplace.tempering import cross_validate_temperature as cross_validate_temperature

__all__ = [
    "TEMPERATURES",
    "LaplaceMethod",
    "LinearizedLaplace",
    "TemperatureCV",
    "cross_validate_temperature",
]
