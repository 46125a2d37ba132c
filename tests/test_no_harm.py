"""No harm: every public entry point leaves the user's network bitwise unchanged.

The network is in *training* mode, holds Dropout and BatchNorm (non-trivial running
statistics), carries forward, forward-pre and state-dict hooks registered by the "user" and a
``.grad`` on one parameter. Each walker constructs the entry point, calls it and, where it
fits something, fits a few steps; then parameters, buffers, gradients, ``requires_grad``
flags, hooks and train/eval flags must be exactly as before
(:func:`tests.networks.assert_unchanged`).

``test_every_public_name_is_walked`` fails when a name is added to ``pyro_ntk.__all__``
without a walker here (or a documented exclusion).
"""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import pytest
import torch
from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator
from networks import assert_unchanged, snapshot
from torch import nn

import pyro_ntk
from pyro_ntk.options import SolverOptions
from pyro_ntk.solvers import conjugate_gradient
from pyro_ntk.testing import reference_ntk

# Public names that are not entry points taking a network (documented exclusions).
EXCLUDED = {
    "__version__": "a string",
    "NTKImplementation": "an enum of strategy names (walked through Linearization)",
    "SolverDiagnostics": "a record returned by solves (checked in the NTKGPRegression walk)",
    "SolverOptions": "a frozen record of solver settings (no network involved)",
    "Solver": "an enum of solver names",
    "PreconditionerKind": "an enum of preconditioner names",
    "Likelihood": "an enum of likelihood names",
    "FisherMethod": "an enum of Fisher-product methods",
    "LaplaceMethod": "an enum of Laplace routes",
    "FitResult": "a record returned by fit (checked in the fit walk)",
}


def make_network(d_out: int = 1) -> tuple[nn.Module, list]:
    """A train-mode network with Dropout, BatchNorm, user hooks and a stale ``.grad``."""
    net = nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, d_out)
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    net.train()
    calls = []
    net[0].register_forward_hook(lambda m, i, o: calls.append("fwd"))
    net[4].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    net.register_state_dict_pre_hook(lambda m, prefix, keep_vars: None)
    net[4].weight.grad = torch.full_like(net[4].weight, 0.25)
    return net, calls


def _data(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3)


# ---------------------------------------------------------------------- the walkers
def walk_linearization(net):
    X = _data()
    for impl in pyro_ntk.NTKImplementation:
        lin = pyro_ntk.Linearization(net, implementation=impl, chunk_size=3)
        O, P = lin.output_dim(X), lin.num_params
        lin(X)
        lin.jvp(X, torch.randn(P, 2))
        lin.vjp(X, torch.randn(8, O))
        v = torch.tensor(0.5, requires_grad=True)
        lin.ntk_mvm(X, None, torch.randn(8 * O, 2), variance=v).sum().backward()
        lin.ntk_diag(X)
        lin.ntk_dense(X, X[:3])
        lin.jacobian(X)
        lin.clear_cache()


def walk_jacobian_operator(net):
    X = _data()
    lin = pyro_ntk.Linearization(net)
    J = pyro_ntk.JacobianLinearOperator(X, network=lin)
    J @ torch.randn(J.shape[-1], 2)
    J.mT @ torch.randn(J.shape[0], 2)
    J.to_dense()


def walk_ntk_operator(net):
    X = _data()
    lin = pyro_ntk.Linearization(net)
    v = torch.tensor(0.7, requires_grad=True)
    K = pyro_ntk.NTKLinearOperator(X, variance=v, network=lin)
    A = AddedDiagLinearOperator(K, DiagLinearOperator(torch.full((K.shape[0],), 0.1)))
    b = torch.randn(K.shape[0])
    (A.solve(b).sum() + A.logdet()).backward()
    K.diagonal()
    K.to_dense()
    K[2:5, 1:4].to_dense()


def walk_empirical_ntk(net):
    X, y = _data(), torch.randn(8)
    kernel = pyro_ntk.EmpiricalNTK(net, layer_variances=True)
    gpr = gp.models.GPRegression(X, y, kernel, mean_function=pyro_ntk.NetworkMean(net))
    gp.util.train(gpr, num_steps=3)
    with torch.no_grad():
        gpr(_data(3), full_cov=True)
    kernel.layer_contributions(X)
    kernel(X, diag=True)


