"""Every product of every engine, exactly, on every network of the zoo (``tests/zoo.py``).

The contract under test: for *any* network whose examples are independent and whose
forward is deterministic in eval mode, every engine (``functorch``, ``cached``,
``structured``, ``auto``), with or without chunking, computes the same Jacobian and NTK
products as the dense float64 references of :mod:`pyro_ntk.testing` (per-example autograd
loops that share no code with the engines), to a norm-relative 1e-8; and a network outside
the contract is refused with a ``ValueError`` that says why.

* Products, on every (case, engine, chunking): three successive ``ntk_mvm(X, X, V)`` with
  fresh right-hand sides for ``k = 1`` and for ``k = 3`` (the first products computed, so
  cached state that makes a later call drift from the first shows), ``jvp`` and ``vjp``
  twice each, ``f(X)``, ``ntk_dense(X)``, ``ntk_diag(X)``, ``jacobian(X)``, and
  ``ntk_dense`` between two input sets of different sizes, in both orders. ``N`` or the
  chunk size equals one of the case's inner dimensions (sequence length, latent count,
  channels, outputs), so a layer that mistakes one of them for the example index is caught.
  Each combination runs once, on one fresh ``Linearization``, in that order
  (:func:`run_products`); the tests read its results, one test per kind of product.
* State: after all products the network is bitwise unchanged, and so are the inputs.
* Models, on the ``auto`` engine with chunking: the :class:`~pyro_ntk.EmpiricalNTK` Gram
  matrices and diagonal, the :class:`~pyro_ntk.NTKGPRegression` posterior mean and
  variance on the Cholesky and the CG paths (the CG variances against the same pathwise
  draws replayed densely), and the :class:`~pyro_ntk.LinearizedModel` outputs
  ``f(X) + J(X) δ``. The regression models and the linearized model are built on the
  ``Linearization`` the product checks used (as a user sharing one would), which also keeps
  the file fast: every new input chunk costs the engines a closure build.
* Refusals: a forward that is random in eval mode is refused naming the module
  responsible; a network whose examples interact is refused as "not independent".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from networks import assert_unchanged, snapshot
from torch import Tensor, nn
from zoo import ZOO, ZooCase

from pyro_ntk import EmpiricalNTK, Linearization, LinearizedModel, NTKGPRegression
from pyro_ntk.options import SolverOptions
from pyro_ntk.testing import reference_jacobian, reference_output

ENGINES = ("functorch", "cached", "structured", "auto")
TOL = 1e-8
"""Norm-relative tolerance of every comparison with the float64 references."""

MAX_PARAMS = 1000
"""Upper bound on a zoo case's parameter count (keeps the dense references cheap)."""

BY_NAME = {case.name: case for case in ZOO}


# ---------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """Batch sizes of the two input sets ``X`` (``n``) and ``X2`` (``n2``) and a chunk size."""

    label: str
    n: int
    n2: int
    chunk: int | None


def configs(case: ZooCase) -> list[Config]:
    """Unchunked with ``N`` = the first inner dimension ``d``; chunks of ``d`` with ``N = d + 2``.

    Cases without inner dimensions use ``N = 5``, unchunked and in chunks of 2. The second
    input set has 2 rows (3 where ``N = 2``): a different size, within one chunk.
    """
    if not case.inner:
        return [Config("whole", 5, 2, None), Config("chunk2", 5, 2, 2)]
    d = case.inner[0]
    return [Config("whole", d, 2 if d != 2 else 3, None), Config(f"chunk{d}", d + 2, 2, d)]


def model_config(case: ZooCase) -> Config:
    """The chunked configuration, the one the model-level checks use."""
    return configs(case)[1]


PRODUCT_PARAMS = [
    pytest.param(case, engine, cfg, id=f"{case.name}-{engine}-{cfg.label}")
    for case in ZOO
    for engine in ENGINES
    for cfg in configs(case)
]
CASE_PARAMS = [pytest.param(case, id=case.name) for case in ZOO]


# ---------------------------------------------------------------------- data and references
def network(case: ZooCase) -> nn.Module:
    """A fresh copy of the case's network (seed 0: the same weights every time)."""
    torch.manual_seed(0)
    return case.make_network()


def inputs(case: ZooCase, n: int, seed: int) -> Tensor:
    """``n`` inputs of the case, from their own seed (independent of the network's)."""
    torch.manual_seed(1000 + seed)
    return case.make_inputs(n)


