"""EmpiricalNTK, the pyro.contrib.gp kernel: values against dense references, Pyro's kernel
contract, the four GP models, training by gp.util.train and SVI, priors, bad input."""

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import pytest
import torch
from networks import CASES, assert_unchanged, snapshot
from pyro.infer import SVI, Trace_ELBO
from pyro.nn.module import PyroSample
from torch import nn

from pyro_ntk import EmpiricalNTK, NetworkMean
from pyro_ntk.testing import reference_jacobian, reference_ntk, reference_output

TOL = dict(rtol=1e-10, atol=1e-12)


def mlp(d_in=2, width=16, d_out=1, act=nn.Tanh):
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, d_out))


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def reference_averaged(net, X, Z=None, params=None, scale=None):
    """(1/O) Σ_o J_o diag(scale) J_oᵀ from the per-output blocks of the dense reference."""
    R = reference_ntk(net, X, Z, params=params, scale=scale)
    O = reference_output(net, X[:1]).shape[1]
    N, M = X.shape[0], (X if Z is None else Z).shape[0]
    return R.reshape(N, O, M, O).diagonal(dim1=1, dim2=3).mean(-1)


def layer_scale(net, params, values):
    """Per-parameter σ² from per-layer values, grouping names by their owning module."""
    named = [
        (n, p)
        for n, p in net.named_parameters()
        if (
            p.requires_grad
            if params is None
            else (params(n, p) if callable(params) else n in params)
        )
    ]
    layers = []
    for n, _ in named:
        layer = n.rsplit(".", 1)[0]
        if layer not in layers:
            layers.append(layer)
    return layers, torch.cat(
        [values[layers.index(n.rsplit(".", 1)[0])].expand(p.numel()) for n, p in named]
    )


# ---------------------------------------------------------------------------- contract
# relu_mlp and layernorm only exercise the engine, which tests/test_linearization.py covers.
CONTRACT = [c for c in CASES if c.name not in ("relu_mlp", "layernorm")]


@pytest.mark.parametrize("case", CONTRACT, ids=[c.name for c in CONTRACT])
def test_kernel_contract_and_values(case):
    net, X = case.build(n=5)
    Z = case.make_inputs(3)
    before = snapshot(net)
    kernel = EmpiricalNTK(net, variance=0.7, params=case.params)

    K, KXZ, KZX, KXX, d = kernel(X), kernel(X, Z), kernel(Z, X), kernel(X, X), kernel(X, diag=True)
    torch.testing.assert_close(K, 0.7 * reference_averaged(net, X, params=case.params), **TOL)
    torch.testing.assert_close(KXZ, 0.7 * reference_averaged(net, X, Z, case.params), **TOL)
    # Pyro's contract (tests/contrib/gp/test_kernels.py)
    torch.testing.assert_close(K.diag(), d, **TOL)
    torch.testing.assert_close(KXZ, KZX.T, **TOL)
    torch.testing.assert_close(K, KXX, **TOL)
    assert K.shape == (5, 5) and KXZ.shape == (5, 3) and d.shape == (5,)
    assert K.is_contiguous() and KXZ.is_contiguous()
    assert_unchanged(net, before)


def test_each_call_returns_a_fresh_tensor():
    net = mlp()
    X = torch.randn(6, 2)
    kernel = EmpiricalNTK(net)
    K = kernel(X)
    K.view(-1)[::7] += 100.0  # what GPRegression does to the Gram matrix
    torch.testing.assert_close(kernel(X), reference_ntk(net, X), **TOL)
    d = kernel(X, diag=True)
    d += 5.0
    torch.testing.assert_close(kernel(X, diag=True), reference_ntk(net, X).diag(), **TOL)


