"""The kernel route's predictive in function space, against the parameter-space eigen-form
``J S U`` (one JVP) and a dense float64 reference ``J_* (F/T + D)⁻¹ J_*ᵀ``."""

from __future__ import annotations

import pytest
import torch
from laplace_problems import OUTPUTS, dense_hessian, laplace_problem

from pyro_ntk.laplace import LinearizedLaplace
from pyro_ntk.laplace.predictive import function_moments
from pyro_ntk.testing import reference_jacobian, reference_output

TOL = {"rtol": 1e-8, "atol": 1e-10}


def _problem(likelihood, n=9):
    return laplace_problem(likelihood, n, hidden=(5, 4))


def _laplace(likelihood, net, T, m=None, **kw):
    return LinearizedLaplace(
        net, likelihood, variance=torch.tensor([0.7, 1.8, 0.4]), layer_variances=True,
        noise=0.09 if likelihood == "gaussian" else None, method="kernel", temperature=T,
        prior_mean=m, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("likelihood", list(OUTPUTS))
@pytest.mark.parametrize("T", [1.0, 0.1])
def test_function_space_predictive_equals_parameter_space_and_dense(likelihood, T):
    net, X, y = _problem(likelihood)
    m = 0.2 * torch.randn(sum(p.numel() for p in net.parameters()))
    la = _laplace(likelihood, net, T, m, chunk_size=4).fit(X, y)  # test blocks of 4 inputs
    Xs = torch.randn(11, 2)
    mean, var = la.predictive_f(Xs)
    mean_b, blocks = la.predictive_f(Xs, full_cov=True)
    assert la._route._U is None  # no P × r directions were formed
    # dense float64 reference: J_* (F/T + D)⁻¹ J_*ᵀ with F at the MAP outputs
    J, Js = reference_jacobian(net, X), reference_jacobian(net, Xs)
    f_map = reference_output(net, X) + J @ la.delta
    F = torch.einsum("nop,noq,nqr->pr", J, dense_hessian(likelihood, f_map, 0.09), J)
    D = 1 / la.lin.space.expand_group_values(la.variance)
    Sigma = torch.linalg.inv(F / T + torch.diag(D))
    ref = torch.einsum("nop,pq,nrq->nor", Js, Sigma, Js)
    ref_mean = reference_output(net, Xs) + Js @ la.delta
    torch.testing.assert_close(mean, ref_mean, **TOL)
    torch.testing.assert_close(mean_b, ref_mean, **TOL)
    torch.testing.assert_close(blocks, ref, **TOL)
    torch.testing.assert_close(var, torch.diagonal(ref, dim1=1, dim2=2), **TOL)
    # the parameter-space eigen-form: one JVP of [δ*, S U] (U formed on demand here)
    S = la.prior_std()
    for full, got in ((False, var), (True, blocks)):
        pm, pv = function_moments(la.lin, Xs, la.delta, S, la._U, la._lam, la.variance, full)
        torch.testing.assert_close(pm, mean, **TOL)
        torch.testing.assert_close(pv, got, **TOL)
    # the directions formed on demand are the eigenvectors of S_T F S_T
    St = S / T**0.5
    torch.testing.assert_close(
        (St[:, None] * F * St) @ la._U, la._U * la._lam, rtol=1e-8, atol=1e-9
    )


def test_cross_kernels_are_reused_across_temperatures_and_only_there():
    """A temperature grid on the same held-out inputs forms their cross kernels once; every
    refit predicts what a fresh fit at that temperature predicts; new inputs or σ² recompute.
    No Jacobian is formed anywhere on the route (only kernel products)."""
    net, X, y = _problem("categorical")
    la = _laplace("categorical", net, 1.0)
    lin = la.lin
    jacobians, cross = [], []
    jacobian, dense = lin.jacobian, lin.ntk_dense
    lin.jacobian = lambda Z: jacobians.append(Z.shape[0]) or jacobian(Z)

    def counted(X1, X2=None, variance=None):
        if X2 is not None:
            cross.append(X1.shape[0])
        return dense(X1, X2, variance)

    lin.ntk_dense = counted
    la.fit(X, y)
    Xs = torch.randn(5, 2)
    for T in (1.0, 0.3, 0.01):
        la.temperature = T
        got = la.fit(X, y).predict(Xs)
        fresh = _laplace("categorical", net, T).fit(X, y).predict(Xs)
        torch.testing.assert_close(got, fresh, rtol=1e-10, atol=1e-12)
    assert cross == [5]  # one cross kernel of Xs in all
    la.predictive_f(Xs[:3])
    assert cross == [5, 3]
    la.variance = la.variance * 2
    la.fit(X, y).predictive_f(Xs[:3])
    assert cross == [5, 3, 3]
    la.predictive_f(Xs[:3], full_cov=True)
    assert cross == [5, 3, 3, 3] and jacobians == []
    del lin.jacobian, lin.ntk_dense


def test_another_map_takes_the_jvp_mean():
    """δ from Adam is not the function-space MAP: the mean is f + J_* δ for that δ."""
    net, X, y = _problem("bernoulli")
    la = _laplace("bernoulli", net, 0.5).fit(X, y, optimizer="adam", num_steps=5, lr=0.05)
    Xs = torch.randn(4, 2)
    Js = reference_jacobian(net, Xs)
    mean, var = la.predictive_f(Xs)
    torch.testing.assert_close(mean, reference_output(net, Xs) + Js @ la.delta, **TOL)
    S = la.prior_std()
    _, pv = function_moments(la.lin, Xs, la.delta, S, la._U, la._lam, la.variance, False)
    torch.testing.assert_close(var, pv, **TOL)


def test_a_temperature_changed_without_a_refit_keeps_the_fitted_posterior():
    """``temperature`` is read by ``fit``: until then the predictive is the fitted posterior's
    parameter-space formula (as on the other routes), not a mixture of two temperatures."""
    net, X, y = _problem("categorical")
    la = _laplace("categorical", net, 1.0).fit(X, y)
    Xs = torch.randn(4, 2)
    before = la.predictive_f(Xs)
    la.temperature = 0.1
    after = la.predictive_f(Xs)
    S = la.prior_std()
    expected = function_moments(la.lin, Xs, la.delta, S, la._U, la._lam, la.variance, False)
    for a, b, c in zip(before, after, expected):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(b, c, **TOL)
