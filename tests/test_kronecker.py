"""Kronecker (EKFAC / KFC) candidate directions of the Fisher preconditioner, against dense float64 K."""

import pytest
import torch
from networks import assert_unchanged, snapshot
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.preconditioners import FisherPreconditioner
from pyro_ntk.preconditioners import kronecker as kron
from pyro_ntk.preconditioners.kronecker import kronecker_columns, top_eigenpairs
from pyro_ntk.solvers import conjugate_gradient
from pyro_ntk.testing import reference_ntk


def _mlp(out=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, out))


def _structured(net, **kw):
    lin = Linearization(net, implementation="structured", **kw)
    assert lin.implementation == "structured"
    return lin


def _psd_remainder(K, C):
    return float(torch.linalg.eigvalsh(K - C @ C.T).min()) / float(K.diagonal().max())


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_every_kronecker_direction_together_reproduce_k(chunk_size):
    # the eigenbases of the two Gram matrices of each layer are complete, so the columns
    # of all d_out × (d_in + 1) directions per layer sum to K = J S Jᵀ exactly
    net = _mlp()
    before = snapshot(net)
    X = torch.randn(20, 3)
    lin = _structured(net, chunk_size=chunk_size)
    variance = torch.tensor([0.5, 2.0, 1.3])
    scale = lin.space.expand_group_values(variance)
    K = reference_ntk(net, X, scale=scale)
    P = lin.num_params  # 6·4 + 5·7 + 2·6 = 71
    kc = kronecker_columns(lin, X, scale.sqrt(), pool=10 * P)
    assert kc.columns.shape == (40, P) and bool(kc.covered.all())
    torch.testing.assert_close(kc.columns @ kc.columns.T, K)
    assert kc.products == pytest.approx(0.5 * (1 + 2)) and kc.positions == 1
    # a smaller pool keeps the directions with the largest Rayleigh quotients ‖J q‖²
    norms = kc.columns.square().sum(0).sort(descending=True).values
    part = kronecker_columns(lin, X, scale.sqrt(), pool=12)
    torch.testing.assert_close(
        part.columns.square().sum(0).sort(descending=True).values, norms[:12]
    )
    assert _psd_remainder(K, part.columns) > -1e-10
    assert_unchanged(net, before)


def test_only_linearized_weights_or_biases_are_covered():
    net = _mlp(out=1)
    X = torch.randn(15, 3)
    params = ["0.bias", "2.weight", "4.weight", "4.bias"]
    lin = _structured(net, params=params)
    K = reference_ntk(net, X, params=params)
    kc = kronecker_columns(lin, X, None, pool=1000)
    torch.testing.assert_close(kc.columns @ kc.columns.T, K)
    assert bool(kc.covered.all())


def test_generic_parameters_are_left_to_the_range_finder():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1))
    before = snapshot(net)
    X = torch.randn(40, 3)
    lin = _structured(net)
    K = reference_ntk(net, X)
    kc = kronecker_columns(lin, X, None, pool=1000)
    names = dict(zip(lin.space.names, torch.split(kc.covered, lin.space.numels)))
    assert not bool(names["1.weight"].any()) and not bool(names["1.bias"].any())
    assert bool(names["0.weight"].all()) and bool(names["3.bias"].all())
    # rank 40 = n: the Kronecker columns and the range finder on the LayerNorm's 12
    # parameters together span K's range, so the preconditioner is the operator itself
    pre = FisherPreconditioner(lin, X, rank=40, subsample=None).build()
    torch.testing.assert_close(pre.to_dense(0.7, 0.05), 0.7 * K + 0.05 * torch.eye(40))
    torch.testing.assert_close(pre.logdet(0.7, 0.05), torch.logdet(pre.to_dense(0.7, 0.05)))
    # without the range finder the LayerNorm's directions are missing
    only = kronecker_columns(lin, X, None, pool=1000).columns
    assert float(torch.linalg.eigvalsh(K - only @ only.T).max()) > 1e-3
    assert_unchanged(net, before)


def test_engines_without_factors_give_no_columns():
    net = _mlp()
    X = torch.randn(10, 3)
    assert kronecker_columns(Linearization(net, implementation="functorch"), X, None, 5) is None
    # a convolution whose per-example gradients the engine keeps instead of factors
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 1))
    lin = _structured(conv)
    kc = kronecker_columns(lin, torch.randn(6, 1, 6, 6), None, pool=1000)
    names = dict(zip(lin.space.names, torch.split(kc.covered, lin.space.numels)))
    assert not bool(names["0.weight"].any()) and bool(names["2.weight"].all())


