"""Bad inputs across the public API (beyond the engine table in ``test_checks.py``).

Each row builds or calls a public entry point with one bad argument and asserts the exact
error type, that the message starts with the entry point and that it names the argument.

Decisions recorded here (and in the docstrings):

* Inputs that require grad are **accepted and detached**: inputs are data, no gradient
  reaches them on any engine (``test_inputs_requiring_grad_are_detached``).
* A network whose output has no gradient path to θ (argmax) is refused with a
  ``ValueError`` naming ``network`` at the first call that sees an input.
* Parameters on several devices (one on ``meta``) are refused at construction.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_ntk
from pyro_ntk.options import SolverOptions


class _Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x).argmax(-1, keepdim=True).to(x.dtype)


def _net(d_out: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, d_out))


def _X(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3)


def _lin(d_out: int = 1) -> pyro_ntk.Linearization:
    return pyro_ntk.Linearization(_net(d_out))


def _nan(shape) -> torch.Tensor:
    t = torch.randn(shape)
    t.view(-1)[0] = float("nan")
    return t


def _inf(shape) -> torch.Tensor:
    t = torch.randn(shape)
    t.view(-1)[-1] = float("inf")
    return t


def _two_devices() -> nn.Module:
    net = _net()
    net[2].to("meta")
    return net


def _frozen() -> nn.Module:
    net = _net()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _full_backward_hook() -> nn.Module:
    net = _net()
    net[2].register_full_backward_hook(lambda m, gi, go: None)
    return net


def _backward_pre_hook() -> nn.Module:
    net = _net()
    net[0].register_full_backward_pre_hook(lambda m, go: None)
    return net


def _legacy_backward_hook() -> nn.Module:
    net = _net()
    net.register_backward_hook(lambda m, gi, go: None)  # the deprecated, non-full kind
    return net


def _global_backward_hook():
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    try:
        return pyro_ntk.Linearization(_net())
    finally:
        handle.remove()


def _hook_added_after_construction():
    net = _net()
    lin = pyro_ntk.Linearization(net)
    net[0].register_full_backward_hook(lambda m, gi, go: None)
    return lin.ntk_mvm(_X(), None, torch.randn(8))


def _reg(**kw):
    args = {"X": _X(), "y": torch.randn(8), "network": _net()}
    args.update(kw)
    return pyro_ntk.NTKGPRegression(**args)


def _ln(**kw):
    args = {"network": _net(), "X": _X()}
    args.update(kw)
    return pyro_ntk.LinearizedNetwork(**args)


def _la(likelihood="categorical", d_out=3, **kw):
    return pyro_ntk.LinearizedLaplace(_net(d_out), likelihood, **kw)


def _fisher(**kw):
    return pyro_ntk.FisherLinearOperator(_X(), network=_lin(), **kw)


def _gpc(y, d_out=3, **kw):
    return pyro_ntk.ntk_gp_classifier(_net(d_out), _X(), y, **kw)


# (id, call, error type, entry point, argument named in the message)
TABLE = [
    # ---------------------------------------------------------------- NTKGPRegression
    ("reg_y_length", lambda: _reg(y=torch.randn(5)), ValueError, "NTKGPRegression", "y"),
    ("reg_y_nan", lambda: _reg(y=_nan(8)), ValueError, "NTKGPRegression", "y"),
    ("reg_y_inf", lambda: _reg(y=_inf(8)), ValueError, "NTKGPRegression", "y"),
    (
        "reg_y_dtype",
        lambda: _reg(y=torch.randn(8, dtype=torch.float32)),
        TypeError,
        "NTKGPRegression",
        "y",
    ),
    ("reg_y_outputs", lambda: _reg(y=torch.randn(8, 2)), ValueError, "NTKGPRegression", "y"),
    ("reg_noise_zero", lambda: _reg(noise=0.0), ValueError, "NTKGPRegression", "noise"),
    ("reg_noise_neg", lambda: _reg(noise=-1.0), ValueError, "NTKGPRegression", "noise"),
    (
        "reg_noise_vector",
        lambda: _reg(noise=torch.ones(2)),
        ValueError,
        "NTKGPRegression",
        "noise",
    ),
    ("reg_variance_zero", lambda: _reg(variance=0.0), ValueError, "NTKGPRegression", "variance"),
    (
        "reg_variance_shape",
        lambda: _reg(variance=torch.ones(5), layer_variances=True),
        ValueError,
        "NTKGPRegression",
        "variance",
    ),
    (
        "reg_network_type",
        lambda: _reg(network=lambda x: x),
        TypeError,
        "NTKGPRegression",
        "network",
    ),
    ("reg_X_features", lambda: _reg(X=torch.randn(8, 4)), ValueError, "NTKGPRegression", "X"),
    ("reg_X_nan", lambda: _reg(X=_nan((8, 3))), ValueError, "NTKGPRegression", "X"),
    ("reg_X_empty", lambda: _reg(X=torch.randn(0, 3)), ValueError, "NTKGPRegression", "X"),
    ("options_solver", lambda: SolverOptions(solver="lu"), ValueError, "SolverOptions", "solver"),
    ("reg_options_type", lambda: _reg(options="cg"), TypeError, "NTKGPRegression", "options"),
    ("reg_jitter_neg", lambda: _reg(jitter=-1.0), ValueError, "NTKGPRegression", "jitter"),
    ("reg_jitter_nan", lambda: _reg(jitter=float("nan")), ValueError, "NTKGPRegression", "jitter"),
    (
        "reg_posterior_samples",
        lambda: _reg(num_posterior_samples=0),
        ValueError,
        "NTKGPRegression",
        "num_posterior_samples",
    ),
    (
        "reg_set_data_y",
        lambda: _reg().set_data(_X(), torch.randn(3)),
        ValueError,
        "NTKGPRegression",
        "y",
    ),
    (
        "reg_predict_features",
        lambda: _reg()(torch.randn(3, 4)),
        ValueError,
        "NTKGPRegression.forward",
        "Xnew",
    ),
    # ---------------------------------------------------------------- LinearizedNetwork
    ("ln_variance_neg", lambda: _ln(variance=-1.0), ValueError, "LinearizedNetwork", "variance"),
    ("ln_noise_zero", lambda: _ln(noise=0.0), ValueError, "LinearizedNetwork", "noise"),
    (
        "ln_mean_shape",
        lambda: _ln(mean=torch.zeros(7, 1)),
        ValueError,
        "LinearizedNetwork",
        "mean",
    ),
    ("ln_mean_name", lambda: _ln(mean="prior"), ValueError, "LinearizedNetwork", "mean"),
    (
        "options_preconditioner",
        lambda: SolverOptions(preconditioner="ilu"),
        ValueError,
        "SolverOptions",
        "preconditioner",
    ),
    ("ln_options_type", lambda: _ln(options={}), TypeError, "LinearizedNetwork", "options"),
    (
        "ln_X_dtype",
        lambda: _ln(X=torch.randn(8, 3, dtype=torch.float32)),
        TypeError,
        "LinearizedNetwork",
        "X",
    ),
    ("ln_jitter_nan", lambda: _ln(jitter=float("nan")), ValueError, "LinearizedNetwork", "jitter"),
    (
        "ln_value_shape",
        lambda: _ln().log_prob(torch.randn(7, 1)),
        ValueError,
        "LinearizedNetwork.log_prob",
        "value",
    ),
    # ---------------------------------------------------------------- EmpiricalNTK
    (
        "emp_variance_zero",
        lambda: pyro_ntk.EmpiricalNTK(_net(), variance=0.0),
        ValueError,
        "EmpiricalNTK",
        "variance",
    ),
    (
        "emp_variance_shape",
        lambda: pyro_ntk.EmpiricalNTK(_net(), variance=torch.ones(3), layer_variances=True),
        ValueError,
        "EmpiricalNTK",
        "variance",
    ),
    (
        "emp_layer_variances",
        lambda: pyro_ntk.EmpiricalNTK(_net(), layer_variances="yes"),
        TypeError,
        "EmpiricalNTK",
        "layer_variances",
    ),
    (
        "emp_output_range",
        lambda: pyro_ntk.EmpiricalNTK(_net(), output=2)(_X()),
        ValueError,
        "EmpiricalNTK",
        "output",
    ),
    (
        "emp_output_negative",
        lambda: pyro_ntk.EmpiricalNTK(_net(), output=-1),
        ValueError,
        "EmpiricalNTK",
        "output",
    ),
    (
        "emp_Z_features",
        lambda: pyro_ntk.EmpiricalNTK(_net())(_X(), torch.randn(4, 2)),
        ValueError,
        "EmpiricalNTK",
        "Z",
    ),
    (
        "emp_network_type",
        lambda: pyro_ntk.EmpiricalNTK("net"),
        TypeError,
        "EmpiricalNTK",
        "network",
    ),
    (
        "emp_argmax_network",
        lambda: pyro_ntk.EmpiricalNTK(_Argmax())(_X()),
        ValueError,
        "EmpiricalNTK",
        "network",
    ),
    # ---------------------------------------------------------------- NTKKernel
    (
        "ntkk_input_shape",
        lambda: pyro_ntk.NTKKernel(_net(), input_shape=(0,)),
        ValueError,
        "NTKKernel",
        "input_shape",
    ),
    (
        "ntkk_variance_neg",
        lambda: pyro_ntk.NTKKernel(_net(), variance=-1.0),
        ValueError,
        "NTKKernel",
        "variance",
    ),
    (
        "ntkk_prior_type",
        lambda: pyro_ntk.NTKKernel(_net(), variance_prior="gamma"),
        TypeError,
        "NTKKernel",
        "variance_prior",
    ),
    (
        "ntkk_network_type",
        lambda: pyro_ntk.NTKKernel(None),
        TypeError,
        "NTKKernel",
        "network",
    ),
    (
        "ntkk_argmax_network",
        lambda: pyro_ntk.NTKKernel(_Argmax())(_X()).to_dense(),
        ValueError,
        "NTKKernel",
        "network",
    ),
    # ---------------------------------------------------------------- NetworkMean
    (
        "mean_output_range",
        lambda: pyro_ntk.NetworkMean(_net(), output=3)(_X()),
        ValueError,
        "NetworkMean",
        "output",
    ),
    ("mean_network_type", lambda: pyro_ntk.NetworkMean(3), TypeError, "NetworkMean", "network"),
    (
        "mean_X_nan",
        lambda: pyro_ntk.NetworkMean(_net())(_nan((4, 3))),
        ValueError,
        "NetworkMean",
        "X",
    ),
    # ---------------------------------------------------------------- LinearizedModel
    (
        "lm_name",
        lambda: pyro_ntk.LinearizedModel(_net(), name=""),
        ValueError,
        "LinearizedModel",
        "name",
    ),
    (
        "lm_linearization_type",
        lambda: pyro_ntk.LinearizedModel("net"),
        TypeError,
        "LinearizedModel",
        "network",
    ),
    (
        "lm_variance_zero",
        lambda: pyro_ntk.LinearizedModel(_net(), variance=0.0),
        ValueError,
        "LinearizedModel",
        "variance",
    ),
    (
        "lm_delta_length",
        lambda: pyro_ntk.LinearizedModel(_net())(_X(), torch.randn(3)),
        ValueError,
        "LinearizedModel",
        "delta",
    ),
    # ---------------------------------------------------------------- LinearizedLaplace
    ("la_likelihood", lambda: _la("student"), ValueError, "LinearizedLaplace", "likelihood"),
    ("la_gaussian_noise", lambda: _la("gaussian", 1), ValueError, "LinearizedLaplace", "noise"),
    ("la_method", lambda: _la(method="svd"), ValueError, "LinearizedLaplace", "method"),
    (
        "la_labels_range",
        lambda: _la().fit(_X(), torch.full((8,), 3)),
        ValueError,
        "LinearizedLaplace.fit",
        "y",
    ),
    (
        "la_labels_float",
        lambda: _la().fit(_X(), torch.rand(8)),
        TypeError,
        "LinearizedLaplace.fit",
        "y",
    ),
    (
        "la_probability_range",
        lambda: _la("bernoulli", 1).fit(_X(), torch.full((8,), 1.5)),
        ValueError,
        "LinearizedLaplace.fit",
        "y",
    ),
    (
        "la_negative_counts",
        lambda: _la("poisson", 1).fit(_X(), -torch.ones(8)),
        ValueError,
        "LinearizedLaplace.fit",
        "y",
    ),
    (
        "la_y_length",
        lambda: _la().fit(_X(), torch.zeros(5, dtype=torch.long)),
        ValueError,
        "LinearizedLaplace.fit",
        "y",
    ),
    (
        "la_num_steps",
        lambda: _la().fit(_X(), torch.zeros(8, dtype=torch.long), num_steps=0),
        ValueError,
        "LinearizedLaplace.fit",
        "num_steps",
    ),
    (
        "la_predict_unfitted",
        lambda: _la().predict(_X()),
        RuntimeError,
        "LinearizedLaplace.predict",
        "fit",
    ),
    # ---------------------------------------------------------------- FisherLinearOperator
    (
        "fisher_likelihood",
        lambda: _fisher(likelihood="t"),
        ValueError,
        "FisherLinearOperator",
        "likelihood",
    ),
    ("fisher_noise_zero", lambda: _fisher(noise=0.0), ValueError, "FisherLinearOperator", "noise"),
    ("fisher_method", lambda: _fisher(method="fd"), ValueError, "FisherLinearOperator", "method"),
    (
        "fisher_noise_bernoulli",
        lambda: _fisher(likelihood="bernoulli", noise=0.3),
        ValueError,
        "FisherLinearOperator",
        "noise",
    ),
    (
        "fisher_epsilon",
        lambda: _fisher(epsilon=-1.0),
        ValueError,
        "FisherLinearOperator",
        "epsilon",
    ),
    (
        "fisher_network_type",
        lambda: pyro_ntk.FisherLinearOperator(_X(), network=_X()),
        TypeError,
        "FisherLinearOperator",
        "network",
    ),
    # ---------------------------------------------------------------- preconditioners
    (
        "precond_kind",
        lambda: pyro_ntk.make_preconditioner("ichol", _lin(), _X()),
        ValueError,
        "make_preconditioner",
        "kind",
    ),
    (
        "precond_rank",
        lambda: pyro_ntk.make_preconditioner("nystrom", _lin(), _X(), rank=0),
        ValueError,
        "NystromPreconditioner",
        "rank",
    ),
    (
        "precond_X_nan",
        lambda: pyro_ntk.make_preconditioner("fisher", _lin(), _nan((8, 3))),
        ValueError,
        "FisherPreconditioner",
        "X",
    ),
    # ---------------------------------------------------------------- operators
    (
        "ntkop_variance_neg",
        lambda: pyro_ntk.NTKLinearOperator(_X(), variance=-1.0, network=_lin()),
        ValueError,
        "NTKLinearOperator",
        "variance",
    ),
    (
        "ntkop_variance_nan",
        lambda: pyro_ntk.NTKLinearOperator(
            _X(), variance=torch.tensor(float("nan")), network=_lin()
        ),
        ValueError,
        "NTKLinearOperator",
        "variance",
    ),
    (
        "ntkop_X2_features",
        lambda: pyro_ntk.NTKLinearOperator(_X(), torch.randn(4, 2), network=_lin()),
        ValueError,
        "NTKLinearOperator",
        "X2",
    ),
    (
        "jacop_network_type",
        lambda: pyro_ntk.JacobianLinearOperator(_X(), network=_X()),
        TypeError,
        "JacobianLinearOperator",
        "network",
    ),
    (
        "jacop_X_inf",
        lambda: pyro_ntk.JacobianLinearOperator(_inf((8, 3)), network=_lin()),
        ValueError,
        "JacobianLinearOperator",
        "X",
    ),
    # ---------------------------------------------------------------- classifier
    ("gpc_labels_range", lambda: _gpc(torch.full((8,), 5)), ValueError, "ntk_gp_classifier", "y"),
    ("gpc_labels_float", lambda: _gpc(torch.rand(8)), TypeError, "ntk_gp_classifier", "y"),
    (
        "gpc_num_data",
        lambda: _gpc(torch.zeros(8, dtype=torch.long), num_data=100),
        ValueError,
        "ntk_gp_classifier",
        "num_data",
    ),
    # ---------------------------------------------------------------- networks
    (
        "lin_argmax_network",
        lambda: pyro_ntk.Linearization(_Argmax()).ntk_dense(_X()),
        ValueError,
        "Linearization.ntk_dense",
        "network",
    ),
    (
        "lin_two_devices",
        lambda: pyro_ntk.Linearization(_two_devices()),
        ValueError,
        "Linearization",
        "devices",
    ),
    (
        "lin_no_trainable_parameters",
        lambda: pyro_ntk.LinearizedModel(_frozen()),
        ValueError,
        "Linearization",
        "params",
    ),
    (
        "reg_two_devices",
        lambda: _reg(network=_two_devices()),
        ValueError,
        "Linearization",
        "devices",
    ),
    # backward hooks: torch.func cannot run through them (the message names module and kind)
    (
        "lin_full_backward_hook",
        lambda: pyro_ntk.Linearization(_full_backward_hook()),
        ValueError,
        "Linearization",
        "module '2' (Linear): 1 register_full_backward_hook",
    ),
    (
        "lin_backward_pre_hook",
        lambda: pyro_ntk.Linearization(_backward_pre_hook()),
        ValueError,
        "Linearization",
        "module '0' (Linear): 1 register_full_backward_pre_hook",
    ),
    (
        "lin_legacy_backward_hook",
        lambda: pyro_ntk.Linearization(_legacy_backward_hook()),
        ValueError,
        "Linearization",
        "the network itself (Sequential): 1 register_backward_hook",
    ),
    (
        "lin_global_backward_hook",
        _global_backward_hook,
        ValueError,
        "Linearization",
        "global module backward hook",
    ),
    (
        "lin_backward_hook_added_later",
        _hook_added_after_construction,
        ValueError,
        "Linearization.ntk_mvm",
        "module '0' (Linear): 1 register_full_backward_hook",
    ),
    (
        "reg_full_backward_hook",
        lambda: _reg(network=_full_backward_hook()),
        ValueError,
        "Linearization",
        "network has backward hooks",
    ),
    (
        "kernel_full_backward_hook",
        lambda: pyro_ntk.EmpiricalNTK(_backward_pre_hook()),
        ValueError,
        "Linearization",
        "network has backward hooks",
    ),
]


def test_table_is_large_enough():
    assert len(TABLE) >= 40
    assert len({row[0] for row in TABLE}) == len(TABLE)


@pytest.mark.parametrize(
    "call, error, where, arg", [r[1:] for r in TABLE], ids=[r[0] for r in TABLE]
)
def test_bad_input(call, error, where, arg):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error, f"expected exactly {error.__name__}"
    msg = str(info.value)
    assert msg.startswith(f"{where}:"), msg
    assert arg in msg.split(":", 1)[1], msg


def test_inputs_requiring_grad_are_detached():
    net = _net()
    X = _X().requires_grad_(True)
    for impl in ("functorch", "cached", "structured"):
        lin = pyro_ntk.Linearization(net, implementation=impl)
        Xd = X.detach()
        assert torch.equal(lin.ntk_dense(X), lin.ntk_dense(Xd))
        V = torch.randn(8, requires_grad=True)
        out = lin.ntk_mvm(X, None, V)
        (gV,) = torch.autograd.grad(out.sum(), V)  # gradients still reach V ...
        assert gV.shape == V.shape
        assert (
            not lin(X).requires_grad and not lin.jvp(X, torch.randn(lin.num_params)).requires_grad
        )
    kernel = pyro_ntk.EmpiricalNTK(net)
    kernel(X).sum().backward()  # ... and σ², never X
    assert X.grad is None
    gp = pyro_ntk.NTKGPRegression(X, torch.randn(8), net)
    assert gp(X[:3].detach())[0].shape == (3,)