@dataclass(frozen=True)
class Reference:
    """Dense float64 references on one input set."""

    X: Tensor
    f: Tensor  # (N, O)
    J: Tensor  # (N, O, P)

    @property
    def flat(self) -> Tensor:
        """The Jacobian as ``(N·O, P)``, rows ``n·O + o``."""
        return self.J.reshape(-1, self.J.shape[-1])


@functools.cache
def reference(name: str, n: int, seed: int) -> Reference:
    """References for case ``name`` on ``inputs(case, n, seed)``, computed once per session."""
    case = BY_NAME[name]
    net = network(case)
    X = inputs(case, n, seed)
    return Reference(X, reference_output(net, X), reference_jacobian(net, X))


def references(case: ZooCase, cfg: Config) -> tuple[Reference, Reference]:
    """The references on ``X`` (``cfg.n`` rows) and on ``X2`` (``cfg.n2`` rows)."""
    return reference(case.name, cfg.n, 0), reference(case.name, cfg.n2, 1)


# ---------------------------------------------------------------------- comparison
def mismatch(actual: Tensor, expected: Tensor) -> str | None:
    """``None`` if ``‖actual − expected‖ ≤ TOL ‖expected‖``, else what differs."""
    actual = actual.detach()
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    err = float(torch.linalg.vector_norm(actual - expected))
    scale = float(torch.linalg.vector_norm(expected))
    if err <= TOL * scale:
        return None
    worst = float((actual - expected).abs().max())
    return f"relative error {err / max(scale, 1e-300):.2e}, max abs error {worst:.2e}"


class Mismatches:
    """Collects every failed comparison of one test, so one run shows all of them."""

    def __init__(self):
        self.found: list[str] = []

    def check(self, what: str, actual: Tensor | str, expected: Tensor) -> None:
        """Record a mismatch; ``actual`` may be the text of the exception the call raised."""
        msg = actual if isinstance(actual, str) else mismatch(actual, expected)
        if msg is not None:
            self.found.append(f"{what}: {msg}")

    def assert_none(self) -> None:
        assert not self.found, "\n".join(self.found)


def _raised(exc: Exception) -> str:
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"raised {type(exc).__name__}: {first}"


