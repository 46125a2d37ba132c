"""The engine against independent dense float64 references, its invariants and hygiene.

Every product of :class:`pyro_ntk.Linearization` is compared with
:mod:`pyro_ntk.testing` (per-example autograd loops on a deep copy of the network) on
every network of the test zoo, with no variance, a scalar variance and per-group
variances; relative error ≤ 1e-8 in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from networks import CASE_IDS, CASES, Case, assert_unchanged, snapshot
from torch import nn

from pyro_ntk import Linearization, NTKImplementation
from pyro_ntk.testing import reference_jacobian, reference_ntk, reference_output

RTOL = 1e-8
K_COLS = 3


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """‖actual − expected‖ ≤ rtol·‖expected‖ (Frobenius), with shapes and dtypes equal."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype == torch.float64
    err = float((actual - expected).norm())
    ref = float(expected.norm())
    assert ref > 0, "degenerate reference"
    assert err <= rtol * ref, f"relative error {err / ref:.3e} > {rtol:.0e}"


@dataclass
class Setup:
    case: Case
    net: nn.Module
    lin: Linearization
    X1: torch.Tensor
    X2: torch.Tensor
    J1: torch.Tensor  # (N1, O, P) reference
    J2: torch.Tensor
    before: dict

    @property
    def O(self) -> int:  # noqa: E743
        return self.J1.shape[1]

    @property
    def P(self) -> int:
        return self.J1.shape[2]

    def fresh(self, **kwargs) -> Linearization:
        return Linearization(
            self.net, self.case.params, implementation=self.lin.requested, **kwargs
        )


# the foundation engine, and what "auto" picks for each network (the other engines are
# checked one by one against the reference in test_engines.py)
IMPLEMENTATIONS = [NTKImplementation.FUNCTORCH.value, NTKImplementation.AUTO.value]
SETUPS = [
    pytest.param((case, impl), id=f"{name}-{impl}")
    for case, name in zip(CASES, CASE_IDS)
    for impl in IMPLEMENTATIONS
]


@pytest.fixture(scope="module", params=SETUPS)
def setup(request) -> Setup:
    case, impl = request.param
    net, X1 = case.build(n=5, seed=0)
    torch.manual_seed(1)
    X2 = case.make_inputs(4)
    net.train()  # the engine must evaluate in eval mode and restore this
    before = snapshot(net)
    J1 = reference_jacobian(net, X1, case.params)
    J2 = reference_jacobian(net, X2, case.params)
    assert_unchanged(net, before)  # the references themselves leave the network alone
    lin = Linearization(net, case.params, implementation=impl)
    yield Setup(case, net, lin, X1, X2, J1, J2, before)
    assert_unchanged(net, before)


VARIANCES = ["none", "scalar", "groups"]


def make_variance(lin: Linearization, kind: str, requires_grad: bool = False):
    """The variance argument and the (P,) scale the dense reference uses (None for none)."""
    if kind == "none":
        return None, None
    if kind == "scalar":
        var = torch.tensor(0.7)
    else:
        G = len(lin.groups)
        var = torch.linspace(0.3, 2.5, G) if G > 1 else torch.tensor([1.9])
    var.requires_grad_(requires_grad)
    return var, lin.space.expand_group_values(var)


def flat(J: torch.Tensor) -> torch.Tensor:
    return J.reshape(-1, J.shape[-1])


# ---------------------------------------------------------------------- products vs reference
def test_forward(setup):
    assert_rel(setup.lin(setup.X1), reference_output(setup.net, setup.X1))
    assert setup.lin.output_dim(setup.X1) == setup.O
    assert setup.lin.num_params == setup.P
    assert_unchanged(setup.net, setup.before)


def test_jacobian(setup):
    assert_rel(setup.lin.jacobian(setup.X1), setup.J1)
    assert_unchanged(setup.net, setup.before)


def test_jvp(setup):
    torch.manual_seed(2)
    v, Vk = torch.randn(setup.P), torch.randn(setup.P, K_COLS)
    assert_rel(setup.lin.jvp(setup.X1, v), setup.J1 @ v)
    assert_rel(setup.lin.jvp(setup.X1, Vk), setup.J1 @ Vk)
    assert_unchanged(setup.net, setup.before)


