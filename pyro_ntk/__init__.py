"""pyro_ntk: trained neural networks as Gaussian processes with their empirical NTK, in Pyro."""

from pyro_ntk.distributions import LinearizedNetwork as LinearizedNetwork
from pyro_ntk.infer import FitResult as FitResult
from pyro_ntk.infer import fit as fit
from pyro_ntk.kernels import EmpiricalNTK as EmpiricalNTK
from pyro_ntk.kernels import NTKKernel as NTKKernel
from pyro_ntk.laplace import LaplaceMethod as LaplaceMethod
from pyro_ntk.laplace import LinearizedLaplace as LinearizedLaplace
from pyro_ntk.laplace import cross_validate_temperature as cross_validate_temperature
from pyro_ntk.likelihoods import Likelihood as Likelihood
from pyro_ntk.linearization import Linearization as Linearization
from pyro_ntk.linearization import NTKImplementation as NTKImplementation
from pyro_ntk.means import NetworkMean as NetworkMean
from pyro_ntk.models.classification import gp_class_probabilities as gp_class_probabilities
from pyro_ntk.models.classification import ntk_gp_classifier as ntk_gp_classifier
from pyro_ntk.models.integrated import HyperparameterMixture as HyperparameterMixture
from pyro_ntk.models.integrated import integrate_hyperparameters as integrate_hyperparameters
from pyro_ntk.models.linearized import LinearizedModel as LinearizedModel
from pyro_ntk.models.regression import NTKGPRegression as NTKGPRegression
from pyro_ntk.operators import FisherLinearOperator as FisherLinearOperator
from pyro_ntk.operators import JacobianLinearOperator as JacobianLinearOperator
from pyro_ntk.operators import NTKLinearOperator as NTKLinearOperator
from pyro_ntk.operators.fisher import FisherMethod as FisherMethod
from pyro_ntk.options import PreconditionerKind as PreconditionerKind
from pyro_ntk.options import Solver as Solver
from pyro_ntk.options import SolverOptions as SolverOptions
from pyro_ntk.preconditioners import FisherPreconditioner as FisherPreconditioner
from pyro_ntk.preconditioners import NystromPreconditioner as NystromPreconditioner
from pyro_ntk.preconditioners import make_preconditioner as make_preconditioner
from pyro_ntk.solvers import SolverDiagnostics as SolverDiagnostics

__version__ = "0.1.0"

__all__ = [
    "LaplaceMethod",
    "Likelihood",
    "FisherMethod",
    "PreconditionerKind",
    "Solver",
    "SolverOptions",
    "EmpiricalNTK",
    "FisherLinearOperator",
    "FitResult",
    "HyperparameterMixture",
    "FisherPreconditioner",
    "JacobianLinearOperator",
    "Linearization",
    "LinearizedLaplace",
    "LinearizedModel",
    "LinearizedNetwork",
    "NTKGPRegression",
    "NTKImplementation",
    "NTKKernel",
    "NTKLinearOperator",
    "NetworkMean",
    "NystromPreconditioner",
    "SolverDiagnostics",
    "__version__",
    "cross_validate_temperature",
    "fit",
    "gp_class_probabilities",
    "integrate_hyperparameters",
    "ntk_gp_classifier",
    "make_preconditioner",
]