# ---------------------------------------------------------------------- the zoo itself
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_zoo_case_is_well_formed(case):
    """Small, float64, output ``(N, O)`` or ``(N,)``, each row a function of its own example."""
    net = network(case).eval()
    P = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert 0 < P <= MAX_PARAMS
    assert all(p.dtype == torch.float64 for p in net.parameters())
    for cfg in configs(case):
        X = inputs(case, cfg.n, 0)
        with torch.no_grad():
            out = net(X)
            rows = torch.cat([net(X[i : i + 1]) for i in range(cfg.n)])
        assert out.dim() in (1, 2) and out.shape[0] == cfg.n
        torch.testing.assert_close(out, rows, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- products
@dataclass
class Run:
    """What one ``Linearization`` computed on one (case, engine, chunking), by check name."""

    X: Tensor
    X2: Tensor
    actual: dict[str, Tensor | str] = field(default_factory=dict)  # str: what the call raised
    expected: dict[str, Tensor] = field(default_factory=dict)
    state: str | None = None  # how the network or the inputs changed, if they did
    lin: Linearization | None = None  # kept for the model-level checks (auto, chunked) only
    failed: str | None = None  # what the construction raised, if it did


@functools.cache
def run_products(name: str, implementation: str, cfg: Config) -> Run:
    """Every product on one fresh ``Linearization``, once per session; the tests read it.

    Call order: ``ntk_mvm(X, X, V)`` three times for k = 1 and three times for k = 3, ``jvp``
    and ``vjp`` twice each for k = 1 and k = 3, ``f(X)``, ``ntk_dense(X)``, ``ntk_diag(X)``,
    ``jacobian(X)``, ``ntk_dense(X, X2)``, ``ntk_dense(X2, X)``. A call that raises is
    recorded and the next one runs (a failed construction is recorded for every call).
    Afterwards the network and the inputs are compared with their snapshots.
    """
    case = BY_NAME[name]
    ref, ref2 = references(case, cfg)
    (N, O, P), J, J2 = ref.J.shape, ref.flat, ref2.flat
    K = J @ J.T
    run = Run(ref.X.clone(), ref2.X.clone())
    X, X2 = run.X, run.X2
    lin = None  # bound below; every thunk runs after the construction
    calls = []  # (check, thunk, expected)
    gen = torch.Generator().manual_seed(0)
    for k in (1, 3):
        for call in range(3):
            V = torch.randn((N * O, k) if k > 1 else (N * O,), generator=gen)
            check = f"ntk_mvm k={k} call {call + 1}"
            calls.append((check, lambda V=V: lin.ntk_mvm(X, X, V), K @ V))
    for k in (1, 3):
        for call in range(2):
            v = torch.randn((P, k) if k > 1 else (P,), generator=gen)
            expected = torch.einsum("nop,p...->no...", ref.J, v)
            calls.append((f"jvp k={k} call {call + 1}", lambda v=v: lin.jvp(X, v), expected))
    for k in (1, 3):
        for call in range(2):
            u = torch.randn((N, O, k) if k > 1 else (N, O), generator=gen)
            expected = torch.einsum("nop,no...->p...", ref.J, u)
            calls.append((f"vjp k={k} call {call + 1}", lambda u=u: lin.vjp(X, u), expected))
    calls += [
        ("f(X)", lambda: lin(X), ref.f),
        ("ntk_dense(X)", lambda: lin.ntk_dense(X), K),
        ("ntk_diag(X)", lambda: lin.ntk_diag(X), K.diagonal()),
        ("jacobian(X)", lambda: lin.jacobian(X), ref.J),
        ("ntk_dense(X, X2)", lambda: lin.ntk_dense(X, X2), J @ J2.T),
        ("ntk_dense(X2, X)", lambda: lin.ntk_dense(X2, X), J2 @ J.T),
    ]
    net = network(case)
    before = snapshot(net)
    try:
        lin = Linearization(net, chunk_size=cfg.chunk, implementation=implementation)
    except Exception as exc:  # recorded; every test of this run reports it
        run.failed = f"construction {_raised(exc)}"
    for check, thunk, expected in calls:
        run.expected[check] = expected
        if lin is None:
            run.actual[check] = run.failed
            continue
        try:
            run.actual[check] = thunk().detach()
        except Exception as exc:  # recorded; the test reading it reports it
            run.actual[check] = _raised(exc)
    try:
        assert_unchanged(net, before)
        assert torch.equal(X, ref.X) and torch.equal(X2, ref2.X), "the inputs were modified"
    except AssertionError as exc:
        run.state = str(exc) or "the network changed"
    if implementation == "auto" and cfg == model_config(case):
        run.lin = lin
    return run


def check_run(case: ZooCase, implementation: str, cfg: Config, *prefixes: str) -> None:
    """Assert that every recorded product whose check name starts with a prefix is exact."""
    run = run_products(case.name, implementation, cfg)
    m = Mismatches()
    for check, actual in run.actual.items():
        if check.startswith(prefixes):
            m.check(check, actual, run.expected[check])
    m.assert_none()


@pytest.mark.parametrize("case, implementation, cfg", PRODUCT_PARAMS)
def test_ntk_mvm_repeated(case, implementation, cfg):
    """Three successive ``ntk_mvm(X, X, V)`` with fresh V, for k = 1 (a vector) and k = 3."""
    check_run(case, implementation, cfg, "ntk_mvm")


@pytest.mark.parametrize("case, implementation, cfg", PRODUCT_PARAMS)
def test_jvp(case, implementation, cfg):
    """``jvp(X, v)`` twice for k = 1 (a vector) and twice for k = 3, against J v."""
    check_run(case, implementation, cfg, "jvp")


@pytest.mark.parametrize("case, implementation, cfg", PRODUCT_PARAMS)
def test_vjp(case, implementation, cfg):
    """``vjp(X, u)`` twice for ``u`` of shape (N, O) and twice for (N, O, 3), against Jᵀ u."""
    check_run(case, implementation, cfg, "vjp")


@pytest.mark.parametrize("case, implementation, cfg", PRODUCT_PARAMS)
def test_forward(case, implementation, cfg):
    """``f(X)`` against the network's own eval-mode output, shape ``(N, O)``."""
    check_run(case, implementation, cfg, "f(X)")


@pytest.mark.parametrize("case, implementation, cfg", PRODUCT_PARAMS)
def test_ntk_dense(case, implementation, cfg):
    """``ntk_dense(X)`` against J Jᵀ, ``ntk_diag(X)`` against its diagonal, ``jacobian(X)``."""
    check_run(case, implementation, cfg, "ntk_dense(X)", "ntk_diag", "jacobian")


@pytest.mark.parametrize("case, implementation, cfg", PRODUCT_PARAMS)
def test_ntk_dense_cross(case, implementation, cfg):
    """``ntk_dense(X, X2)`` and ``ntk_dense(X2, X)`` (N2 ≠ N) against J Jᵀ₂ and J₂ Jᵀ."""
    check_run(case, implementation, cfg, "ntk_dense(X, X2)", "ntk_dense(X2, X)")


@pytest.mark.parametrize("case, implementation, cfg", PRODUCT_PARAMS)
def test_network_and_inputs_unchanged(case, implementation, cfg):
    """After all products: parameters, buffers, flags, grads, hooks and inputs bitwise equal."""
    state = run_products(case.name, implementation, cfg).state
    assert state is None, state


# ---------------------------------------------------------------------- models (auto)
NOISE, VARIANCE, JITTER = 0.5, 0.7, 1e-6
"""Hyperparameters of the regression checks (s², σ², ε)."""


def model_run(case: ZooCase) -> tuple[Run, Reference, Reference]:
    """The product run on ``auto`` with chunking (its ``Linearization``) and its references."""
    cfg = model_config(case)
    run = run_products(case.name, "auto", cfg)
    if run.lin is None:
        pytest.fail(run.failed)
    return (run, *references(case, cfg))


def _output_average(K: Tensor, N: int, M: int, O: int) -> Tensor:
    """``(N·O, M·O)`` → ``(N, M)``: the mean of the output-diagonal blocks."""
    return K.reshape(N, O, M, O).diagonal(dim1=1, dim2=3).mean(-1)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_empirical_ntk_kernel(case):
    """The Pyro kernel's Gram matrices and diagonal (output-averaged when O > 1)."""
    cfg = model_config(case)
    ref, ref2 = references(case, cfg)
    (N, O, _), M = ref.J.shape, ref2.J.shape[0]
    kernel = EmpiricalNTK(network(case), variance=VARIANCE, chunk_size=cfg.chunk)
    K = VARIANCE * ref.flat @ ref.flat.T
    K2 = VARIANCE * ref.flat @ ref2.flat.T
    m = Mismatches()
    m.check("kernel(X)", kernel(ref.X), _output_average(K, N, N, O))
    m.check("kernel(X, X2)", kernel(ref.X, ref2.X), _output_average(K2, N, M, O))
    m.check("kernel(X, diag=True)", kernel(ref.X, diag=True), K.diagonal().view(N, O).mean(1))
    m.assert_none()


def _targets(ref: Reference) -> Tensor:
    """Targets ``(N,)`` for a single-output network, ``(N, O)`` otherwise."""
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(ref.f.shape, generator=gen)
    return y.squeeze(-1) if ref.f.shape[1] == 1 else y


def _textbook(ref: Reference, ref_s: Reference, y: Tensor):
    """The dense posterior at ``X*``: ``A = σ²K_XX + (s² + ε)I``, ``μ* = m* + σ²K_*X A⁻¹ r``,
    ``Σ* = σ²K_** − σ⁴K_*X A⁻¹ K_X*``; returns ``(A, σ²K_*X, μ*, Σ*)``."""
    Kxx = VARIANCE * ref.flat @ ref.flat.T
    Ksx = VARIANCE * ref_s.flat @ ref.flat.T
    Kss = VARIANCE * ref_s.flat @ ref_s.flat.T
    A = Kxx + (NOISE + JITTER) * torch.eye(Kxx.shape[0])
    r = y.reshape(-1) - ref.f.reshape(-1)
    mean = ref_s.f.reshape(-1) + Ksx @ torch.linalg.solve(A, r)
    cov = Kss - Ksx @ torch.linalg.solve(A, Ksx.T)
    return A, Ksx, mean, cov


def _regression(run: Run, y: Tensor, **options) -> NTKGPRegression:
    return NTKGPRegression(
        run.X,
        y,
        run.lin,
        noise=torch.tensor(NOISE),
        variance=torch.tensor(VARIANCE),
        jitter=JITTER,
        **options,
    )


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_regression_cholesky(case):
    """``NTKGPRegression`` (``solver="cholesky"``) posterior mean and variance: the textbook GP."""
    run, ref, ref_s = model_run(case)
    y = _targets(ref)
    gp = _regression(run, y, options=SolverOptions(solver="cholesky"))
    _, _, mean_ref, cov_ref = _textbook(ref, ref_s, y)
    mean, var = gp(run.X2)
    m = Mismatches()
    m.check("posterior mean", mean.reshape(-1), mean_ref)
    m.check("posterior variance", var.reshape(-1), cov_ref.diagonal())
    m.assert_none()


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_regression_cg(case):
    """``NTKGPRegression`` with ``solver="cg"``: the mean by CG, the variances by pathwise draws.

    The CG variances are a Monte Carlo estimate from ``S`` draws ``z ~ N(0, σ²I)`` of
    θ − θ* and ``ε ~ N(0, (s² + ε)I)``, made in that order by a generator seeded with
    ``posterior_seed``; the reference replays the same draws densely: ``f = J z``,
    ``dev = f(X*) + σ²K_*X A⁻¹(−f(X) − ε)``, ``var = mean(dev²)``.
    """
    run, ref, ref_s = model_run(case)
    y = _targets(ref)
    S, seed = 8, 3
    gp = _regression(
        run,
        y,
        options=SolverOptions(solver="cg", cg_tolerance=1e-12, max_cg_iterations=2000),
        num_posterior_samples=S,
        posterior_seed=seed,
    )
    A, Ksx, mean_ref, _ = _textbook(ref, ref_s, y)
    mean, var = gp(run.X2)
    NO, P = ref.flat.shape
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(P, S, generator=gen) * VARIANCE**0.5
    prior = torch.cat([ref.flat, ref_s.flat]) @ z
    eps = (NOISE + JITTER) ** 0.5 * torch.randn(NO, S, generator=gen)
    dev = prior[NO:] + Ksx @ torch.linalg.solve(A, -(prior[:NO] + eps))
    m = Mismatches()
    m.check("posterior mean", mean.reshape(-1), mean_ref)
    m.check("posterior variance (pathwise)", var.reshape(-1), dev.square().mean(1))
    m.assert_none()


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_linearized_model(case):
    """``LinearizedModel``: ``f(X) + J(X) δ`` for one δ and for a batch of two, twice each."""
    run, ref, _ = model_run(case)
    model = LinearizedModel(run.lin, variance=0.5)
    N, O, P = ref.J.shape
    m = Mismatches()
    for call in range(2):
        delta = torch.randn(P)
        expected = ref.f + ref.J @ delta
        m.check(
            f"linearized_output call {call + 1}", model.linearized_output(run.X, delta), expected
        )
        squeezed = expected.squeeze(-1) if O == 1 else expected
        m.check(f"forward call {call + 1}", model(run.X, delta), squeezed)
        deltas = torch.randn(2, P)
        expected = ref.f + torch.einsum("nop,bp->bno", ref.J, deltas)
        m.check(f"batched call {call + 1}", model.linearized_output(run.X, deltas), expected)
    m.assert_none()


# ---------------------------------------------------------------------- refusals
class AlwaysDropout(nn.Module):
    """Dropout that stays on in eval mode: ``F.dropout(x, 0.5, training=True)``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, 0.5, training=True)


class RandomInEval(nn.Module):
    """Linear → Tanh → an always-on dropout (submodule ``noisy``) → Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.noisy = AlwaysDropout()
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.noisy(torch.tanh(self.inp(x))))