def test_vjp(setup):
    torch.manual_seed(3)
    N, O = setup.J1.shape[:2]
    u, Uk = torch.randn(N, O), torch.randn(N, O, K_COLS)
    assert_rel(setup.lin.vjp(setup.X1, u), torch.einsum("nop,no->p", setup.J1, u))
    assert_rel(setup.lin.vjp(setup.X1, Uk), torch.einsum("nop,nok->pk", setup.J1, Uk))
    assert_unchanged(setup.net, setup.before)


@pytest.mark.parametrize("kind", VARIANCES)
def test_ntk_mvm(setup, kind):
    lin = setup.lin
    var, scale = make_variance(lin, kind)
    K12 = reference_ntk(setup.net, setup.X1, setup.X2, setup.case.params, scale)
    K11 = reference_ntk(setup.net, setup.X1, None, setup.case.params, scale)
    torch.manual_seed(4)
    n1, n2 = K12.shape
    for cols in [(), (1,), (K_COLS,)]:
        V2, V1 = torch.randn(n2, *cols), torch.randn(n1, *cols)
        assert_rel(lin.ntk_mvm(setup.X1, setup.X2, V2, variance=var), K12 @ V2)
        assert_rel(lin.ntk_mvm(setup.X1, None, V1, variance=var), K11 @ V1)
    assert_unchanged(setup.net, setup.before)


@pytest.mark.parametrize("kind", VARIANCES)
def test_ntk_diag(setup, kind):
    var, scale = make_variance(setup.lin, kind)
    K = reference_ntk(setup.net, setup.X1, None, setup.case.params, scale)
    assert_rel(setup.lin.ntk_diag(setup.X1, variance=var), K.diagonal())
    assert_unchanged(setup.net, setup.before)


@pytest.mark.parametrize("kind", VARIANCES)
def test_ntk_dense(setup, kind):
    var, scale = make_variance(setup.lin, kind)
    p = setup.case.params
    assert_rel(
        setup.lin.ntk_dense(setup.X1, variance=var),
        reference_ntk(setup.net, setup.X1, None, p, scale),
    )
    assert_rel(
        setup.lin.ntk_dense(setup.X1, setup.X2, variance=var),
        reference_ntk(setup.net, setup.X1, setup.X2, p, scale),
    )
    assert_unchanged(setup.net, setup.before)


def test_scale_reference_is_per_group(setup):
    """The (P,) scale the references use puts σ_g² on exactly the parameters of layer g."""
    lin = setup.lin
    var = torch.arange(1.0, len(lin.groups) + 1.0)
    scale = lin.space.expand_group_values(var)
    start = 0
    for name, p in lin.theta.items():
        group = name.rsplit(".", 1)[0] if "." in name else ""
        expected = float(lin.groups.index(group) + 1)
        assert torch.all(scale[start : start + p.numel()] == expected), name
        start += p.numel()
    assert start == lin.num_params == scale.shape[0]


# ---------------------------------------------------------------------- invariants
def test_adjointness(setup):
    torch.manual_seed(5)
    lin = setup.lin
    N, O = setup.J1.shape[:2]
    v, u = torch.randn(setup.P), torch.randn(N, O)
    lhs = torch.dot(lin.jvp(setup.X1, v).reshape(-1), u.reshape(-1))
    rhs = torch.dot(v, lin.vjp(setup.X1, u))
    assert abs(float(lhs - rhs)) <= RTOL * max(abs(float(lhs)), 1e-300)


@pytest.mark.parametrize("kind", ["none", "groups"])
def test_kernel_symmetric_psd(setup, kind):
    var, _ = make_variance(setup.lin, kind)
    K = setup.lin.ntk_dense(setup.X1, variance=var)
    assert torch.equal(K, K.T) or float((K - K.T).norm()) <= RTOL * float(K.norm())
    eig = torch.linalg.eigvalsh((K + K.T) / 2)
    assert float(eig.min()) >= -1e-10 * float(eig.max())
    K12 = setup.lin.ntk_dense(setup.X1, setup.X2, variance=var)
    K21 = setup.lin.ntk_dense(setup.X2, setup.X1, variance=var)
    assert_rel(K12, K21.T)


