r"""Linear solves for symmetric positive definite systems, with diagnostics.

.. math::

    A X = B, \qquad A \in \mathbb{R}^{n \times n} \text{ SPD}, \quad B \in \mathbb{R}^{n \times t},

one module per method (every name below is importable from ``pyro_ntk.solvers``):

* :mod:`pyro_ntk.solvers.cg`: preconditioned conjugate gradients for all ``t`` right-hand
  sides at once (:func:`conjugate_gradient`) and the damped system ``(A + δ I) X = B``
  (:func:`solve_damped`). Everything stays on the operator's device: the convergence test is
  a tensor operation and the host reads it only every ``check_every`` iterations, so a GPU
  runs the iteration without host round trips. An unconverged solve emits a
  :class:`~linear_operator.utils.warnings.NumericalWarning` with its figures.
* :mod:`pyro_ntk.solvers.cholesky`: the dense factorization with a jitter retry
  (:func:`cholesky_with_jitter`).
* :mod:`pyro_ntk.solvers.escalation`: one ladder for an unconverged iterative method
  (:func:`escalate`): more iterations, a stronger preconditioner, then Cholesky; its CG-solve
  kind is :func:`solve_with_escalation`.
* :mod:`pyro_ntk.solvers.linear_operator_cg`: the figures of linear_operator's unconverged-CG
  warning (:func:`linear_operator_cg_figures`).
* :mod:`pyro_ntk.solvers.slq`: stochastic Lanczos quadrature, the nodes and weights of
  ``gᵀ f(B) g`` (:func:`lanczos_quadrature`).
* :mod:`pyro_ntk.solvers.choice`: the ``solver="auto"`` rule between the dense and the
  matrix-free path (:func:`choose_solver`).
* :mod:`pyro_ntk.solvers.diagnostics`: what a solve did (:class:`SolverDiagnostics`,
  :class:`SolveAttempt`), returned by every solver.
"""

from pyro_ntk.solvers.cg import conjugate_gradient as conjugate_gradient
from pyro_ntk.solvers.cg import solve_damped as solve_damped
from pyro_ntk.solvers.choice import CHOLESKY_MEMORY_FRACTION as CHOLESKY_MEMORY_FRACTION
from pyro_ntk.solvers.choice import available_memory as available_memory
from pyro_ntk.solvers.choice import choose_solver as choose_solver
from pyro_ntk.solvers.cholesky import cholesky_with_jitter as cholesky_with_jitter
from pyro_ntk.solvers.diagnostics import SolveAttempt as SolveAttempt
from pyro_ntk.solvers.diagnostics import SolverDiagnostics as SolverDiagnostics
from pyro_ntk.solvers.escalation import ESCALATION_ITERATION_FACTOR as ESCALATION_ITERATION_FACTOR
from pyro_ntk.solvers.escalation import AttemptResult as AttemptResult
from pyro_ntk.solvers.escalation import EscalationText as EscalationText
from pyro_ntk.solvers.escalation import Rung as Rung
from pyro_ntk.solvers.escalation import escalate as escalate
from pyro_ntk.solvers.escalation import solve_with_escalation as solve_with_escalation
from pyro_ntk.solvers.linear_operator_cg import (
    linear_operator_cg_figures as linear_operator_cg_figures,
)
from pyro_ntk.solvers.slq import lanczos_quadrature as lanczos_quadrature

__all__ = [
    "CHOLESKY_MEMORY_FRACTION",
    "ESCALATION_ITERATION_FACTOR",
    "AttemptResult",
    "EscalationText",
    "Rung",
    "SolveAttempt",
    "SolverDiagnostics",
    "available_memory",
    "cholesky_with_jitter",
    "choose_solver",
    "conjugate_gradient",
    "escalate",
    "lanczos_quadrature",
    "linear_operator_cg_figures",
    "solve_damped",
    "solve_with_escalation",
]
