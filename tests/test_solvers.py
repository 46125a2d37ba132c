"""Preconditioned CG with diagnostics; damped parameter-space Fisher solves."""

import pytest
import torch
from linear_operator.operators import DenseLinearOperator
from linear_operator.utils.warnings import NumericalWarning
from networks import assert_unchanged, snapshot
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.fisher import FisherLinearOperator
from pyro_ntk.preconditioners import randomized_eigh
from pyro_ntk.solvers import SolverDiagnostics, conjugate_gradient, solve_damped


def _spd(n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    ev = torch.logspace(0, torch.log10(torch.tensor(float(cond))), n)
    return (Q * ev) @ Q.T


def test_cg_matches_dense_solve_batched():
    A = _spd(60, 1e3)
    B = torch.randn(60, 4)
    B[:, 3] = 0.0  # a zero right-hand side is solved by zero
    X, diag = conjugate_gradient(A, B, tol=1e-10, max_iter=500)
    torch.testing.assert_close(X, torch.linalg.solve(A, B), rtol=1e-7, atol=1e-9)
    assert torch.equal(X[:, 3], torch.zeros(60))
    assert isinstance(diag, SolverDiagnostics)
    assert diag.converged and diag.method == "cg" and diag.num_rhs == 4
    assert diag.relative_residual <= 1e-10
    true_rel = ((A @ X - B).norm(dim=0)[:3] / B[:, :3].norm(dim=0)).max()
    assert float(true_rel) < 1e-8
    assert diag.iterations <= diag.matvecs
    assert "converged" in str(diag)


def test_cg_accepts_callables_and_linear_operators_and_vectors():
    A = _spd(30, 50.0)
    b = torch.randn(30)
    x1, _ = conjugate_gradient(DenseLinearOperator(A), b, tol=1e-10)
    x2, _ = conjugate_gradient(lambda V: A @ V, b, tol=1e-10)
    want = torch.linalg.solve(A, b)
    torch.testing.assert_close(x1, want)
    torch.testing.assert_close(x2, want)
    assert x1.shape == (30,)


def test_exact_preconditioner_converges_in_one_iteration():
    A = _spd(40, 1e6)
    Ainv = torch.linalg.inv(A)
    B = torch.randn(40, 2)
    X, diag = conjugate_gradient(A, B, preconditioner=lambda R: Ainv @ R, tol=1e-8)
    assert diag.method == "pcg" and diag.iterations == 1
    torch.testing.assert_close(X, torch.linalg.solve(A, B))


def test_warm_start_and_setup_seconds_reported():
    A = _spd(30, 100.0)
    b = torch.randn(30)
    x_exact = torch.linalg.solve(A, b)
    x, diag = conjugate_gradient(A, b, x0=x_exact + 1e-9, tol=1e-6, setup_seconds=1.5)
    assert diag.iterations <= 1 and diag.setup_seconds == 1.5
    torch.testing.assert_close(x, x_exact)


def test_unconverged_solve_warns_with_figures():
    A = _spd(80, 1e8)
    b = torch.randn(80)
    with pytest.warns(NumericalWarning, match=r"unconverged after 5 iterations.*relative residual"):
        x, diag = conjugate_gradient(A, b, tol=1e-10, max_iter=5, check_every=2)
    assert not diag.converged and diag.iterations == 5
    assert diag.relative_residual > 1e-10
    assert diag.residual_history[-1] == pytest.approx(diag.relative_residual)
    # and warn=False silences it (filterwarnings=error would fail otherwise)
    _, diag2 = conjugate_gradient(A, b, tol=1e-10, max_iter=5, warn=False)
    assert not diag2.converged


def test_invalid_arguments():
    A = _spd(5, 2.0)
    with pytest.raises(ValueError, match="conjugate_gradient: tol"):
        conjugate_gradient(A, torch.randn(5), tol=0.0)
    with pytest.raises(ValueError, match="conjugate_gradient: B must have shape"):
        conjugate_gradient(A, torch.randn(5, 1, 1))
    with pytest.raises(TypeError, match="conjugate_gradient: A must be"):
        conjugate_gradient(3, torch.randn(5))
    with pytest.raises(ValueError, match="x0 has shape"):
        conjugate_gradient(A, torch.randn(5), x0=torch.randn(4))
    with pytest.raises(ValueError, match="solve_damped: damping"):
        solve_damped(A, torch.randn(5), -1.0)
    with pytest.raises(TypeError, match="solve_damped: preconditioner"):
        solve_damped(A, torch.randn(5), 1.0, preconditioner=lambda r: r)


def test_damped_fisher_solve_with_eigen_preconditioner():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2))
    before = snapshot(net)
    lin = Linearization(net, implementation="functorch")
    X = torch.randn(40, 3)
    F = FisherLinearOperator(X, linearization=lin, likelihood="categorical")
    P = lin.num_params
    b = torch.randn(P, 2)
    delta = 1e-3
    dense = F.to_dense() + delta * torch.eye(P)
    x_plain, d_plain = solve_damped(F, b, delta, tol=1e-8, max_iter=2000)
    pre = randomized_eigh(F.matmul, P, 30, dtype=torch.float64, oversampling=10, power_iterations=1)
    x_pre, d_pre = solve_damped(F, b, delta, preconditioner=pre, tol=1e-8, max_iter=2000)
    want = torch.linalg.solve(dense, b)
    torch.testing.assert_close(x_plain, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_pre, want, rtol=1e-5, atol=1e-6)
    assert d_pre.converged and d_plain.converged
    assert d_pre.iterations < d_plain.iterations
    assert d_pre.setup_seconds > 0
    assert_unchanged(net, before)


def test_damped_solve_warns_when_unconverged():
    A = _spd(50, 1e8)
    with pytest.warns(NumericalWarning, match="solve_damped: CG stopped unconverged after 3"):
        solve_damped(A, torch.randn(50), 1e-9, tol=1e-12, max_iter=3)
