"""Preconditioned CG with diagnostics; damped parameter-space Fisher solves."""

import pytest
import torch
from linear_operator.operators import DenseLinearOperator
from linear_operator.utils.warnings import NumericalWarning
from networks import assert_unchanged, snapshot
from torch import nn

from pyro_ntk import Linearization, LinearizedNetwork, NTKGPRegression
from pyro_ntk.gp import NTKSystem
from pyro_ntk.operators.fisher import FisherLinearOperator
from pyro_ntk.options import SolverOptions
from pyro_ntk.preconditioners import randomized_eigh
from pyro_ntk.solvers import (
    SolverDiagnostics,
    conjugate_gradient,
    lanczos_quadrature,
    solve_damped,
    solve_with_escalation,
)
from pyro_ntk.testing import reference_ntk


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
    F = FisherLinearOperator(X, network=lin, likelihood="categorical")
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


# ---------------------------------------------------------------------- CG escalation
def _ntk_case(n=30, seed=0):
    """A tiny tanh MLP whose NTK (P = 337, N = 30) has condition number ~1e11 (noise-free)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    X = torch.randn(n, 2)
    return net, X, reference_ntk(net, X)


def _system(net, X, kind, rank, **kw):
    options = dict(solver="cg", preconditioner=kind, preconditioner_rank=rank)
    options.update(max_cg_iterations=3, cg_tolerance=1e-10)
    options.update(kw)
    return NTKSystem(Linearization(net), X, SolverOptions(**options))


def _relerr(x, want):
    return float((x - want).norm() / want.norm())


@pytest.mark.parametrize("kind", ["fisher", None])
def test_unconverged_cg_escalates_to_cholesky_and_matches_dense_solve(kind):
    net, X, K = _ntk_case()
    before = snapshot(net)
    noise = torch.tensor(1e-4)  # κ(K + s²I) ≈ 7.6e5: 3 CG iterations cannot reach 1e-10
    rhs = torch.randn(30, 2)
    want = torch.linalg.solve(K + noise * torch.eye(30), rhs)  # dense float64 reference
    sysm = _system(net, X, kind, 2)
    with pytest.warns(NumericalWarning) as record:
        x = sysm.solve(rhs, torch.tensor(1.0), False, noise)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2, messages
    assert "unconverged after 3 iterations (max_iter 3)" in messages[0]
    assert "relative residual" in messages[0] and "escalating" in messages[0]
    assert "escalated solve reached tol 1.0e-10 with cholesky" in messages[1]
    d = sysm.last_solve
    steps = [a.step for a in d.attempts]
    assert steps == ["initial", "more_iterations", "stronger_preconditioner", "cholesky"]
    first, more, strong, chol = d.attempts
    assert (first.max_iter, more.max_iter, strong.max_iter) == (3, 12, 12)
    assert not first.converged and first.iterations == 3 and first.relative_residual > 1e-10
    assert not more.converged and not strong.converged
    assert (first.preconditioner, first.rank) == (kind, 2 if kind else None)
    assert (more.preconditioner, more.rank) == (first.preconditioner, first.rank)
    # none → Fisher at preconditioner_rank; a preconditioner → the same kind at 4× the rank
    assert (strong.preconditioner, strong.rank) == (("fisher", 8) if kind else ("fisher", 2))
    assert chol.method == "cholesky" and chol.converged and chol.relative_residual <= 1e-10
    assert d.escalated and d.converged and d.method == "cholesky"
    assert d.iterations == first.iterations + more.iterations + strong.iterations
    assert d.relative_residual == chol.relative_residual
    assert "attempts: initial" in str(d)
    assert _relerr(x, want) < 1e-8  # κ·u ≈ 1e-10
    assert_unchanged(net, before)


def test_escalation_stops_at_more_iterations_when_they_suffice():
    net, X, K = _ntk_case()
    noise = torch.tensor(1e-3)
    rhs = torch.randn(30, 1)
    want = torch.linalg.solve(K + noise * torch.eye(30), rhs)
    sysm = _system(net, X, "fisher", 8)
    with pytest.warns(NumericalWarning) as record:
        x = sysm.solve(rhs, torch.tensor(1.0), False, noise)
    first, final = (str(w.message) for w in record)
    assert "unconverged after 3 iterations" in first
    assert "escalated solve reached tol 1.0e-10 with pcg" in final
    d = sysm.last_solve
    assert [a.step for a in d.attempts] == ["initial", "more_iterations"]
    assert d.converged and d.method == "pcg" and d.relative_residual <= 1e-10
    assert not sysm._stronger_built  # the stronger preconditioner was never built
    assert _relerr(x, want) < 1e-8


def test_escalation_stops_at_the_stronger_preconditioner():
    net, X, K = _ntk_case()
    noise = torch.tensor(1e-3)
    rhs = torch.randn(30, 1)
    want = torch.linalg.solve(K + noise * torch.eye(30), rhs)
    sysm = _system(net, X, "nystrom", 2)
    with pytest.warns(NumericalWarning) as record:
        x = sysm.solve(rhs, torch.tensor(1.0), False, noise)
    assert "escalated solve reached tol 1.0e-10 with pcg" in str(record[-1].message)
    d = sysm.last_solve
    assert [a.step for a in d.attempts] == ["initial", "more_iterations", "stronger_preconditioner"]
    assert (d.attempts[-1].preconditioner, d.attempts[-1].rank) == ("nystrom", 8)
    assert d.converged and d.method == "pcg"
    assert _relerr(x, want) < 1e-8


def test_memory_guard_refuses_the_dense_step_and_the_best_iterate_is_returned():
    net, X, _ = _ntk_case()
    sysm = _system(net, X, "fisher", 2)
    sysm.lin.max_dense_bytes = 1000  # (N·O)² floats do not fit
    rhs = torch.randn(30, 1)
    with pytest.warns(NumericalWarning) as record:
        x = sysm.solve(rhs, torch.tensor(1.0), False, torch.tensor(1e-4))
    final = str(record[-1].message)
    assert "did NOT reach tol 1.0e-10: returning the best iterate" in final
    d = sysm.last_solve
    assert [a.step for a in d.attempts][-1] == "cholesky"
    assert "dense memory budget" in d.attempts[-1].note and d.attempts[
        -1
    ].relative_residual == float("inf")
    assert not d.converged and d.method == "pcg"
    best = min(a.relative_residual for a in d.attempts)
    assert d.relative_residual == best and f"{best:.3e}" in final
    # the returned iterate's residual is the recorded one (recomputed independently)
    A = reference_ntk(net, X) + 1e-4 * torch.eye(30)
    true = float((rhs - A @ x).norm() / rhs.norm())
    assert true == pytest.approx(best, rel=1e-3, abs=1e-12)


def test_no_escalation_when_cg_converges():
    net, X, K = _ntk_case()
    sysm = _system(net, X, "fisher", 10, max_cg_iterations=200, cg_tolerance=1e-8)
    rhs = torch.randn(30, 3)
    noise = torch.tensor(1e-2)
    x = sysm.solve(rhs, torch.tensor(1.0), False, noise)  # filterwarnings=error: no warning
    d = sysm.last_solve
    assert [a.step for a in d.attempts] == ["initial"] and not d.escalated
    assert d.converged and d.method == "pcg" and d.attempts[0].rank == 10
    assert not sysm._stronger_built
    torch.testing.assert_close(x, torch.linalg.solve(K + noise * torch.eye(30), rhs))


def test_regression_posterior_mean_escalates_to_the_exact_mean():
    net, X, _ = _ntk_case()
    y = torch.randn(30)
    Xs = torch.randn(5, 2)
    opts = dict(noise=torch.tensor(1e-4), variance=1.0, jitter=0.0, num_posterior_samples=4)
    exact = NTKGPRegression(X, y, net, **opts, options=SolverOptions(solver="cholesky"))
    cg = NTKGPRegression(X, y, net, **opts,
        options=SolverOptions(solver="cg", preconditioner="fisher", preconditioner_rank=2, max_cg_iterations=3, cg_tolerance=1e-10),
    )  # fmt: skip
    with torch.no_grad():
        want, _ = exact(Xs)
        with pytest.warns(NumericalWarning) as record:
            got, _ = cg(Xs)
    assert str(record[0].message).startswith("NTKGPRegression: CG stopped unconverged after 3")
    assert "reached tol 1.0e-10 with cholesky" in str(record[-1].message)
    assert cg.last_solve.escalated and cg.last_solve.method == "cholesky"
    assert cg.last_solve.num_rhs == 5
    assert _relerr(got, want) < 1e-8


def test_generic_escalation_records_a_missing_stronger_preconditioner():
    A = torch.diag(torch.logspace(0, 8, 40))
    b = torch.ones(40)
    with pytest.warns(NumericalWarning):
        x, d = solve_with_escalation(
            A, b, stronger=lambda: None, dense=lambda: torch.linalg.solve(A, b), max_iter=2,
            tol=1e-9, where="mine",
        )  # fmt: skip
    steps = [(a.step, a.note[:7]) for a in d.attempts]
    assert steps == [
        ("initial", ""),
        ("more_iterations", ""),
        ("stronger_preconditioner", "skipped"),
        ("cholesky", ""),
    ]
    torch.testing.assert_close(x, 1 / A.diagonal())
    assert x.shape == (40,) and d.num_rhs == 1


def test_generic_escalation_without_dense_returns_best_and_warns_residual():
    A = torch.diag(torch.logspace(0, 8, 40))
    b = torch.ones(40)
    with pytest.warns(NumericalWarning) as record:
        x, d = solve_with_escalation(A, b, max_iter=2, tol=1e-9, where="mine")
    assert str(record[0].message).startswith("mine: CG stopped unconverged after 2 iterations")
    assert "mine: escalated solve did NOT reach tol" in str(record[-1].message)
    assert [a.step for a in d.attempts] == ["initial", "more_iterations"]
    assert not d.converged and d.relative_residual == min(a.relative_residual for a in d.attempts)
    # warn=False: the same record, no warning
    x2, d2 = solve_with_escalation(A, b, max_iter=2, tol=1e-9, warn=False)
    torch.testing.assert_close(x2, x)
    assert [a.step for a in d2.attempts] == ["initial", "more_iterations"]


def test_escalation_rejects_bad_arguments_and_non_finite_systems():
    A = _spd(5, 2.0)
    with pytest.raises(ValueError, match="mine: iteration_factor"):
        solve_with_escalation(A, torch.randn(5), iteration_factor=0, where="mine")
    bad = torch.full((5, 5), float("nan"))
    with pytest.warns(NumericalWarning), pytest.raises(ValueError, match="non-finite"):
        solve_with_escalation(
            bad, torch.randn(5), dense=lambda: torch.linalg.solve(bad, torch.ones(5))
        )


def test_unconverged_log_prob_escalates_to_the_exact_density_and_gradient():
    net, X, _ = _ntk_case()
    f = torch.randn(30, 1)
    opts = dict(mean="zero", jitter=0.0, noise=torch.tensor(1e-4))
    v_exact = torch.tensor(0.7, requires_grad=True)
    exact = LinearizedNetwork(
        net, X, variance=v_exact, **opts, options=SolverOptions(solver="cholesky")
    )
    want = exact.log_prob(f)
    (g_want,) = torch.autograd.grad(want, v_exact)
    v = torch.tensor(0.7, requires_grad=True)
    d = LinearizedNetwork(net, X, variance=v, **opts,
        options=SolverOptions(solver="cg", preconditioner="fisher", preconditioner_rank=2, max_cg_iterations=3, cg_tolerance=1e-8),
    )  # fmt: skip
    with pytest.warns(NumericalWarning) as record:
        got = d.log_prob(f)
    first, final = (str(w.message) for w in record)
    assert "log-density's CG" in first and "unconverged after 3 iterations" in first
    assert "replaced by the exact dense log-density" in final
    attempts = d.system.last_log_prob.attempts
    assert [a.step for a in attempts] == [
        "initial",
        "more_iterations",
        "stronger_preconditioner",
        "cholesky",
    ]
    assert [a.max_iter for a in attempts[:3]] == [3, 12, 12] and attempts[2].rank == 8
    assert not any(a.converged for a in attempts[:3]) and attempts[-1].converged
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got, v)
    torch.testing.assert_close(g, g_want)


def test_converged_log_prob_does_not_escalate():
    net, X, _ = _ntk_case()
    d = LinearizedNetwork(
        net, X, variance=1.0, noise=0.1, options=SolverOptions(solver="cg", preconditioner="fisher")
    )
    d.log_prob(d.sample())  # filterwarnings=error: no warning
    assert [a.step for a in d.system.last_log_prob.attempts] == ["initial"]
    assert d.system.last_log_prob.converged


# ---------------------------------------------------------------------- Lanczos quadrature
def test_lanczos_quadrature_estimates_tr_log_of_a_small_spd_matrix():
    gen = torch.Generator().manual_seed(0)
    n = 40
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    B = (Q * torch.logspace(0, 3, n, dtype=torch.float64)) @ Q.T
    exact = torch.logdet(B)
    # n steps with full reorthogonalization: each probe's quadrature is exact, gᵀ log(B) g
    g = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    nodes, weights, steps = lanczos_quadrature(B.matmul, g, n, 1e-12)
    assert nodes.shape == weights.shape == (3, steps) and steps <= n
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, dtype=torch.float64))
    quad = g.square().sum(0) * (weights * nodes.log()).sum(-1)
    evals, evecs = torch.linalg.eigh(B)
    want = ((evecs.T @ g).square() * evals.log()[:, None]).sum(0)
    torch.testing.assert_close(quad, want, rtol=1e-8, atol=1e-8)
    # many Gaussian probes: tr log B within the Monte Carlo error
    g = torch.randn(n, 4000, generator=gen, dtype=torch.float64)
    nodes, weights, _ = lanczos_quadrature(B.matmul, g, 30, 1e-10)
    est = (g.square().sum(0) * (weights * nodes.log()).sum(-1)).mean()
    assert abs(float(est - exact)) < 0.05 * abs(float(exact))


def test_lanczos_quadrature_reduce_and_bad_probes():
    """``reduce`` sees every inner product (identity here: one shard); probes must be 2-D."""
    gen = torch.Generator().manual_seed(1)
    B = torch.diag(torch.linspace(1, 5, 10, dtype=torch.float64))
    g = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    calls = []

    def reduce(t):
        calls.append(t.shape)
        return t

    one = lanczos_quadrature(B.matmul, g, 10, 1e-12)
    both = lanczos_quadrature(B.matmul, g, 10, 1e-12, reduce=reduce)
    for a, b in zip(one[:2], both[:2], strict=True):
        assert torch.equal(a, b)
    assert one[2] == both[2] and calls and all(c[-1] == 2 for c in calls)
    with pytest.raises(ValueError, match="lanczos_quadrature: probes"):
        lanczos_quadrature(B.matmul, torch.ones(3, dtype=torch.float64), 5, 1e-12)