def test_chunking_changes_nothing():
    net = mlp(d_out=3)
    X, Z = torch.randn(7, 2), torch.randn(4, 2)
    whole, chunked = EmpiricalNTK(net), EmpiricalNTK(net, chunk_size=2)
    for args in [(X,), (X, Z)]:
        torch.testing.assert_close(chunked(*args), whole(*args), **TOL)
    torch.testing.assert_close(chunked(X, diag=True), whole(X, diag=True), **TOL)
    torch.testing.assert_close(chunked(X), reference_averaged(net, X), **TOL)


def test_combines_with_pyro_kernels():
    net = mlp()
    X, Z = torch.randn(5, 2), torch.randn(3, 2)
    rbf = gp.kernels.RBF(input_dim=2)
    kernel = gp.kernels.Sum(EmpiricalNTK(net, variance=0.5), rbf)
    torch.testing.assert_close(kernel(X, Z), 0.5 * reference_ntk(net, X, Z) + rbf(X, Z), **TOL)


# ---------------------------------------------------------------------------- layer variances
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("tanh_mlp", "cnn", "last_layer")], ids=lambda c: c.name
)
def test_layer_variances_match_the_dense_sum_over_layers(case):
    net, X = case.build(n=5)
    Z = case.make_inputs(3)
    kernel = EmpiricalNTK(net, layer_variances=True, params=case.params)
    G = len(kernel.groups)
    values = torch.linspace(0.3, 2.0, G)
    kernel.variance = values
    layers, scale = layer_scale(net, case.params, values)
    assert kernel.groups == layers
    assert kernel.variance.shape == (G,)
    torch.testing.assert_close(
        kernel(X), reference_averaged(net, X, params=case.params, scale=scale), **TOL
    )
    torch.testing.assert_close(
        kernel(X, Z), reference_averaged(net, X, Z, params=case.params, scale=scale), **TOL
    )
    torch.testing.assert_close(kernel(X, diag=True), kernel(X).diag(), **TOL)
    assert kernel.variances_by_layer() == pytest.approx(dict(zip(layers, values.tolist())))


def test_layer_contributions_are_trace_shares():
    net = mlp(d_in=3, width=8)
    X = torch.randn(6, 3)
    values = torch.tensor([0.5, 3.0])
    kernel = EmpiricalNTK(net, layer_variances=True, variance=values)
    J = reference_jacobian(net, X)  # (N, 1, P); layer "0" owns the first 3·8 + 8 entries
    first = J[..., :32].square().sum() * values[0]
    second = J[..., 32:].square().sum() * values[1]
    shares = kernel.layer_contributions(X)
    assert list(shares) == ["0", "2"]
    assert shares["0"] == pytest.approx(float(first / (first + second)), rel=1e-10)
    assert sum(shares.values()) == pytest.approx(1.0, rel=1e-12)


def test_initial_layer_variance_broadcasts_from_a_scalar():
    kernel = EmpiricalNTK(mlp(), layer_variances=True, variance=0.25)
    torch.testing.assert_close(kernel.variance, torch.full((2,), 0.25))


def test_variance_given_says_whether_the_user_passed_a_variance():
    net = mlp()
    default, given = EmpiricalNTK(net), EmpiricalNTK(net, variance=1.0)
    assert default.variance_given is False and given.variance_given is True
    torch.testing.assert_close(default.variance, given.variance)  # both start at 1
    shared = EmpiricalNTK(default.linearization, layer_variances=True, variance=[0.5, 2.0])
    assert shared.variance_given and shared.linearization is default.linearization


# ---------------------------------------------------------------------------- outputs, inputs
@pytest.mark.parametrize("k", [0, 2])
def test_output_k_is_that_outputs_kernel(k):
    net = mlp(d_out=3)
    X, Z = torch.randn(5, 2), torch.randn(4, 2)
    before = snapshot(net)
    kernel = EmpiricalNTK(net, output=k, variance=1.3)
    R = reference_ntk(net, X, Z)
    torch.testing.assert_close(kernel(X, Z), 1.3 * R[k::3, k::3], **TOL)
    torch.testing.assert_close(
        kernel(X, diag=True), 1.3 * reference_ntk(net, X).diag()[k::3], **TOL
    )
    assert kernel.linearization.output_dim(X) == 1  # only output k is linearized
    assert list(kernel.parameters()) == [kernel.variance_unconstrained]
    assert_unchanged(net, before)


