r"""The function-space Gaussian of a linearized network, below the Pyro layer.

.. math:: f(X) \sim \mathcal N\big(m(X),\ A\big),\qquad A = \sigma^2 K(X, X) + d\, I

* :mod:`pyro_ntk.gp.system`: :class:`NTKSystem`, the cached kernel or operator of one
  ``(θ*, X)``, its factor and preconditioners, its solves.
* :mod:`pyro_ntk.gp.log_density`: the log-density by Cholesky or by mBCG + SLQ, escalated.
* :mod:`pyro_ntk.gp.spectral`: the dense log-density from one eigendecomposition of ``K``.
* :mod:`pyro_ntk.gp.posterior`: mean, variances, covariance and pathwise draws at test inputs.
* :mod:`pyro_ntk.gp.hyperposterior`: σ² and s² integrated out on a grid, the predictive mixture.
* :mod:`pyro_ntk.gp.importance`: per-layer σ_g² and s² integrated out by importance sampling.
* :mod:`pyro_ntk.gp.initial`: data-aware starting values of ``s²`` and ``σ²``.
"""

from pyro_ntk.gp.hyperposterior import GridPosterior as GridPosterior
from pyro_ntk.gp.hyperposterior import grid_posterior as grid_posterior
from pyro_ntk.gp.hyperposterior import mixture_moments as mixture_moments
from pyro_ntk.gp.importance import SamplePosterior as SamplePosterior
from pyro_ntk.gp.importance import sample_moments as sample_moments
from pyro_ntk.gp.importance import sample_posterior as sample_posterior
from pyro_ntk.gp.initial import initial_hyperparameters as initial_hyperparameters
from pyro_ntk.gp.log_density import cholesky_log_prob as cholesky_log_prob
from pyro_ntk.gp.log_density import linear_operator_settings as linear_operator_settings
from pyro_ntk.gp.log_density import mbcg_log_prob as mbcg_log_prob
from pyro_ntk.gp.posterior import add_noise as add_noise
from pyro_ntk.gp.posterior import cholesky_posterior as cholesky_posterior
from pyro_ntk.gp.posterior import conditional_covariance as conditional_covariance
from pyro_ntk.gp.posterior import explained_covariance as explained_covariance
from pyro_ntk.gp.posterior import pathwise_covariance as pathwise_covariance
from pyro_ntk.gp.posterior import pathwise_posterior as pathwise_posterior
from pyro_ntk.gp.spectral import KernelSpectrum as KernelSpectrum
from pyro_ntk.gp.spectral import spectral_log_prob as spectral_log_prob
from pyro_ntk.gp.system import ESCALATION_RANK_FACTOR as ESCALATION_RANK_FACTOR
from pyro_ntk.gp.system import NTKSystem as NTKSystem

__all__ = [
    "ESCALATION_RANK_FACTOR",
    "GridPosterior",
    "KernelSpectrum",
    "NTKSystem",
    "SamplePosterior",
    "add_noise",
    "cholesky_log_prob",
    "cholesky_posterior",
    "conditional_covariance",
    "explained_covariance",
    "grid_posterior",
    "initial_hyperparameters",
    "linear_operator_settings",
    "mbcg_log_prob",
    "mixture_moments",
    "pathwise_covariance",
    "pathwise_posterior",
    "sample_moments",
    "sample_posterior",
    "spectral_log_prob",
]