def test_chunked_equals_unchunked(setup):
    """chunk_size = 1, 2, 3 (uneven last chunk) against one chunk, for every product."""
    sizes = (1, 2, 3) if setup.lin.implementation is NTKImplementation.FUNCTORCH else (2,)
    for chunk_size in sizes:
        check_chunked(setup, chunk_size)


def check_chunked(setup, chunk_size):
    torch.manual_seed(6)
    whole, chunked = setup.lin, setup.fresh(chunk_size=chunk_size)
    X1, X2 = setup.X1, setup.X2
    N1, N2, O, P = X1.shape[0], X2.shape[0], setup.O, setup.P
    var, _ = make_variance(whole, "groups")
    v, U = torch.randn(P, K_COLS), torch.randn(N1, O, K_COLS)
    V12, V11 = torch.randn(N2 * O, K_COLS), torch.randn(N1 * O, K_COLS)
    pairs = [
        (lambda lin: lin(X1)),
        (lambda lin: lin.jacobian(X1)),
        (lambda lin: lin.jvp(X1, v)),
        (lambda lin: lin.vjp(X1, U)),
        (lambda lin: lin.ntk_mvm(X1, X2, V12, variance=var)),
        (lambda lin: lin.ntk_mvm(X1, None, V11)),
        (lambda lin: lin.ntk_diag(X1, variance=var)),
        (lambda lin: lin.ntk_dense(X1)),
        (lambda lin: lin.ntk_dense(X1, X2, variance=var)),
    ]
    for call in pairs:
        assert_rel(call(chunked), call(whole))
    K, c = chunked.ntk_dense(X1), chunk_size * O
    assert torch.equal(K[:c, c:], K[c:, :c].T)  # blocks below the diagonal: transposes
    assert_unchanged(setup.net, setup.before)


def test_single_column_equals_vector(setup):
    torch.manual_seed(7)
    lin, X1, X2 = setup.lin, setup.X1, setup.X2
    N1, O, P = X1.shape[0], setup.O, setup.P
    v, u, V = torch.randn(P), torch.randn(N1, O), torch.randn(X2.shape[0] * O)
    assert_rel(lin.jvp(X1, v[:, None]).squeeze(-1), lin.jvp(X1, v))
    assert lin.jvp(X1, v[:, None]).shape == (N1, O, 1)
    assert_rel(lin.vjp(X1, u[..., None]).squeeze(-1), lin.vjp(X1, u))
    assert lin.vjp(X1, u[..., None]).shape == (P, 1)
    assert_rel(lin.ntk_mvm(X1, X2, V[:, None]).squeeze(-1), lin.ntk_mvm(X1, X2, V))
    assert lin.ntk_mvm(X1, X2, V[:, None]).shape == (N1 * O, 1)


# ---------------------------------------------------------------------- differentiability
@pytest.mark.parametrize("kind", ["scalar", "groups"])
def test_ntk_mvm_gradients(setup, kind):
    """∂/∂σ² and ∂/∂V of a scalar function of K V match autograd through the dense reference."""
    torch.manual_seed(8)
    lin, p = setup.lin, setup.case.params
    var, _ = make_variance(lin, kind, requires_grad=True)
    n2 = setup.X2.shape[0] * setup.O
    V = torch.randn(n2, 2, requires_grad=True)
    W = torch.randn(setup.X1.shape[0] * setup.O, 2)

    out = (lin.ntk_mvm(setup.X1, setup.X2, V, variance=var) * W).sum() + lin.ntk_diag(
        setup.X1, variance=var
    ).square().sum()
    g_var, g_V = torch.autograd.grad(out, (var, V))

    var_ref = var.detach().clone().requires_grad_(True)
    V_ref = V.detach().clone().requires_grad_(True)
    scale = lin.space.expand_group_values(var_ref)
    K12 = reference_ntk(setup.net, setup.X1, setup.X2, p, scale)
    K11 = reference_ntk(setup.net, setup.X1, None, p, scale)
    ref = (K12 @ V_ref * W).sum() + K11.diagonal().square().sum()
    r_var, r_V = torch.autograd.grad(ref, (var_ref, V_ref))
    assert_rel(g_var, r_var)
    assert_rel(g_V, r_V)


