"""Pyro models built on the linearized network."""

from pyro_ntk.models.classification import gp_class_probabilities as gp_class_probabilities
from pyro_ntk.models.classification import ntk_gp_classifier as ntk_gp_classifier
from pyro_ntk.models.linearized import LinearizedModel as LinearizedModel
from pyro_ntk.models.regression import NTKGPRegression as NTKGPRegression

__all__ = [
    "LinearizedModel",
    "NTKGPRegression",
    "gp_class_probabilities",
    "ntk_gp_classifier",
]