def test_output_k_with_a_parameter_selection_and_layer_variances():
    net = mlp(d_out=2)
    X = torch.randn(4, 2)
    params = ["2.weight", "2.bias"]
    kernel = EmpiricalNTK(net, output=1, params=params, layer_variances=True, variance=[0.5])
    assert kernel.groups == ["2"]
    torch.testing.assert_close(
        kernel(X), 0.5 * reference_ntk(net, X, params=params)[1::2, 1::2], **TOL
    )
    pyro.clear_param_store()  # both top-level kernels would share the name "variance"
    predicate = EmpiricalNTK(net, output=1, params=lambda n, p: n.startswith("2."))
    torch.testing.assert_close(
        predicate(X), reference_ntk(net, X, params=params)[1::2, 1::2], **TOL
    )


def test_active_dims_and_one_dimensional_inputs():
    net = mlp(d_in=2)
    X = torch.randn(5, 4)
    kernel = EmpiricalNTK(net, active_dims=[1, 3])
    assert kernel.input_dim == 2
    torch.testing.assert_close(kernel(X), reference_ntk(net, X[:, [1, 3]]), **TOL)
    net1 = mlp(d_in=1)
    x = torch.randn(5)
    torch.testing.assert_close(EmpiricalNTK(net1)(x), reference_ntk(net1, x.unsqueeze(1)), **TOL)
    # input_dim alone: Pyro's semantics, the first input_dim columns
    torch.testing.assert_close(
        EmpiricalNTK(net, input_dim=2)(X), reference_ntk(net, X[:, :2]), **TOL
    )


def test_input_dim_is_inferred_without_slicing():
    assert EmpiricalNTK(mlp(d_in=3)).input_dim == 3
    cnn = next(c for c in CASES if c.name == "cnn")
    net, X = cnn.build(n=4)
    kernel = EmpiricalNTK(net, output=1)
    assert kernel.input_dim is None and kernel.active_dims is None
    torch.testing.assert_close(kernel(X), reference_ntk(net, X)[1::2, 1::2], **TOL)


def test_inputs_are_constants_and_the_variance_gets_the_gradient():
    net = mlp(d_in=2, width=5)
    kernel = EmpiricalNTK(net, layer_variances=True, variance=[0.5, 2.0])
    X = torch.randn(3, 2, requires_grad=True)
    Z = torch.randn(2, 2)
    K = kernel(X, Z)
    (grad,) = torch.autograd.grad(K.sum(), kernel.variance_unconstrained)
    # σ_g² = exp(u_g), so ∂ΣK/∂u_g = σ_g² Σ K_g with K_g layer g's block of the reference
    expected = []
    for g, value in enumerate([0.5, 2.0]):
        _, indicator = layer_scale(net, None, torch.eye(2)[g])
        expected.append(value * reference_ntk(net, X.detach(), Z, scale=indicator).sum())
    torch.testing.assert_close(grad, torch.stack(expected), **TOL)
    # the NTK is a function of θ* only: inputs (e.g. inducing points) get no gradient
    assert X.grad is None
    kernel(X).sum().backward()
    assert X.grad is None


# ---------------------------------------------------------------------------- GP models
def textbook_posterior(net, X, y, Xs, variance, noise, jitter):
    K = variance * reference_ntk(net, X)
    Ks = variance * reference_ntk(net, Xs, X)
    Kss = variance * reference_ntk(net, Xs)
    A = K + (noise + jitter) * torch.eye(X.shape[0])
    resid = y - reference_output(net, X)[:, 0]
    mean = reference_output(net, Xs)[:, 0] + Ks @ torch.linalg.solve(A, resid)
    cov = Kss - Ks @ torch.linalg.solve(A, Ks.T)
    return mean, cov


