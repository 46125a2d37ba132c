"""Fitting hyperparameters: :func:`fit` and its record :class:`FitResult`.

* :func:`fit` (:mod:`~pyro_ntk.infer.fitting`): L-BFGS on an exact marginal likelihood, Adam on an
  ELBO, rounds of ``optimize_prior`` on a Laplace evidence; a stopping rule
  (:mod:`~pyro_ntk.infer.stopping`), a progress bar, warnings with figures;
* :class:`FitResult` (:mod:`~pyro_ntk.infer.result`): losses, steps, converged, reason,
  hyperparameters, seconds, method;
* the loss (:mod:`~pyro_ntk.infer.objectives`), the loops (:mod:`~pyro_ntk.infer.loops`),
  the Laplace route (:mod:`~pyro_ntk.infer.evidence`), Pyro GP models with an NTK kernel
  (:mod:`~pyro_ntk.infer.gp_models`) and the param-store isolation
  (:mod:`~pyro_ntk.infer.isolation`).
"""

from pyro_ntk.infer.fitting import fit as fit
from pyro_ntk.infer.result import FitResult as FitResult

__all__ = ["FitResult", "fit"]