def test_jvp_vjp_differentiable_in_the_vector(setup):
    """∂⟨J v, w⟩/∂v = Jᵀ w and ∂⟨Jᵀ u, z⟩/∂u = J z, through the engine's products."""
    torch.manual_seed(10)
    N, O = setup.J1.shape[:2]
    v = torch.randn(setup.P, 2, requires_grad=True)
    u = torch.randn(N, O, requires_grad=True)
    w, z = torch.randn(N, O, 2), torch.randn(setup.P)
    (g_v,) = torch.autograd.grad((setup.lin.jvp(setup.X1, v) * w).sum(), v)
    (g_u,) = torch.autograd.grad((setup.lin.vjp(setup.X1, u) * z).sum(), u)
    assert_rel(g_v, torch.einsum("nop,nok->pk", setup.J1, w))
    assert_rel(g_u, setup.J1 @ z)


def test_ntk_dense_gradient(setup):
    var, _ = make_variance(setup.lin, "groups", requires_grad=True)
    (g,) = torch.autograd.grad(setup.lin.ntk_dense(setup.X1, variance=var).sum(), var)
    var_ref = var.detach().clone().requires_grad_(True)
    K = reference_ntk(
        setup.net, setup.X1, None, setup.case.params, setup.lin.space.expand_group_values(var_ref)
    )
    (r,) = torch.autograd.grad(K.sum(), var_ref)
    assert_rel(g, r)


# ---------------------------------------------------------------------- network hygiene
def test_theta_is_a_copy(setup):
    net = setup.case.build(n=1, seed=0)[0]
    lin = Linearization(net, setup.case.params, implementation=setup.lin.requested)
    X = setup.X1
    f0, J0 = lin(X), lin.jacobian(X)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        for b in net.buffers():
            if b.is_floating_point():
                b.mul_(2.0)
    assert not torch.allclose(reference_output(net, X), f0)
    assert torch.equal(lin(X), f0)
    assert torch.equal(lin.jacobian(X), J0)
    for p in lin.theta.values():  # θ* shares no storage with the network
        assert all(p.data_ptr() != q.data_ptr() for q in net.parameters())


def test_inplace_change_of_inputs_is_seen(setup):
    """Products follow the current values of X, also after X was changed in place."""
    torch.manual_seed(9)
    lin = setup.fresh(chunk_size=2)
    X = setup.X1.clone()
    n, O, P = X.shape[0], setup.O, setup.P
    v, u, V = torch.randn(P, 2), torch.randn(n, O, 2), torch.randn(n * O, 2)
    calls = [
        lambda lin, X: lin(X),
        lambda lin, X: lin.jvp(X, v),
        lambda lin, X: lin.vjp(X, u),
        lambda lin, X: lin.ntk_mvm(X, None, V),
        lambda lin, X: lin.ntk_diag(X),
    ]
    for call in calls:
        call(lin, X)
    with torch.no_grad():
        X.mul_(0.5).add_(0.25)
    check = Linearization(setup.net, setup.case.params, implementation="functorch")
    for call in calls:
        assert_rel(call(lin, X), call(check, X.clone()))


def test_flags_restored_after_error(setup):
    """A call that fails inside the engine still restores every module's training flag."""
    bad = torch.randn(2, 7, 7, 7)
    with pytest.raises(ValueError, match="X"):
        setup.lin(bad)
    assert_unchanged(setup.net, setup.before)


class _Seq(nn.Module):
    """Embedding → mean over tokens → Linear, on integer token ids (N, L)."""

    def __init__(self, vocab: int = 11, dim: int = 4, out: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)).mean(dim=1))


class _Scalar(nn.Module):
    """An MLP whose output per example is a scalar: shape (N,)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


class _Matrix(nn.Module):
    """Output (N, 2, 3) per batch: O = 6, flattened row-major."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).reshape(-1, 2, 3)


def _dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2))