def walk_network_mean(net):
    m = pyro_ntk.NetworkMean(net)
    m(_data())
    list(m.parameters())


def walk_ntk_kernel(net):
    X, y = _data(), torch.randn(8)

    class ExactGP(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.GaussianLikelihood()
            super().__init__(X, y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = pyro_ntk.NTKKernel(net)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    model = ExactGP()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        (-mll(model(X), y)).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert model(_data(3)).mean.shape == (3,)


def walk_linearized_network(net):
    X = _data()
    for solver in ("cholesky", "cg"):
        v = torch.tensor(0.5, requires_grad=True)
        d = pyro_ntk.LinearizedNetwork(
            net,
            X,
            variance=v,
            noise=0.1,
            options=SolverOptions(solver=solver, preconditioner="nystrom"),
        )
        f = d.rsample((2,))
        d.log_prob(f).sum().backward()
        assert d.variance.shape == f.shape[1:]
        assert d.covariance_matrix.shape == (16, 16)


def walk_ntk_gp_regression(net):
    X = _data()
    y = torch.randn(8)
    model = pyro_ntk.NTKGPRegression(X, y, net, noise=torch.tensor(0.3))
    gp.util.train(model, num_steps=3)
    with torch.no_grad():
        model(_data(3), full_cov=True)
    cg = pyro_ntk.NTKGPRegression(
        X, y, net, options=SolverOptions(solver="cg", preconditioner="fisher")
    )
    gp.util.train(cg, num_steps=2)
    with torch.no_grad():
        cg(_data(3))
    assert isinstance(cg.last_solve, pyro_ntk.SolverDiagnostics)


def walk_integrate_hyperparameters(net):
    X = _data()
    model = pyro_ntk.NTKGPRegression(X, torch.randn(8), net)
    bayes = pyro_ntk.integrate_hyperparameters(model, points=11)
    assert isinstance(bayes, pyro_ntk.HyperparameterMixture)
    Xs = _data(3)
    bayes(Xs)
    bayes.log_prob(Xs, torch.randn(3))
    bayes.cdf(Xs, torch.randn(3))


def _linearized_regression(net):
    """Data and a Pyro model with a LinearizedModel inside (Gaussian likelihood)."""
    lm = pyro_ntk.LinearizedModel(net, variance=0.5)

    def model(X, y=None):
        f = lm(X)
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal(f, 0.3), obs=y)

    return _data(), torch.randn(8), model


def walk_linearized_model(net):
    X, y, model = _linearized_regression(net)
    pyro.clear_param_store()
    guide = pyro.infer.autoguide.AutoNormal(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    for _ in range(3):
        svi.step(X, y)
    pyro.infer.Predictive(model, guide=guide, num_samples=2)(X)
    pyro.clear_param_store()


def walk_fit(net):
    X, y, model = _linearized_regression(net)
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a few steps: unconverged on purpose
        gpr = pyro_ntk.NTKGPRegression(X, y, net)
        assert isinstance(pyro_ntk.fit(gpr, max_steps=3, progress=False), pyro_ntk.FitResult)
        guide = pyro.infer.autoguide.AutoNormal(model)
        pyro_ntk.fit(model, X, y, guide=guide, max_steps=3, progress=False)
        la = pyro_ntk.LinearizedLaplace(net, "gaussian", noise=0.1)
        pyro_ntk.fit(la, X, y, max_steps=2, progress=False)
    pyro.clear_param_store()


def walk_linearized_laplace(net3):
    X, y = _data(10), torch.randint(0, 3, (10,))
    la = pyro_ntk.LinearizedLaplace(net3, "categorical", variance=1.0)
    la.fit(X, y, num_steps=3)
    la.predict(_data(3))
    la.log_marginal_likelihood()
    la.sample(2)


def walk_cross_validate_temperature(net3):
    X, y = _data(12), torch.arange(12) % 3

    def fit(Xk, yk):
        return pyro_ntk.LinearizedLaplace(net3, "categorical", variance=1.0).fit(Xk, yk)

    pyro_ntk.cross_validate_temperature(fit, X, y, (1.0, 0.1), folds=2)


def walk_fisher(net):
    X = _data()
    lin = pyro_ntk.Linearization(net)
    for method in ("exact", "finite_difference"):
        F = pyro_ntk.FisherLinearOperator(X, network=lin, noise=0.5, method=method)
        F @ torch.randn(lin.num_params, 2)
        F.diagonal()


def walk_ntk_gp_classifier(net3):
    X, y = _data(), torch.randint(0, 3, (8,))
    gpc = pyro_ntk.ntk_gp_classifier(net3, X, y)
    gp.util.train(gpc, num_steps=2)
    pyro_ntk.gp_class_probabilities(gpc, _data(3))


def walk_preconditioners(net):
    X = _data()
    lin = pyro_ntk.Linearization(net)
    K = lin.ntk_dense(X)
    A = K + 0.1 * torch.eye(K.shape[0])
    for kind in ("fisher", "nystrom", "pivoted_cholesky", "auto", None):
        pre = pyro_ntk.make_preconditioner(kind, lin, X, rank=3)
        conjugate_gradient(A, torch.randn(K.shape[0]), preconditioner=pre.solve_closure(1.0, 0.1))
    for cls in (pyro_ntk.FisherPreconditioner, pyro_ntk.NystromPreconditioner):
        pre = cls(lin, X, rank=3)
        pre.logdet(1.0, 0.1)
        pre.to_dense(1.0, 0.1)


# name in pyro_ntk.__all__ -> (walker, number of outputs of the network it needs)
WALKS = {
    "Linearization": (walk_linearization, 2),
    "JacobianLinearOperator": (walk_jacobian_operator, 2),
    "NTKLinearOperator": (walk_ntk_operator, 1),
    "EmpiricalNTK": (walk_empirical_ntk, 1),
    "NetworkMean": (walk_network_mean, 1),
    "NTKKernel": (walk_ntk_kernel, 1),
    "LinearizedNetwork": (walk_linearized_network, 2),
    "NTKGPRegression": (walk_ntk_gp_regression, 1),
    "integrate_hyperparameters": (walk_integrate_hyperparameters, 1),
    "HyperparameterMixture": (walk_integrate_hyperparameters, 1),
    "LinearizedModel": (walk_linearized_model, 1),
    "fit": (walk_fit, 1),
    "LinearizedLaplace": (walk_linearized_laplace, 3),
    "cross_validate_temperature": (walk_cross_validate_temperature, 3),
    "FisherLinearOperator": (walk_fisher, 2),
    "ntk_gp_classifier": (walk_ntk_gp_classifier, 3),
    "gp_class_probabilities": (walk_ntk_gp_classifier, 3),
    "make_preconditioner": (walk_preconditioners, 1),
    "FisherPreconditioner": (walk_preconditioners, 1),
    "NystromPreconditioner": (walk_preconditioners, 1),
}


def test_every_public_name_is_walked():
    public = set(pyro_ntk.__all__) - set(EXCLUDED)
    missing = public - set(WALKS)
    assert not missing, f"public names without a no-harm walk: {sorted(missing)}"
    assert set(WALKS) <= set(pyro_ntk.__all__), "walks for names that are not public"
    assert set(EXCLUDED) <= set(pyro_ntk.__all__)


def test_walk_registry_detects_an_unwalked_name():
    # the coverage check above can fail: a new public name without a walker is caught
    public = set(pyro_ntk.__all__) | {"SomethingNew"}
    assert public - set(EXCLUDED) - set(WALKS) == {"SomethingNew"}


# one test per distinct walker (some walkers cover several public names)
DISTINCT = {walker.__name__: (walker, d_out) for walker, d_out in WALKS.values()}


@pytest.mark.parametrize("walk", sorted(DISTINCT))
def test_no_harm(walk):
    walker, d_out = DISTINCT[walk]
    net, calls = make_network(d_out)
    before = snapshot(net)
    walker(net)
    assert_unchanged(net, before)
    assert net.training and net[3].training, "train mode must survive"
    # the user's hooks stayed registered and were not removed (they may have fired)
    after_calls = len(calls)
    net.eval()
    with torch.no_grad():
        net(_data(2))
    assert len(calls) == after_calls + 2


def test_snapshot_detects_harm():
    # assert_unchanged can fail: each kind of harm it guards is noticed
    harms = [
        lambda n: n.train(False),
        lambda n: n[0].weight.data.add_(1e-12),
        lambda n: n[1].running_mean.add_(1.0),
        lambda n: n[0].bias.requires_grad_(False),
        lambda n: n[0]._forward_hooks.clear(),
        lambda n: n[2].register_forward_hook(lambda *a: None),
        lambda n: setattr(n[4].weight, "grad", None),
        lambda n: setattr(n[0].weight, "grad", torch.zeros_like(n[0].weight)),
    ]
    for harm in harms:
        net, _ = make_network()
        before = snapshot(net)
        harm(net)
        with pytest.raises(AssertionError):
            assert_unchanged(net, before)


# ---------------------------------------------------------------------- backward hooks
def test_backward_hooks_are_refused_and_left_registered():
    net, calls = make_network()
    seen = []
    handle = net[4].register_full_backward_hook(lambda m, gi, go: seen.append("bwd"))
    net[0].register_full_backward_pre_hook(lambda m, go: seen.append("bwd-pre"))
    before = snapshot(net)
    with pytest.raises(ValueError) as info:
        pyro_ntk.NTKGPRegression(_data(), torch.randn(8), net)
    msg = str(info.value)
    assert msg.startswith("Linearization: network has backward hooks")
    assert "module '4' (Linear): 1 register_full_backward_hook" in msg
    assert "module '0' (Linear): 1 register_full_backward_pre_hook" in msg
    assert "remove" in msg and "copy.deepcopy(network)" in msg
    assert_unchanged(net, before)  # the very same hook objects, still registered
    assert net[4]._backward_hooks and net[0]._backward_pre_hooks
    # ... and they still fire on the user's own backward pass
    net.eval()
    net(_data(2).requires_grad_()).sum().backward()
    assert sorted(seen) == ["bwd", "bwd-pre"]
    handle.remove()


def test_hook_free_copy_from_the_message_linearizes_like_the_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    net[2].register_full_backward_hook(lambda m, gi, go: None)
    X = _data()
    clone = copy.deepcopy(net)
    for m in clone.modules():
        m._backward_hooks.clear()
        m._backward_pre_hooks.clear()
    assert net[2]._backward_hooks  # the user's network keeps its hook
    for impl in ("functorch", "cached", "structured"):
        K = pyro_ntk.Linearization(clone, implementation=impl).ntk_dense(X)
        torch.testing.assert_close(K, reference_ntk(net, X))


class _Doubler:
    """A forward hook that changes a layer's output (kept working: the NTK follows it)."""

    def __call__(self, module, args, out):
        return 2.0 * out


def test_forward_hooks_that_change_outputs_keep_working():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    net[0].register_forward_hook(_Doubler())
    net[2].register_forward_pre_hook(lambda m, args: (args[0] + 1.0,))
    before = snapshot(net)
    X = _data()
    want = reference_ntk(net, X)  # autograd through the hooked network
    for impl in ("functorch", "cached", "structured"):
        lin = pyro_ntk.Linearization(net, implementation=impl)
        torch.testing.assert_close(lin.ntk_dense(X), want)
        torch.testing.assert_close(lin(X), net(X).detach())
    assert_unchanged(net, before)


def test_global_forward_hooks_that_change_outputs_keep_working():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    X = _data()

    def scale_linear(module, args, out):
        return 1.5 * out if isinstance(module, nn.Linear) else None

    handle = torch.nn.modules.module.register_module_forward_hook(scale_linear)
    try:
        want = reference_ntk(net, X)
        for impl in ("functorch", "cached", "structured"):
            lin = pyro_ntk.Linearization(net, implementation=impl)
            torch.testing.assert_close(lin.ntk_dense(X), want)
            torch.testing.assert_close(lin.ntk_mvm(X, None, torch.ones(16)), want.sum(1))
    finally:
        handle.remove()
    assert not torch.nn.modules.module._global_forward_hooks