def test_gpregression_posterior_equals_the_textbook_formula():
    net = mlp()
    X, Xs = torch.randn(12, 2), torch.randn(6, 2)
    y = torch.sin(X.sum(-1))
    noise, variance = torch.tensor(0.05), 0.8
    gpr = gp.models.GPRegression(
        X, y, EmpiricalNTK(net, variance=variance), noise=noise, mean_function=NetworkMean(net)
    )
    mean, cov = gpr(Xs, full_cov=True)
    ref_mean, ref_cov = textbook_posterior(net, X, y, Xs, variance, noise, gpr.jitter)
    assert rel_err(mean, ref_mean) <= 1e-6
    assert rel_err(cov, ref_cov) <= 1e-6
    mean_d, var_d = gpr(Xs, full_cov=False, noiseless=False)
    assert rel_err(var_d, ref_cov.diag() + noise) <= 1e-6
    assert rel_err(mean_d, ref_mean) <= 1e-6


def test_gp_util_train_fits_only_gp_hyperparameters():
    net = mlp()
    before = snapshot(net)
    X = torch.randn(20, 2)
    y = reference_output(net, X)[:, 0] + 0.3 * torch.sin(3 * X[:, 0])
    kernel = EmpiricalNTK(net, layer_variances=True)
    gpr = gp.models.GPRegression(X, y, kernel, mean_function=NetworkMean(net))
    names = sorted(n for n, _ in gpr.named_parameters())
    assert names == ["kernel.variance_unconstrained", "noise_unconstrained"]
    assert not any(isinstance(m, nn.Linear) for m in gpr.modules())
    losses = gp.util.train(gpr, num_steps=25)
    assert losses[-1] < losses[0]
    assert not torch.allclose(kernel.variance.detach(), torch.ones(2))
    assert_unchanged(net, before)
    # θ* is untouched, so the fitted kernel is still σ_g²-scaled blocks of the reference
    _, scale = layer_scale(net, None, kernel.variance.detach())
    torch.testing.assert_close(kernel(X).detach(), reference_ntk(net, X, scale=scale), **TOL)


def textbook_dtc(net, X, y, Xu, Xs, noise, jitter):
    """Titsias / Quiñonero-Candela DTC predictive, dense from the reference kernel."""
    Kuu = reference_ntk(net, Xu) + jitter * torch.eye(Xu.shape[0])
    Kuf, Ksu, Kss = reference_ntk(net, Xu, X), reference_ntk(net, Xs, Xu), reference_ntk(net, Xs)
    Sigma_inv = Kuu + Kuf @ Kuf.T / noise
    resid = y - reference_output(net, X)[:, 0]
    mean = (
        reference_output(net, Xs)[:, 0] + Ksu @ torch.linalg.solve(Sigma_inv, Kuf @ resid) / noise
    )
    cov = Kss - Ksu @ torch.linalg.solve(Kuu, Ksu.T) + Ksu @ torch.linalg.solve(Sigma_inv, Ksu.T)
    return mean, cov


def test_sparse_gpregression_predicts_the_textbook_dtc_posterior_and_trains():
    net = mlp()
    X, Xs = torch.randn(16, 2), torch.randn(5, 2)
    y = torch.cos(X[:, 0])
    Xu = X[:5].clone()
    noise = torch.tensor(0.1)
    sgpr = gp.models.SparseGPRegression(
        X, y, EmpiricalNTK(net), Xu, noise=noise, mean_function=NetworkMean(net), approx="VFE"
    )
    mean, cov = sgpr(Xs, full_cov=True)
    ref_mean, ref_cov = textbook_dtc(net, X, y, Xu, Xs, noise, sgpr.jitter)
    assert rel_err(mean, ref_mean) <= 1e-6
    assert rel_err(cov, ref_cov) <= 1e-6
    # The kernel treats its inputs as constants, so gp.util.train leaves Xu in place.
    before = snapshot(net)
    for approx in ("DTC", "FITC", "VFE"):
        pyro.clear_param_store()  # the models would share the names "Xu", "noise", ...
        model = gp.models.SparseGPRegression(
            X, y, EmpiricalNTK(net), Xu.clone(), mean_function=NetworkMean(net), approx=approx
        )
        losses = gp.util.train(model, num_steps=5)
        assert losses[-1] < losses[0]
        torch.testing.assert_close(model.Xu.detach(), Xu, rtol=0, atol=0)
    assert_unchanged(net, before)


