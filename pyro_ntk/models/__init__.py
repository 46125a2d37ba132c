"""Pyro models built on the linearized network."""

from pyro_ntk.models.classification import gp_class_probabilities as gp_class_probabilities
from pyro_ntk.models.classification import ntk_gp_classifier as ntk_gp_classifier
from pyro_ntk.models.integrated import HyperparameterMixture as HyperparameterMixture
from pyro_ntk.models.integrated import integrate_hyperparameters as integrate_hyperparameters
from pyro_ntk.models.linearized import LinearizedModel as LinearizedModel
from pyro_ntk.models.regression import NTKGPRegression as NTKGPRegression

__all__ = [
    "HyperparameterMixture",
    "LinearizedModel",
    "NTKGPRegression",
    "gp_class_probabilities",
    "integrate_hyperparameters",
    "ntk_gp_classifier",
]