def test_top_eigenpairs_is_the_rayleigh_ritz_of_c_ct():
    torch.manual_seed(0)
    C = torch.randn(30, 12) * torch.logspace(0, -6, 12)  # badly scaled columns
    U, d = top_eigenpairs(C, 5)
    ev, V = torch.linalg.eigh(C @ C.T)
    torch.testing.assert_close(d, ev.flip(0)[:5], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(U.T @ U, torch.eye(5))
    torch.testing.assert_close((U * d) @ U.T, (V[:, -5:] * ev[-5:]) @ V[:, -5:].T)
    assert top_eigenpairs(C, 50)[0].shape == (30, 12)
    # more columns than rows: the top of C Cᵀ directly
    W = torch.randn(10, 40) * torch.logspace(0, -3, 40)
    U, d = top_eigenpairs(W, 4)
    ev, V = torch.linalg.eigh(W @ W.T)
    torch.testing.assert_close(d, ev.flip(0)[:4], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(U.T @ U, torch.eye(4))
    torch.testing.assert_close((U * d) @ U.T, (V[:, -4:] * ev[-4:]) @ V[:, -4:].T)


def test_default_fisher_preconditioner_uses_kronecker_directions():
    net = _mlp(out=2)
    X = torch.randn(30, 3)
    lin = _structured(net)
    K = reference_ntk(net, X)
    pre = FisherPreconditioner(lin, X, rank=8).build()
    assert pre.kronecker and pre.products == pytest.approx(1.5)  # no Jacobian products
    eig, _ = pre.eigenform()
    LLt = (eig.U * eig.d) @ eig.U.T
    assert _psd_remainder(K, eig.U * eig.d.sqrt()) > -1e-10
    torch.testing.assert_close(pre.logdet(2.0, 0.1), torch.logdet(2.0 * LLt + 0.1 * torch.eye(60)))
    sketch = FisherPreconditioner(lin, X, rank=8, kronecker=False).build()
    assert not sketch.kronecker and sketch.products > 10
    with pytest.raises(ValueError, match="FisherPreconditioner: pool must be a positive int"):
        FisherPreconditioner(lin, X, pool=0)
    with pytest.raises(ValueError, match=r"FisherPreconditioner: kronecker must be one of .* 'no'"):
        FisherPreconditioner(lin, X, kronecker="no")


@pytest.mark.gpu
def test_kronecker_preconditioner_on_cuda_matches_cpu():
    net = _mlp(out=2)
    X = torch.randn(300, 3)
    b = torch.randn(600, 2)
    out = {}
    for device in ["cpu", "cuda"]:
        lin = _structured(net.to(device))
        Xd = X.to(device)
        pre = FisherPreconditioner(lin, Xd, rank=20).build()
        K = lin.ntk_dense(Xd)
        x, diag = conjugate_gradient(
            K + 1e-2 * torch.eye(600, device=device),
            b.to(device),
            preconditioner=pre.solve_closure(1.0, 1e-2),
            tol=1e-8,
        )
        eig, _ = pre.eigenform()
        assert x.device.type == device and eig.U.device.type == device
        out[device] = (x.cpu(), eig.d.cpu(), diag.iterations)
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-8, atol=1e-10)
    assert abs(out["cuda"][2] - out["cpu"][2]) <= 2


# ---------------------------------------------------------------- convolutions (KFC)


def _cnn(groups=1, seed=0):
    # Conv2d (stride 2, padding 1) → Conv1d over the flattened positions → Linear head, O = 3;
    # sized so that the engine keeps the factors A, B of both convolutions (O·P_W > S·(d_in + O·d_out))
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=groups),
        nn.Tanh(),
        nn.Flatten(2),
        nn.Conv1d(8, 6, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 9, 3),
    )


