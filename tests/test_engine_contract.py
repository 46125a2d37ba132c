"""The public engine contract of :class:`pyro_ntk.Linearization` against dense references.

``perturbed_gradient`` (the finite-difference Fisher's building block), ``layer_factors``
(per-layer K-FAC factors), ``to`` (another dtype or device), the variance normalizer of
:class:`pyro_ntk.parameters.ParameterSpace`, and the absence of host syncs in K·v.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from pyro_ntk import Linearization


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


@pytest.mark.parametrize("implementation", ["functorch", "cached", "structured"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_perturbed_gradient_matches_dense_reference(implementation, chunk_size):
    net = _net()
    lin = Linearization(net, chunk_size=chunk_size, implementation=implementation)
    X = torch.randn(5, 3, dtype=torch.float64)
    target = torch.randn(5, 2, dtype=torch.float64)
    steps = 0.1 * torch.randn(lin.num_params, 3, dtype=torch.float64)
    seen = []

    def loss(f: torch.Tensor, rows: slice) -> torch.Tensor:
        seen.append(rows)
        return 0.5 * ((f - target[rows]) ** 2).sum() + f.sin().sum()

    got = lin.perturbed_gradient(X, steps, loss)
    assert got.shape == (lin.num_params, 3) and got.dtype == torch.float64
    assert all(isinstance(r, slice) for r in seen)

    names = lin.space.names
    theta = {n: p.detach() for n, p in net.named_parameters()}

    def total(params: dict[str, torch.Tensor]) -> torch.Tensor:
        f = functional_call(net, params, (X,))
        return 0.5 * ((f - target) ** 2).sum() + f.sin().sum()

    for j in range(steps.shape[1]):
        moved = lin.space.unflatten(steps[:, j])
        g = grad(total)({n: theta[n] + moved[n] for n in names})
        want = torch.cat([g[n].reshape(-1) for n in names])
        torch.testing.assert_close(got[:, j], want, rtol=1e-12, atol=1e-12)


def test_perturbed_gradient_zero_step_is_the_gradient_at_theta_star_in_eval_mode():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double()
    net.train()
    lin = Linearization(net)
    X = torch.randn(6, 3, dtype=torch.float64)
    steps = torch.zeros(lin.num_params, 2, dtype=torch.float64)
    got = lin.perturbed_gradient(X, steps, lambda f, rows: f.sum())
    torch.testing.assert_close(got[:, 0], lin.vjp(X, torch.ones(6, 1, dtype=torch.float64)))
    torch.testing.assert_close(got[:, 0], got[:, 1])
    assert net.training, "the network's train flag is restored"


def test_perturbed_gradient_rejects_bad_arguments():
    lin = Linearization(_net())
    X = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"perturbed_gradient: steps has shape \(5,\)"):
        lin.perturbed_gradient(X, torch.zeros(5, 1, dtype=torch.float64)[:, 0], lambda f, r: f)
    with pytest.raises(ValueError, match="perturbed_gradient: steps has shape"):
        lin.perturbed_gradient(X, torch.zeros(lin.num_params, dtype=torch.float64), sum)
    with pytest.raises(TypeError, match="perturbed_gradient: loss must be a callable"):
        lin.perturbed_gradient(X, torch.zeros(lin.num_params, 1, dtype=torch.float64), 3)


# ---------------------------------------------------------------------------- layer factors
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_layer_factors_rebuild_the_jacobian(chunk_size):
    net = _net()
    lin = Linearization(net, chunk_size=chunk_size, implementation="structured")
    X = torch.randn(7, 3, dtype=torch.float64)
    factors = lin.layer_factors(X)
    assert [f.name for f in factors] == ["0", "2"] and {f.kind for f in factors} == {"linear"}
    J = lin.jacobian(X)  # (N, O, P)
    for f in factors:
        A, B = torch.cat(f.A), torch.cat(f.B)  # (N, S, d_in), (N, O, S, d_out)
        assert len(f.A) == (1 if chunk_size is None else 3)
        dW = torch.einsum("nosj,nsi->noji", B, A).reshape(7, 2, -1)
        torch.testing.assert_close(dW, J[:, :, f.weight])
        torch.testing.assert_close(B.sum(2), J[:, :, f.bias])


def test_layer_factors_are_none_without_structure():
    lin = Linearization(_net(), implementation="cached")
    assert lin.layer_factors(torch.randn(4, 3, dtype=torch.float64)) is None


# ---------------------------------------------------------------------------- conversion
def test_to_converts_a_copy_and_round_trips():
    net = _net()
    lin = Linearization(net, chunk_size=2)
    X = torch.randn(4, 3, dtype=torch.float64)
    lin32 = lin.to(torch.float32)
    assert lin32.dtype == torch.float32 and lin32.chunk_size == 2
    assert lin32 is lin.to(dtype=torch.float32) and lin32.to(torch.float64) is lin
    assert lin.to() is lin and lin.to(device="cpu") is lin
    torch.testing.assert_close(lin32.jacobian(X.float()), lin.jacobian(X).float())
    assert next(net.parameters()).dtype == torch.float64
    with pytest.raises(TypeError, match=r"Linearization\.to: dtype must be a floating-point"):
        lin.to(torch.int64)


# ---------------------------------------------------------------------------- variance
def test_normalize_variance_one_check_for_every_entry():
    lin = Linearization(_net())
    space = lin.space
    v, per_group = space.normalize_variance("f", None)
    assert v.shape == () and not per_group
    v, per_group = space.normalize_variance("f", torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert per_group and v.shape == (2,)
    v, per_group = space.normalize_variance("f", 3.0, layer_variances=True)
    assert per_group and v.tolist() == [3.0, 3.0]
    v, per_group = space.normalize_variance(
        "f", torch.ones(5, 2, dtype=torch.float64), batched=True
    )
    assert per_group and v.shape == (5, 2)
    v, per_group = space.normalize_variance("f", [1.0, 2.0], layer_variances=True, convert=True)
    assert v.dtype == torch.float64 and per_group
    with pytest.raises(ValueError, match=r"f: variance has shape \(3,\); expected a scalar or"):
        space.normalize_variance("f", torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"f: noise must be non-negative .*-1"):
        space.normalize_variance("f", -1.0, name="noise")
    with pytest.raises(ValueError, match=r"f: variance must be positive and finite"):
        space.normalize_variance("f", 0.0, positive=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        space.normalize_variance("f", float("nan"))
    with pytest.raises(TypeError, match="f: variance has dtype torch.float32"):
        space.normalize_variance("f", torch.ones(2, dtype=torch.float32))
    with pytest.raises(TypeError, match="f: variance must be None, a number or a tensor"):
        space.normalize_variance("f", "1")
    with pytest.raises(ValueError, match=r"expected a scalar \(layer_variances=False\)"):
        space.normalize_variance("f", torch.ones(2, dtype=torch.float64), layer_variances=False)


# ---------------------------------------------------------------------------- no host sync
class _NoSync:
    """Make every host synchronization of a tensor (bool, item, float, int, tolist) raise."""

    names = ("__bool__", "item", "__float__", "__int__", "tolist", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}

        def refuse(name):
            def method(self, *args, **kwargs):
                raise AssertionError(f"host synchronization Tensor.{name} on the hot path")

            return method

        for n in self.names:
            setattr(torch.Tensor, n, refuse(n))
        return self

    def __exit__(self, *exc):
        for n, m in self.saved.items():
            setattr(torch.Tensor, n, m)
        return False


@pytest.mark.parametrize("implementation", ["functorch", "cached", "structured"])
@pytest.mark.parametrize("variance", [None, 2.0, "per_group"])
def test_no_host_sync_inside_ntk_products(implementation, variance):
    from pyro_ntk import JacobianLinearOperator, NTKLinearOperator

    lin = Linearization(_net(), chunk_size=3, implementation=implementation)
    X = torch.randn(7, 3, dtype=torch.float64)
    if variance == "per_group":
        variance = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    K = NTKLinearOperator(X, variance=variance, network=lin)
    J = JacobianLinearOperator(X, network=lin)
    V = torch.randn(14, 2, dtype=torch.float64)
    want = K.to_dense() @ V
    for _ in range(2):  # the first product builds the engine's per-chunk cache
        with _NoSync():
            got = K @ V
            JV = J @ torch.ones(lin.num_params, 1, dtype=torch.float64)
            JTu = J.mT @ V
        torch.testing.assert_close(got, want)
    assert JV.shape == (14, 1) and JTu.shape == (lin.num_params, 2)
