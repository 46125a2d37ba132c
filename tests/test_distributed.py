"""Sharded products, solves and posterior on 2 and 4 gloo processes equal the one-process results.

The parent test starts the ranks as subprocesses of this very file (``python
tests/test_distributed.py <scenario> <rank> <world> <rendezvous> <out>``); they meet through a
``file://`` rendezvous in ``tmp_path`` (loopback only), every collective has a 20 s timeout,
and the parent kills everything after ``LAUNCH_TIMEOUT``. Each rank compares its rows with
dense float64 references over the *whole* data set (``pyro_ntk.testing``, computed on every
rank) and writes the relative errors to a JSON file that the parent checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 120  # seconds for a whole multi-process scenario
COLLECTIVE_TIMEOUT = 20  # seconds a rank waits in a collective
TOL = 1e-10
N_TRAIN, D_IN, WIDTH, D_OUT = 23, 3, 6, 2  # 23 rows: uneven shards for 2 and 4 ranks


# ---------------------------------------------------------------------------- the ranks
def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, D_OUT)
    ).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _products(comm, out: Path) -> None:
    """Every sharded quantity against its dense single-process reference."""
    from pyro_ntk import FisherLinearOperator, Linearization, NTKLinearOperator
    from pyro_ntk.distributed import (
        ShardedFisherPreconditioner,
        ShardedLinearization,
        ShardedNTKRegression,
        shard_rows,
        sharded_conjugate_gradient,
    )
    from pyro_ntk.testing import reference_jacobian, reference_ntk, reference_output

    r, R = comm.rank, comm.world_size
    net = _network()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N_TRAIN, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(N_TRAIN, D_OUT, generator=gen, dtype=torch.float64)
    rows = shard_rows(N_TRAIN, r, R)
    frows = slice(rows.start * D_OUT, rows.stop * D_OUT)  # function-space rows
    Xr, yr = X[rows], y[rows]
    lin = ShardedLinearization(net)
    P, O, n = lin.num_params, D_OUT, N_TRAIN * D_OUT
    J = reference_jacobian(net, X).reshape(n, P)
    sigma2 = torch.tensor([0.7, 1.3, 0.9, 1.1], dtype=torch.float64)[: len(lin.groups)]
    scale = lin.space.expand_group_values(sigma2)
    K = reference_ntk(net, X, X, scale=scale)
    err: dict[str, float] = {}

    u = torch.randn(N_TRAIN, O, 3, generator=gen, dtype=torch.float64)
    before = lin.comm.stats.bytes
    err["vjp"] = _rel(lin.vjp(Xr, u[rows]), J.T @ u.reshape(n, 3))
    err["vjp_bytes"] = float(lin.comm.stats.bytes - before != P * 3 * 8) if R > 1 else 0.0
    v = torch.randn(P, 2, generator=gen, dtype=torch.float64)
    err["jvp"] = _rel(lin.jvp(Xr, v).reshape(-1, 2), (J @ v)[frows])
    V = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    err["ntk_mvm"] = _rel(lin.ntk_mvm(Xr, Xr, V[frows], variance=sigma2), (K @ V)[frows])
    # gradient through the all-reduce: d/dV_r of Σ_s w_sᵀ (K V)_s is (K w)_r
    Vg = V[frows].clone().requires_grad_(True)
    w = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    (w[frows] * lin.ntk_mvm(Xr, Xr, Vg, variance=sigma2)).sum().backward()
    err["ntk_mvm_grad"] = _rel(Vg.grad, (K @ w)[frows])
    op = NTKLinearOperator(Xr, variance=sigma2, network=lin)
    err["ntk_operator"] = _rel(op @ V[frows], (K @ V)[frows])
    err["ntk_dense"] = _rel(lin.ntk_dense(Xr, variance=sigma2), K[frows])
    err["ntk_diag"] = _rel(lin.ntk_diag(Xr, variance=sigma2), K.diagonal()[frows])

    F = FisherLinearOperator(Xr, network=lin, noise=0.5)
    err["fisher_exact"] = _rel(F @ v, J.T @ (J @ v) / 0.5)
    Fb = FisherLinearOperator(Xr, network=lin, likelihood="bernoulli")
    p = torch.sigmoid(reference_output(net, X)).reshape(n, 1)
    err["fisher_bernoulli"] = _rel(Fb @ v, J.T @ (p * (1 - p) * (J @ v)))
    if R == 2:  # the finite-difference path (its torch.func imports cost ~10 s on 4 ranks)
        Fb_fd = FisherLinearOperator(
            Xr, network=lin, likelihood="bernoulli", method="finite_difference"
        )
        one = Linearization(net)  # the same finite difference on one process
        Fb_one = FisherLinearOperator(
            X, network=one, likelihood="bernoulli", method="finite_difference"
        )
        err["fisher_finite_difference"] = _rel(Fb_fd @ v, Fb_one @ v)

    # distributed CG against a dense solve
    s2 = 0.05
    A = K + s2 * torch.eye(n, dtype=torch.float64)
    B = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    Z, diag = sharded_conjugate_gradient(
        lambda W: lin.ntk_mvm(Xr, Xr, W, variance=sigma2) + s2 * W,
        B[frows],
        linearization=lin,
        tol=1e-13,
        max_iter=500,
    )
    err["cg"] = _rel(Z, torch.linalg.solve(A, B)[frows])
    err["cg_converged"] = float(not diag.converged)

    # the sharded Fisher preconditioner: M⁻¹ (Woodbury, all-reduced k×k) against its dense M
    pre = ShardedFisherPreconditioner(lin, Xr, rank=5, seed=3)
    eig, c = pre.eigenform(sigma2)
    noise_vec = 0.1 + 0.05 * torch.rand(n, generator=gen, dtype=torch.float64)
    for name, noise in (("scalar", 0.1), ("vector", noise_vec[frows])):
        M_rows = eig.to_dense(c, noise)
        M, _ = comm.all_gather_rows(M_rows)
        err[f"precond_solve_{name}"] = _rel(
            eig.solve_closure(c, noise)(B[frows]), torch.linalg.solve(M, B)[frows]
        )
        err[f"precond_logdet_{name}"] = _rel(eig.logdet(c, noise), torch.logdet(M))
    err["precond_rank"] = float(eig.rank != 5)

    # the regression posterior; rank r predicts at r + 1 own test points, the last at none
    Xs = torch.randn(R * (R + 1) // 2, D_IN, generator=gen, dtype=torch.float64)
    start = r * (r + 1) // 2
    mine = slice(start, start + r + 1)
    noise = 0.05
    gp = ShardedNTKRegression(
        Xr, yr, lin, noise=noise, variance=sigma2, cg_tolerance=1e-13, preconditioner_rank=n
    )
    # dense reference posterior over all data
    m = reference_output(net, X).reshape(n)
    Acov = K + noise * torch.eye(n)
    Ks = reference_ntk(net, Xs, X, scale=scale)
    mean_ref = reference_output(net, Xs).reshape(-1) + Ks @ torch.linalg.solve(
        Acov, y.reshape(n) - m
    )
    cov_ref = reference_ntk(net, Xs, Xs, scale=scale) - Ks @ torch.linalg.solve(Acov, Ks.T)
    last = r == R - 1 and R > 1
    res = gp.predict(None if last else Xs[mine])
    res_cov = gp.predict(None if last else Xs[mine], full_cov=True)
    fr = slice(mine.start * O, mine.stop * O)
    if not last:
        err["predict_mean"] = _rel(res[0].reshape(-1), mean_ref[fr])
        err["predict_var"] = _rel(res[1].reshape(-1), cov_ref.diagonal()[fr])
        err["predict_cov"] = _rel(res_cov[1], cov_ref[fr, fr])
        err["predict_mean_local"] = _rel(gp.predict_mean(Xs).reshape(-1), mean_ref)
    else:
        err["predict_none"] = float(res is not None or res_cov is not None)
    lml = gp.log_marginal_likelihood(num_probes=4)
    dist = torch.distributions.MultivariateNormal(m, Acov)
    err["log_marginal_likelihood"] = _rel(lml, dist.log_prob(y.reshape(n)))
    err["weights_same_on_every_rank"] = _rel(
        comm.all_reduce(gp.weights) / R, gp.weights
    )  # identical P-vector everywhere
    (out / f"rank{r}.json").write_text(json.dumps(err))


def _failure(comm, out: Path) -> None:
    """Rank 1 raises in its third CG product; every rank must exit with a clear error."""
    from pyro_ntk.distributed import ShardedLinearization, shard_rows, sharded_conjugate_gradient

    net = _network()
    X = torch.randn(N_TRAIN, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Xr = X[shard_rows(N_TRAIN, comm.rank, comm.world_size)]
    lin = ShardedLinearization(net)
    calls = [0]

    def A(V: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if comm.rank == 1 and calls[0] == 3:
            raise RuntimeError("injected failure on rank 1 in CG product 3")
        return lin.ntk_mvm(Xr, Xr, V) + 1e-3 * V

    b = torch.ones(Xr.shape[0] * D_OUT, dtype=torch.float64)
    sharded_conjugate_gradient(A, b, linearization=lin, tol=1e-14, max_iter=200, warn=False)
    (out / f"rank{comm.rank}.json").write_text("{}")  # not reached on any rank


def _worker(scenario: str, rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    from pyro_ntk.distributed import init_from_env

    comm = init_from_env("gloo", timeout=COLLECTIVE_TIMEOUT, init_method=f"file://{rendezvous}")
    assert comm.world_size == world and comm.rank == rank
    try:
        {"products": _products, "failure": _failure}[scenario](comm, Path(out))
        print(f"rank {rank}: scenario done", flush=True)
        torch.distributed.barrier()  # every rank reaches the teardown before any closes
    finally:
        # Destroying the group joins gloo's worker threads while the interpreter is alive,
        # on success and on failure; a worker still alive at finalization aborts the rank
        # (docs/distributed.rst, "Teardown").
        torch.distributed.destroy_process_group()
    print(f"rank {rank}: process group destroyed", flush=True)


# ---------------------------------------------------------------------------- the parent
def _launch(tmp_path: Path, world: int, scenario: str) -> list[tuple[int, str]]:
    # the repository first, then whatever the caller's PYTHONPATH holds (site packages
    # installed with --target, say)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("WORLD_SIZE", None)
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    rendezvous = tmp_path / "rendezvous"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                scenario,
                str(r),
                str(world),
                str(rendezvous),
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=LAUNCH_TIMEOUT)
            results.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_results_equal_single_process(tmp_path, world):
    results = _launch(tmp_path, world, "products")
    for rank, (rc, text) in enumerate(results):
        assert rc == 0, f"rank {rank} of {world} failed:\n{text}"
    for rank in range(world):
        err = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "ntk_mvm" in err and "cg" in err and "log_marginal_likelihood" in err
        # the finite-difference Fisher product differs only by the summation order of its
        # O(ε) gradients, amplified by 1/ε; the lml's SLQ part is exactly zero up to rounding
        # when the preconditioner has full rank (M = A)
        loose = {"fisher_finite_difference": 1e-7, "log_marginal_likelihood": 1e-9}
        bad = {k: v for k, v in err.items() if v > loose.get(k, TOL)}
        assert not bad, f"rank {rank} of {world}: errors above tolerance: {bad}"


def test_failing_rank_stops_every_rank(tmp_path):
    results = _launch(tmp_path, 2, "failure")
    (rc0, text0), (rc1, text1) = results
    assert rc1 != 0 and "injected failure on rank 1" in text1, text1
    assert rc0 != 0, text0
    assert "DistributedError" in text0 and "failed on rank 0 of 2" in text0, text0
    assert not list(tmp_path.glob("rank*.json"))


def test_single_process_is_the_plain_engine():
    """Without torch.distributed the sharded classes are the one-process computation."""
    from pyro_ntk import Linearization
    from pyro_ntk.distributed import ShardedLinearization, ShardedNTKRegression, init_from_env

    assert init_from_env().world_size == 1
    torch.manual_seed(0)
    net = _network()
    X = torch.randn(9, D_IN)
    lin, one = ShardedLinearization(net), Linearization(net)
    V = torch.randn(9 * D_OUT, 2)
    torch.testing.assert_close(lin.ntk_mvm(X, X, V), one.ntk_mvm(X, X, V), rtol=1e-12, atol=0)
    assert lin.comm.stats.calls == 0
    gp = ShardedNTKRegression(X, torch.randn(9, D_OUT), net, noise=0.1, preconditioner=None)
    mean, var = gp.predict(X[:2])
    assert mean.shape == var.shape == (2, D_OUT) and gp.last_solve.converged


def test_bad_input_names_the_entry_point():
    from pyro_ntk import Linearization
    from pyro_ntk.distributed import ShardedFisherPreconditioner, ShardedNTKRegression, shard_rows

    net = _network()
    X = torch.randn(5, D_IN)
    with pytest.raises(ValueError, match="ShardedNTKRegression: y has shape"):
        ShardedNTKRegression(X, torch.randn(4), net)
    with pytest.raises(ValueError, match="ShardedNTKRegression: preconditioner"):
        ShardedNTKRegression(X, torch.randn(5, D_OUT), net, preconditioner="nystrom")
    with pytest.raises(TypeError, match="ShardedFisherPreconditioner: linearization"):
        ShardedFisherPreconditioner(Linearization(net), X)
    with pytest.raises(ValueError, match="shard_rows: rank must be < world_size"):
        shard_rows(10, 2, 2)
    from pyro_ntk.distributed import ShardedLinearization

    with pytest.raises(ValueError, match="ShardedFisherPreconditioner: subsample is not"):
        ShardedFisherPreconditioner(ShardedLinearization(net), X, subsample=0.5)


def test_example_runs_single_process(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import distributed_regression
    finally:
        sys.path.remove(str(ROOT / "examples"))
    summary = distributed_regression.main(["--n-train", "100", "--n-test", "10", "--epochs", "30"])
    assert summary["world_size"] == 1
    assert summary["converged"]
    # the posterior mean fits the held-out target better than the trained network alone
    assert summary["test_rmse"] < summary["network_rmse"]


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