def _dense_jacobian(net, X):
    """``(N·O, P)`` by torch.func.jacrev, parameters in ``named_parameters()`` order."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    J = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (X,)))(params)
    return torch.cat([J[k].reshape(X.shape[0] * 3, -1) for k in params], 1)


def _kinds(lin, X):
    return [(f.name, f.kind, f.A[0].shape[1]) for f in lin.layer_factors(X)]


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("pool", [5, 160, 10_000])
def test_conv_columns_are_the_jacobian_of_orthonormal_kronecker_directions(chunk_size, pool):
    # pool 5: scores r (spatially uncorrelated) then exact re-ranking of 20 candidates;
    # 160: every layer scored exactly (≤ 4·pool pairs each); 10 000: all directions
    net = _cnn()
    before = snapshot(net)
    X = torch.randn(20, 4, 6, 6)
    lin = _structured(net, chunk_size=chunk_size)
    assert _kinds(lin, X) == [("0", "conv2d", 9), ("3", "conv1d", 9), ("6", "linear", 1)]
    variance = torch.tensor([0.5, 2.0, 1.3])
    scale = lin.space.expand_group_values(variance)
    Jd = _dense_jacobian(net, X)
    K = (Jd * scale) @ Jd.T
    torch.testing.assert_close(K, reference_ntk(net, X, scale=scale))
    kc = kronecker_columns(lin, X, scale.sqrt(), pool=pool)
    P = lin.num_params  # 8·37 + 6·25 + 3·55 = 611
    assert kc.columns.shape == (60, min(pool, P)) and bool(kc.covered.all())
    Q = kc.directions()
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1]), rtol=0, atol=1e-12)
    err = (Jd @ (scale.sqrt().unsqueeze(-1) * Q) - kc.columns).abs().max()
    assert float(err) <= 1e-8 * float(kc.columns.abs().max())
    assert _psd_remainder(K, kc.columns) > -1e-8
    if pool >= P:  # the complete eigenbases reproduce K
        torch.testing.assert_close(kc.columns @ kc.columns.T, K)
    assert kc.products == pytest.approx(0.5 * (1 + 3)) and kc.positions == 9
    assert_unchanged(net, before)


def test_conv_selection_keeps_the_largest_rayleigh_quotients():
    net = _cnn(seed=1)
    X = torch.randn(25, 4, 6, 6)
    lin = _structured(net)
    norms = kronecker_columns(lin, X, None, pool=10_000).columns.square().sum(0)
    best = norms.sort(descending=True).values
    # 4·160 covers each layer's pairs: exact scores everywhere, the exact top 160
    part = kronecker_columns(lin, X, None, pool=160).columns.square().sum(0)
    torch.testing.assert_close(part.sort(descending=True).values, best[:160])
    # a small pool re-ranks candidates by their exact quotients: every kept column is
    # among the directions, sorted by exact norm, and close to the exact top in total
    small = kronecker_columns(lin, X, None, pool=8).columns.square().sum(0)
    assert all(bool(torch.isclose(norms, v).any()) for v in small)
    assert float(small.sum()) >= 0.9 * float(best[:8].sum())
    assert float(small.sum()) <= float(best[:8].sum()) * (1 + 1e-12)


def test_spatially_uncorrelated_score_is_exact_at_one_position(monkeypatch):
    # with every pair beyond the candidate budget, the Linear layers still get exact scores
    net = _mlp()
    X = torch.randn(20, 3)
    lin = _structured(net)
    monkeypatch.setattr(kron, "CANDIDATES", 1)
    norms = kronecker_columns(lin, X, None, pool=1000).columns.square().sum(0)
    part = kronecker_columns(lin, X, None, pool=7).columns.square().sum(0)
    torch.testing.assert_close(
        part.sort(descending=True).values, norms.sort(descending=True).values[:7]
    )


def test_grouped_convolutions_are_not_covered():
    net = _cnn(groups=2)
    X = torch.randn(12, 4, 6, 6)
    lin = _structured(net)
    assert [k for _, k, _ in _kinds(lin, X)] == ["conv1d", "linear"]
    kc = kronecker_columns(lin, X, None, pool=10_000)
    names = dict(zip(lin.space.names, torch.split(kc.covered, lin.space.numels)))
    assert not bool(names["0.weight"].any()) and not bool(names["0.bias"].any())
    assert all(bool(names[n].all()) for n in ["3.weight", "3.bias", "6.weight", "6.bias"])
    Jd = _dense_jacobian(net, X)
    Q = kc.directions()
    assert not bool(Q[~kc.covered].any())
    torch.testing.assert_close(Jd @ Q, kc.columns, rtol=0, atol=1e-10)
    assert _psd_remainder(Jd @ Jd.T, kc.columns) > -1e-8


def _linear_only(lin, monkeypatch):
    """The Kronecker directions of Linear layers at one position only (convolutions left out)."""
    factors = lin.layer_factors

    def linear(X):
        return [f for f in factors(X) if f.kind == "linear" and f.A[0].shape[1] == 1]

    monkeypatch.setattr(lin, "layer_factors", linear)


def test_default_fisher_preconditioner_covers_a_cnn(monkeypatch):
    torch.manual_seed(3)
    net = _cnn(seed=2)
    X = torch.randn(60, 4, 6, 6)
    b = torch.randn(180, 1)
    lin = _structured(net)
    K = lin.ntk_dense(X)
    s2 = 1e-2 * float(K.diagonal().mean())
    A = K + s2 * torch.eye(180)
    pre = FisherPreconditioner(lin, X, rank=50).build()
    # every parameter covered by Kronecker directions, refined by one subspace step (k
    # K·v-equivalents) instead of a range finder
    assert pre.kronecker and pre.products == pytest.approx(0.5 * (1 + 3) + 50)
    eig, _ = pre.eigenform()
    assert _psd_remainder(K, eig.U * eig.d.sqrt()) > -1e-8
    _, new = conjugate_gradient(
        A, b, preconditioner=pre.solve_closure(1.0, s2), tol=1e-8, check_every=1
    )
    _linear_only(lin, monkeypatch)
    old = FisherPreconditioner(lin, X, rank=50).build()
    assert old.products > 10  # the convolutions went through the range finder
    _, before = conjugate_gradient(
        A, b, preconditioner=old.solve_closure(1.0, s2), tol=1e-8, check_every=1
    )
    _, plain = conjugate_gradient(A, b, tol=1e-8, check_every=1)
    assert new.converged and before.converged
    assert new.iterations <= before.iterations < plain.iterations
