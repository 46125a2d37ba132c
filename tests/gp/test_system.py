"""The kernel system of :mod:`pyro_ntk.gp.system`: caches, routes and the escalation ladder."""

from __future__ import annotations

import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.gp import NTKSystem
from pyro_ntk.options import SolverOptions
from pyro_ntk.testing import reference_ntk


def _case(n=30):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    X = torch.randn(n, 2)
    return net, X, reference_ntk(net, X)


def test_routes_agree_with_the_dense_reference():
    net, X, K = _case()
    lin = Linearization(net)
    v, d = torch.tensor(0.8), torch.tensor(0.1)
    A = v * K + d * torch.eye(30)
    f = torch.randn(3, 30)
    mvn = torch.distributions.MultivariateNormal(torch.zeros(30), A)
    dense = NTKSystem(lin, X, SolverOptions(solver="cholesky"))
    torch.testing.assert_close(dense.log_prob(f, v, False, d), mvn.log_prob(f))
    torch.testing.assert_close(dense.kernel(v, False), v * K)
    cg = NTKSystem(lin, X, SolverOptions(solver="cg", cg_tolerance=1e-10))
    rhs = torch.randn(30, 2)
    torch.testing.assert_close(cg.solve(rhs, v, False, d), torch.linalg.solve(A, rhs))
    assert cg.method == "cg" and cg.last_solve.converged
    assert cg.preconditioner() is cg.preconditioner()  # built once


def test_ill_conditioned_solve_climbs_the_whole_ladder():
    net, X, K = _case()
    noise = torch.tensor(1e-4)  # κ ≈ 7.6e5
    sysm = NTKSystem(
        Linearization(net),
        X,
        SolverOptions(solver="cg", preconditioner="nystrom", preconditioner_rank=2,
                      max_cg_iterations=3, cg_tolerance=1e-10),
    )  # fmt: skip
    rhs = torch.randn(30, 1)
    with pytest.warns(NumericalWarning):
        x = sysm.solve(rhs, torch.tensor(1.0), False, noise)
    steps = [a.step for a in sysm.last_solve.attempts]
    assert steps[:3] == ["initial", "more_iterations", "stronger_preconditioner"]
    assert sysm.last_solve.converged
    want = torch.linalg.solve(K + noise * torch.eye(30), rhs)
    assert float((x - want).norm() / want.norm()) < 1e-8


def test_options_type_is_checked():
    net, X, _ = _case()
    with pytest.raises(TypeError, match="here: options must be"):
        NTKSystem(Linearization(net), X, {"solver": "cg"}, where="here")
