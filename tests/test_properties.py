"""Property-based tests over random small MLPs and shapes (hypothesis).

For random width, depth, activation, input and output dimensions and sample counts:
``jvp``/``vjp`` are adjoint, K is symmetric and positive semi-definite, every
implementation strategy agrees with the dense float64 reference, and CG agrees with
Cholesky on ``K + s² I``. Examples are few (≤ 25 per property) to keep the file fast.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.solvers import conjugate_gradient
from pyro_ntk.testing import reference_ntk

IMPLEMENTATIONS = ("functorch", "cached", "structured")
ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}

SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def problems(draw):
    d_in = draw(st.integers(1, 3))
    width = draw(st.integers(1, 6))
    depth = draw(st.integers(1, 3))
    act = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]
    d_out = draw(st.integers(1, 3))
    n1 = draw(st.integers(1, 5))
    n2 = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    net = nn.Sequential(*layers, nn.Linear(d, d_out)).double()
    X1 = torch.randn(n1, d_in, dtype=torch.float64)
    X2 = torch.randn(n2, d_in, dtype=torch.float64)
    return net, X1, X2


def _close(a, b, rtol=1e-9):
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    return torch.allclose(a, b, rtol=0, atol=rtol * scale)


@SETTINGS
@given(problems(), st.sampled_from(IMPLEMENTATIONS), st.integers(1, 3))
def test_jvp_vjp_adjoint(problem, impl, k):
    net, X, _ = problem
    lin = Linearization(net, implementation=impl)
    N, O, P = X.shape[0], lin.output_dim(X), lin.num_params
    v, u = torch.randn(P, k), torch.randn(N, O, k)
    lhs = (lin.jvp(X, v) * u).sum()  # <J v, u>
    rhs = (v * lin.vjp(X, u)).sum()  # <v, Jᵀ u>
    assert _close(lhs, rhs, 1e-10)


@SETTINGS
@given(problems(), st.sampled_from(IMPLEMENTATIONS))
def test_kernel_symmetric_psd_and_reference(problem, impl):
    net, X1, X2 = problem
    lin = Linearization(net, implementation=impl)
    K = lin.ntk_dense(X1)
    assert _close(K, K.T, 1e-12)
    eig = torch.linalg.eigvalsh((K + K.T) / 2)
    assert float(eig.min()) >= -1e-10 * max(float(eig.abs().max()), 1.0)
    assert _close(K, reference_ntk(net, X1))
    assert _close(lin.ntk_dense(X1, X2), reference_ntk(net, X1, X2))
    # the diagonal and the products agree with the dense matrix
    assert _close(lin.ntk_diag(X1), K.diagonal())
    V = torch.randn(K.shape[1], 2)
    assert _close(lin.ntk_mvm(X1, None, V), K @ V)


@SETTINGS
@given(problems(), st.floats(0.1, 3.0))
def test_implementations_agree(problem, variance):
    net, X1, X2 = problem
    lins = [Linearization(net, implementation=i) for i in IMPLEMENTATIONS]
    O = lins[0].output_dim(X1)
    V = torch.randn(X2.shape[0] * O, 2)
    outs = [lin.ntk_mvm(X1, X2, V, variance=variance) for lin in lins]
    denses = [lin.ntk_dense(X1, X2, variance=variance) for lin in lins]
    jacs = [lin.jacobian(X1) for lin in lins]
    for i in range(1, len(lins)):
        assert _close(outs[i], outs[0]), IMPLEMENTATIONS[i]
        assert _close(denses[i], denses[0]), IMPLEMENTATIONS[i]
        assert _close(jacs[i], jacs[0]), IMPLEMENTATIONS[i]


@SETTINGS
@given(problems(), st.floats(0.05, 2.0))
def test_cg_agrees_with_cholesky(problem, noise):
    net, X, _ = problem
    lin = Linearization(net)
    K = lin.ntk_dense(X)
    n = K.shape[0]
    A = K + noise * torch.eye(n, dtype=K.dtype)
    b = torch.randn(n, 2, dtype=K.dtype)
    x_chol = torch.cholesky_solve(b, torch.linalg.cholesky(A))
    x_cg, diag = conjugate_gradient(
        lambda M: lin.ntk_mvm(X, None, M) + noise * M, b, tol=1e-11, max_iter=10 * n + 50
    )
    assert diag.converged
    assert _close(x_cg, x_chol, 1e-8)


def test_property_strategy_can_fail():
    # the comparison helper notices a relative perturbation far below test tolerances
    a = torch.ones(3, dtype=torch.float64)
    assert not _close(a, a * (1 + 1e-6))
    with pytest.raises(AssertionError):
        assert _close(a, a + 1e-3)
