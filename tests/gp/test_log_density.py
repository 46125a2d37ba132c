"""The log-density routes of :mod:`pyro_ntk.gp.log_density` against dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from linear_operator.operators import DenseLinearOperator
from linear_operator.utils.warnings import NumericalWarning

from pyro_ntk.gp import cholesky_log_prob, mbcg_log_prob
from pyro_ntk.options import SolverOptions
from pyro_ntk.preconditioners import IdentityPreconditioner


def _spd(n: int, log10_cond: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (Q * torch.logspace(0, log10_cond, n, dtype=torch.float64)) @ Q.T


def _reference(A: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    n = A.shape[0]
    quad = (cols * torch.linalg.solve(A, cols)).sum(0)
    return -0.5 * (quad + torch.logdet(A) + n * math.log(2 * math.pi))


def _operator(A: torch.Tensor):
    return lambda pre: DenseLinearOperator(A)


def test_cholesky_log_prob_matches_dense_reference():
    A = _spd(12, 3)
    cols = torch.randn(12, 4, dtype=torch.float64)
    got = cholesky_log_prob(cols.T, torch.linalg.cholesky(A))
    torch.testing.assert_close(got, _reference(A, cols), rtol=1e-12, atol=1e-10)


def test_mbcg_log_prob_converges_without_escalation():
    A = _spd(15, 1)
    cols = torch.randn(15, 3, dtype=torch.float64)
    options = SolverOptions(
        solver="cg", preconditioner=None, cg_tolerance=1e-4, num_trace_samples=4000
    )
    torch.manual_seed(0)
    lp, diag = mbcg_log_prob(
        cols, _operator(A), preconditioner=IdentityPreconditioner(), stronger=None,
        dense_factor=None, options=options, where="here",
    )  # fmt: skip
    assert [a.step for a in diag.attempts] == ["initial"] and diag.converged
    assert diag.method == "mbcg"
    # SLQ with 4000 probes: the log-determinant within ~1e-2
    torch.testing.assert_close(lp, _reference(A, cols), rtol=0, atol=0.05)


def test_mbcg_escalation_ladder_ends_at_the_exact_dense_density():
    """An ill-conditioned system (κ = 1e8) and a 3-iteration cap: the ladder runs every rung."""
    A = _spd(30, 8)
    cols = torch.randn(30, 2, dtype=torch.float64)
    built = []

    def stronger():
        built.append(True)
        return None  # no stronger preconditioner exists: recorded as skipped

    options = SolverOptions(
        solver="cg", preconditioner=None, max_cg_iterations=3, cg_tolerance=1e-8
    )
    with pytest.warns(NumericalWarning) as record:
        lp, diag = mbcg_log_prob(
            cols, _operator(A), preconditioner=IdentityPreconditioner(), stronger=stronger,
            dense_factor=lambda: torch.linalg.cholesky(A), options=options, where="here",
        )  # fmt: skip
    first, final = (str(w.message) for w in record)
    assert first.startswith("here: the log-density's CG") and "unconverged after 3" in first
    assert "replaced by the exact dense log-density" in final
    steps = [(a.step, a.max_iter) for a in diag.attempts]
    assert steps == [
        ("initial", 3),
        ("more_iterations", 12),
        ("stronger_preconditioner", 0),
        ("cholesky", 0),
    ]
    assert built == [True] and "skipped" in diag.attempts[2].note
    assert diag.converged and diag.method == "cholesky"
    torch.testing.assert_close(lp, _reference(A, cols), rtol=1e-10, atol=1e-8)


def test_mbcg_refused_dense_step_returns_the_best_estimate():
    A = _spd(30, 8)
    cols = torch.randn(30, 1, dtype=torch.float64)

    def refuse():
        raise MemoryError("too big")

    options = SolverOptions(
        solver="cg", preconditioner=None, max_cg_iterations=2, cg_tolerance=1e-8
    )
    with pytest.warns(NumericalWarning) as record:
        lp, diag = mbcg_log_prob(
            cols, _operator(A), preconditioner=IdentityPreconditioner(), stronger=None,
            dense_factor=refuse, options=options, where="here",
        )  # fmt: skip
    assert "did NOT reach tol" in str(record[-1].message)
    assert diag.attempts[-1].step == "cholesky" and "too big" in diag.attempts[-1].note
    assert not diag.converged and lp.shape == (1,) and bool(torch.isfinite(lp).all())
