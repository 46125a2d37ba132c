"""Pyro models built on the linearized network."""

from pyro_ntk.models.classification import gp_class_probabilities as gp_class_probabilities
from pyro_ntk.models.classification import ntk_gp_classifier as ntk_gp_classifier
from pyro_ntk.models.laplace import LinearizedLaplace as LinearizedLaplace
from pyro_ntk.models.linearized import LinearizedModel as LinearizedModel
from pyro_ntk.models.regression import NTKGPRegression as NTKGPRegression
from pyro_ntk.models.tempering import TemperatureCV as TemperatureCV
from pyro_ntk.models.tempering import cross_validate_temperature as cross_validate_temperature

__all__ = [
    "LinearizedLaplace",
    "LinearizedModel",
    "NTKGPRegression",
    "TemperatureCV",
    "cross_validate_temperature",
    "gp_class_probabilities",
    "ntk_gp_classifier",
]