def test_variational_gp_predicts_the_textbook_conditional_and_trains():
    net = mlp()
    X, Xs = torch.randn(10, 2), torch.randn(4, 2)
    y = torch.sin(X[:, 1])
    vgp = gp.models.VariationalGP(
        X, y, EmpiricalNTK(net), gp.likelihoods.Gaussian(), mean_function=NetworkMean(net)
    )
    # q(f - m(X)) = N(μ, S S^T) with a generic μ and S
    mu, S = torch.randn(10), torch.tril(0.1 * torch.randn(10, 10), -1) + 0.5 * torch.eye(10)
    vgp.f_loc = nn.Parameter(mu)
    vgp.f_scale_tril = S
    mean, cov = vgp(Xs, full_cov=True)
    A = reference_ntk(net, X) + vgp.jitter * torch.eye(10)
    Ks, Kss = reference_ntk(net, Xs, X), reference_ntk(net, Xs)
    W = torch.linalg.solve(A, Ks.T)  # (Kff + jitter)⁻¹ Kf*
    ref_mean = reference_output(net, Xs)[:, 0] + W.T @ mu
    ref_cov = Kss - Ks @ W + W.T @ S @ S.T @ W
    assert rel_err(mean, ref_mean) <= 1e-6
    assert rel_err(cov, ref_cov) <= 1e-6
    losses = gp.util.train(vgp, num_steps=10)
    assert losses[-1] < losses[0]


def test_variational_sparse_gp_with_multiclass_latents():
    net = mlp(d_out=3)
    X = torch.randn(12, 2)
    y = reference_output(net, X).argmax(-1).to(torch.get_default_dtype())
    before = snapshot(net)
    vsgp = gp.models.VariationalSparseGP(
        X,
        y,
        EmpiricalNTK(net),
        X[:4].clone(),
        gp.likelihoods.MultiClass(num_classes=3),
        mean_function=NetworkMean(net),
        latent_shape=torch.Size([3]),
        jitter=1e-4,
    )
    losses = gp.util.train(vsgp, num_steps=10)
    assert torch.isfinite(torch.tensor(losses)).all()
    mean, var = vsgp(torch.randn(5, 2))
    assert mean.shape == (3, 5) and var.shape == (3, 5)
    assert bool((var > 0).all())
    assert_unchanged(net, before)


def test_image_inputs_in_gpregression():
    cnn = next(c for c in CASES if c.name == "cnn")
    net, X = cnn.build(n=8)
    y = torch.randn(8)
    gpr = gp.models.GPRegression(
        X, y, EmpiricalNTK(net, output=0), mean_function=NetworkMean(net, output=0)
    )
    losses = gp.util.train(gpr, num_steps=5)
    assert losses[-1] < losses[0]
    mean, var = gpr(cnn.make_inputs(3))
    assert mean.shape == (3,) and var.shape == (3,)


# ---------------------------------------------------------------------------- priors and SVI
def test_pyro_sample_prior_on_the_variance_in_svi():
    net = mlp()
    X = torch.randn(15, 2)
    y = reference_output(net, X)[:, 0] + 0.2 * torch.randn(15)
    kernel = EmpiricalNTK(net)
    kernel.variance = PyroSample(dist.LogNormal(0.0, 1.0))
    gpr = gp.models.GPRegression(X, y, kernel, mean_function=NetworkMean(net))
    svi = SVI(gpr.model, gpr.guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step() for _ in range(20)]
    assert losses[-1] < losses[0]
    assert "kernel.variance_map_unconstrained" in dict(gpr.named_parameters())
    gpr.set_mode("guide")
    v = kernel.variance
    torch.testing.assert_close(kernel(X).detach(), v.detach() * reference_ntk(net, X), **TOL)