class AttentionAcrossExamples(nn.Module):
    """A sequence-first ``nn.MultiheadAttention`` given ``(N, T, d)``: it attends across N."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)  # batch_first=False
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


class BatchStatistics(nn.Module):
    """``F.batch_norm(..., training=True)`` on ``(N, 2, 3)``: statistics over the batch."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(2) + 0.5)
        self.bias = nn.Parameter(torch.randn(2))
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.batch_norm(x, None, None, self.weight, self.bias, training=True)
        return self.head(torch.tanh(h).flatten(1))


def _construct_and_multiply(net: nn.Module, X: Tensor, implementation: str, at: str) -> None:
    """Build the Linearization (with ``example=X`` when ``at == "construction"``), then K·v."""
    example = {"example": X} if at == "construction" else {}
    lin = Linearization(net, implementation=implementation, **example)
    lin.ntk_mvm(X, X, torch.randn(X.shape[0] * lin.output_dim(X)))


@pytest.mark.parametrize("at", ["construction", "first_product"])
@pytest.mark.parametrize("implementation", ENGINES)
def test_random_forward_is_refused_naming_the_module(implementation, at):
    net = RandomInEval()
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"noisy|AlwaysDropout"):
        _construct_and_multiply(net, torch.randn(4, 3), implementation, at)
    assert_unchanged(net, before)


@pytest.mark.parametrize("at", ["construction", "first_product"])
@pytest.mark.parametrize("implementation", ENGINES)
@pytest.mark.parametrize(
    "make, shape",
    [
        pytest.param(AttentionAcrossExamples, (4, 3, 4), id="attention_across_examples"),
        pytest.param(BatchStatistics, (4, 2, 3), id="batch_statistics"),
    ],
)
def test_interacting_examples_are_refused(make, shape, implementation, at):
    net = make()
    before = snapshot(net)
    with pytest.raises(ValueError, match="independent"):
        _construct_and_multiply(net, torch.randn(*shape), implementation, at)
    assert_unchanged(net, before)