EXTRA = {
    "sequence": (_Seq, lambda n: torch.randint(0, 11, (n, 7)), 2),
    "scalar_output": (_Scalar, lambda n: torch.randn(n, 3), 1),
    "matrix_output": (_Matrix, lambda n: torch.randn(n, 3), 6),
    "dropout": (_dropout, lambda n: torch.randn(n, 3), 2),
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(EXTRA))
def test_extra_networks(name, impl):
    """Sequences of token ids, scalar and matrix outputs, Dropout: every product vs reference."""
    make, inputs, O = EXTRA[name]
    net = make().train()
    X1, X2 = inputs(4), inputs(3)
    before = snapshot(net)
    lin = Linearization(net, implementation=impl)
    assert lin.output_dim(X1) == O
    J1, J2 = reference_jacobian(net, X1), reference_jacobian(net, X2)
    P = J1.shape[-1]
    assert J1.shape == (4, O, P) and lin.num_params == P
    v, u, V = torch.randn(P, 2), torch.randn(4, O, 2), torch.randn(3 * O, 2)
    f = lin(X1)
    assert f.shape == (4, O)
    assert_rel(f, reference_output(net, X1))
    assert torch.equal(lin(X1), f)  # deterministic (Dropout off)
    assert_rel(lin.jacobian(X1), J1)
    assert_rel(lin.jvp(X1, v), J1 @ v)
    assert_rel(lin.vjp(X1, u), torch.einsum("nop,nok->pk", J1, u))
    assert_rel(lin.ntk_mvm(X1, X2, V), flat(J1) @ flat(J2).T @ V)
    assert_rel(lin.ntk_diag(X1), (flat(J1) ** 2).sum(-1))
    assert_rel(lin.ntk_dense(X1, X2), flat(J1) @ flat(J2).T)
    assert_unchanged(net, before)
    assert all(m.training for m in net.modules())


def test_batchnorm_uses_running_statistics():
    """In eval mode each example's output is independent of the rest of the batch."""
    case = CASES[CASE_IDS.index("batchnorm")]
    net, X = case.build(n=5)
    net.train()
    lin = Linearization(net)
    bn = net[1]
    h = net[0](X)
    manual = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = net[3](torch.tanh(manual)).detach()
    assert_rel(lin(X), expected)
    assert_rel(lin(X[2:3]), expected[2:3])
    assert_rel(lin.jacobian(X[2:3]), lin.jacobian(X)[2:3])
    assert net.training and bn.training


def test_mixed_training_flags_restored_module_by_module():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, 1)).train()
    net[1].eval()
    net[3].eval()
    before = snapshot(net)
    lin = Linearization(net, chunk_size=2)
    X = torch.randn(5, 3)
    lin(X), lin.ntk_mvm(X, None, torch.randn(5)), lin.ntk_dense(X), lin.ntk_diag(X)
    assert_unchanged(net, before)
    assert [m.training for m in net.modules()] == [True, True, False, True, False]


def test_frozen_parameters_excluded_by_default():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    X = torch.randn(3, 3)
    lin = Linearization(net)
    assert list(lin.theta) == ["0.bias", "2.weight", "2.bias"]
    assert lin.num_params == 4 + 8 + 2
    assert_rel(lin.jacobian(X), reference_jacobian(net, X))
    assert not net[0].weight.requires_grad