def test_pyro_sample_prior_on_layer_variances_with_gp_util_train():
    net = mlp()
    X = torch.randn(10, 2)
    y = torch.randn(10)
    kernel = EmpiricalNTK(net, layer_variances=True)
    kernel.variance = PyroSample(dist.LogNormal(torch.zeros(2), torch.ones(2)).to_event(1))
    gpr = gp.models.GPRegression(X, y, kernel, mean_function=NetworkMean(net))
    losses = gp.util.train(gpr, num_steps=10)
    assert losses[-1] < losses[0]
    assert gpr.kernel.variance_map.shape == (2,)
    fitted = gpr.kernel.variance_map.detach()
    assert kernel.variances_by_layer() == pytest.approx(dict(zip(kernel.groups, fitted.tolist())))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_variance_is_rejected(bad):
    with pytest.raises(ValueError, match=r"EmpiricalNTK: variance must be positive"):
        EmpiricalNTK(mlp(), variance=bad)
    with pytest.raises(ValueError, match=r"EmpiricalNTK: variance must be positive"):
        EmpiricalNTK(mlp(), layer_variances=True, variance=[1.0, bad])


def test_wrong_variance_shape_and_types():
    with pytest.raises(
        ValueError, match=r"variance has shape \(3,\); expected \(2,\), one per layer"
    ):
        EmpiricalNTK(mlp(), layer_variances=True, variance=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"variance has shape \(2,\); expected a scalar"):
        EmpiricalNTK(mlp(), variance=[1.0, 2.0])
    with pytest.raises(TypeError, match="EmpiricalNTK: variance must be"):
        EmpiricalNTK(mlp(), variance="big")
    with pytest.raises(TypeError, match="EmpiricalNTK: layer_variances must be a bool"):
        EmpiricalNTK(mlp(), layer_variances="yes")
    with pytest.raises(TypeError, match="EmpiricalNTK: network must be a torch.nn.Module"):
        EmpiricalNTK(lambda x: x)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0"])
def test_invalid_output_argument(bad):
    with pytest.raises(ValueError, match="EmpiricalNTK: output must be None or a non-negative int"):
        EmpiricalNTK(mlp(d_out=2), output=bad)


def test_output_index_out_of_range():
    kernel = EmpiricalNTK(mlp(d_out=2), output=2)
    with pytest.raises(ValueError, match=r"output=2 is out of range; the network has 2 output"):
        kernel(torch.randn(3, 2))


def test_bad_inputs_name_the_argument():
    kernel = EmpiricalNTK(mlp(d_in=2))
    X = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"EmpiricalNTK: X has shape \(4, 5\)"):
        kernel(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"EmpiricalNTK: Z has shape \(3, 3\)"):
        kernel(X, torch.randn(3, 3))
    Xnan = X.clone()
    Xnan[1, 0] = float("nan")
    with pytest.raises(ValueError, match="EmpiricalNTK: X contains 1 NaN or infinite"):
        kernel(Xnan)
    with pytest.raises(ValueError, match="EmpiricalNTK: Z contains 1 NaN or infinite"):
        kernel(X, Xnan)
    with pytest.raises(TypeError, match="EmpiricalNTK: X must be a torch.Tensor"):
        kernel([[0.0, 1.0]])
    with pytest.raises(TypeError, match="EmpiricalNTK: X has dtype torch.float32"):
        kernel(X.float())
    with pytest.raises(ValueError, match=r"EmpiricalNTK: params names \['nope'\]"):
        EmpiricalNTK(mlp(d_out=2), output=0, params=["nope"])