def test_predicate_last_layer_matches_columns_of_full_jacobian():
    """Subnetwork linearization: J restricted to a layer equals those columns of the full J."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X = torch.randn(3, 3)
    full = Linearization(net).jacobian(X)
    last = Linearization(net, lambda name, p: name.startswith("2.")).jacobian(X)
    assert torch.allclose(last, full[..., -(8 + 2) :], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- validated-input memo
def _small_lin(**kwargs) -> tuple[nn.Module, Linearization]:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).train()
    return net, Linearization(net, **kwargs)


ENTRY_POINTS = {
    "call": lambda lin, X: lin(X),
    "jvp": lambda lin, X: lin.jvp(X, torch.ones(lin.num_params)),
    "vjp": lambda lin, X: lin.vjp(X, torch.ones(X.shape[0], 2)),
    "ntk_mvm": lambda lin, X: lin.ntk_mvm(X, X, torch.ones(2 * X.shape[0])),
    "ntk_mvm_X2": lambda lin, X: lin.ntk_mvm(torch.zeros(2, 3), X, torch.ones(2 * X.shape[0])),
    "ntk_diag": lambda lin, X: lin.ntk_diag(X),
    "ntk_dense": lambda lin, X: lin.ntk_dense(X),
    "jacobian": lambda lin, X: lin.jacobian(X),
    "output_dim": lambda lin, X: lin.output_dim(X),
}


@pytest.mark.parametrize("impl", ["functorch", "cached", "structured"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_inplace_nonfinite_after_validation_is_rejected(entry, impl, bad):
    """An X validated once and then made non-finite in place is validated again and rejected."""
    _, lin = _small_lin(implementation=impl)
    call = ENTRY_POINTS[entry]
    X = torch.randn(4, 3)
    call(lin, X)
    call(lin, X)  # served by the memo
    X[2, 1] = bad  # in place: bumps X's version counter
    with pytest.raises(ValueError, match="NaN or infinite"):
        call(lin, X)
    X[2, 1] = 0.5  # finite again: accepted, and products follow the new values
    check = Linearization(lin.network, implementation="functorch")
    assert_rel(
        lin.ntk_mvm(X, None, torch.arange(8.0)), check.ntk_mvm(X.clone(), None, torch.arange(8.0))
    )


def test_inplace_nonfinite_through_a_view_or_the_base_is_rejected():
    """Views share the version counter of their base: a write through either re-validates."""
    _, lin = _small_lin(implementation="structured")
    base = torch.randn(6, 3)
    X = base[1:5]
    V = torch.randn(8)
    lin.ntk_mvm(X, None, V)
    base[3, 0] = float("nan")  # row 2 of X, written through the base
    with pytest.raises(ValueError, match="X1 contains 1 NaN"):
        lin.ntk_mvm(X, None, V)
    base[3, 0] = 0.0
    lin.ntk_mvm(X, None, V)
    X.T[2, 0] = float("inf")  # through another view of X
    with pytest.raises(ValueError, match="X1 contains 1 NaN or infinite"):
        lin.ntk_mvm(X, None, V)


def test_memo_holds_validated_inputs_weakly_and_boundedly():
    _, lin = _small_lin(implementation="structured")
    X = torch.randn(4, 3)
    lin(X)
    assert X in lin._gate.validated
    X.add_(1.0)
    assert X not in lin._gate.validated  # stale after an in-place change
    lin(X)
    assert X in lin._gate.validated
    same_values = X.clone()  # another tensor: validated on its own
    assert same_values not in lin._gate.validated
    others = [torch.randn(2, 3) for _ in range(3 * lin._gate.validated.capacity)]  # kept alive
    for other in others:
        lin(other)
    assert len(lin._gate.validated._entries) <= lin._gate.validated.capacity
    assert X not in lin._gate.validated  # evicted, so validated again next time
    with pytest.raises(ValueError, match="NaN"):
        lin(torch.full((2, 3), float("nan")))


def test_memo_does_not_skip_type_or_shape_checks_for_other_tensors():
    _, lin = _small_lin()
    X = torch.randn(4, 3)
    lin(X)
    with pytest.raises(TypeError, match="dtype"):
        lin(X.float())
    with pytest.raises(ValueError, match="feature shape"):
        lin(torch.randn(4, 7))
    with pytest.raises(TypeError, match="torch.Tensor"):
        lin(X.tolist())


def test_inference_tensors_are_validated_every_call():
    """Inference tensors have no version counter: never memoized, always validated."""
    _, lin = _small_lin(implementation="functorch")
    with torch.inference_mode():
        X = torch.randn(4, 3)
        lin(X)
        assert X not in lin._gate.validated
        X[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            lin(X)


def test_memo_is_dropped_on_copy_and_pickle(tmp_path):
    import copy

    _, lin = _small_lin(implementation="structured")
    X = torch.randn(4, 3)
    lin.ntk_mvm(X, None, torch.randn(8))
    twin = copy.deepcopy(lin)
    assert len(twin._gate.validated._entries) == 0
    path = tmp_path / "lin.pt"
    torch.save(lin, path)
    loaded = torch.load(path, weights_only=False)
    assert len(loaded._gate.validated._entries) == 0
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loaded(X)


def test_network_already_in_eval_mode_stays_in_eval_mode():
    """No toggling is needed when every module is in eval mode; flags are left as they are."""
    net = _dropout().eval()
    before = snapshot(net)
    lin = Linearization(net)
    X = torch.randn(4, 3)
    J = reference_jacobian(net, X)
    assert_rel(lin.jacobian(X), J)
    assert_rel(lin.ntk_mvm(X, None, torch.arange(8.0)), flat(J) @ flat(J).T @ torch.arange(8.0))
    assert torch.equal(lin(X), lin(X))  # Dropout off
    assert_unchanged(net, before)
    assert not any(m.training for m in net.modules())
