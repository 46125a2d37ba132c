"""NTK-GP regression with the training data split over processes (torch.distributed).

A 1-40-40-1 tanh MLP is trained on a source sine task; the NTK-GP built on it then learns a
new target task from ``--n-train`` points that are *sharded* over the ranks: every rank holds
its own rows of X and y (``pyro_ntk.distributed.shard_rows``) and never sees the others'.
:class:`pyro_ntk.distributed.ShardedNTKRegression` solves the GP system by Fisher-
preconditioned CG whose NTK products all-reduce one P-vector per product; the kernel
variance σ² is chosen on a small grid by the (distributed) marginal likelihood; each rank
then predicts at its own test points. Rank 0 prints the figures, including the bytes
all-reduced, and shows progress bars (``--no-progress``: none); the script writes no files.

Each process runs torch on one thread (``--threads``), as ``torchrun`` sets: the products
are small, and on a shared CPU a second thread per process spends its time waiting (one
``--quick`` process: 24 s with two threads, 8 s with one, on a 2-core CPU at load 5,
2026-12-05).

Run (either way; the results agree to CG tolerance)::

    torchrun --nproc_per_node=2 examples/distributed_regression.py
    python examples/distributed_regression.py

``--quick`` runs 500 target points, 100 test points and 500 Adam steps on the source instead
of 2000, 200 and 2000 (a few seconds; options given explicitly take precedence).

On a cluster, use one process per GPU (NCCL is chosen when CUDA is available) and
``torchrun --nnodes=... --rdzv-endpoint=...`` as usual.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from pyro_ntk.datasets import sample_sine_tasks
from pyro_ntk.demo import make_network, run_settings
from pyro_ntk.distributed import (
    ShardedLinearization,
    ShardedNTKRegression,
    init_from_env,
    shard_rows,
)

FULL = {"n_train": 2000, "n_test": 200, "epochs": 2000}
QUICK = {"n_train": 500, "n_test": 100, "epochs": 500}


def train_source_network(comm, steps: int, seed: int, progress: bool = False) -> nn.Module:
    """Rank 0 trains on the source task and broadcasts the weights (θ* must agree)."""
    torch.manual_seed(seed)
    net = make_network("sine", 1).double()  # 1-40-40-1 tanh MLP
    if comm.rank == 0:
        source = sample_sine_tasks(2, seed=seed)[0]
        X, y = source.sample(500, seed=seed + 1, dtype=torch.float64)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        bar = tqdm(range(steps), desc="rank 0: training the source network",
                   disable=not progress, leave=False)  # fmt: skip
        for _ in bar:
            opt.zero_grad()
            (net(X).squeeze(-1) - y).square().mean().backward()
            opt.step()
    if comm.distributed:
        with torch.no_grad():
            for tensor in net.state_dict().values():
                dist.broadcast(tensor, src=0)
    return net


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (the command line when ``None``), run, and return the printed figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, help="target points, all ranks (default 2000)")
    parser.add_argument("--n-test", type=int, help="test points, all ranks (default 200)")
    parser.add_argument("--epochs", type=int, help="Adam steps on the source (default 2000)")
    parser.add_argument(
        "--noise", type=float, default=None, help="observation variance s² (default: the task's)"
    )
    parser.add_argument("--rank", type=int, default=50, help="preconditioner rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (default 1, as torchrun)"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes: seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # --threads for the run only; the tensors carry their own dtype (float64)
    with run_settings(args.threads, dtype=None, module_local_params=None):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    comm = init_from_env(timeout=600)
    progress = comm.rank == 0 and not args.no_progress
    start = time.perf_counter()
    net = train_source_network(comm, args.epochs, args.seed, progress)
    target = sample_sine_tasks(2, seed=args.seed)[1]
    noise = args.noise if args.noise is not None else target.noise_std**2
    X, y = target.sample(args.n_train, seed=args.seed + 2, dtype=torch.float64)
    Xt, yt = target.sample(args.n_test, seed=args.seed + 3, dtype=torch.float64)
    mine = shard_rows(args.n_train, comm.rank, comm.world_size)
    mine_test = shard_rows(args.n_test, comm.rank, comm.world_size)
    X, y, Xt, yt = X[mine], y[mine], Xt[mine_test], yt[mine_test]  # this rank's rows only

    lin = ShardedLinearization(net)
    grid = {}
    variances = tqdm((0.1, 1.0, 10.0), desc="σ² by the marginal likelihood", disable=not progress,
                     leave=False)  # fmt: skip
    for variance in variances:  # σ² by the marginal likelihood over all shards
        gp = ShardedNTKRegression(
            X, y, lin, noise=noise, variance=variance, preconditioner_rank=args.rank
        )
        grid[variance] = float(gp.log_marginal_likelihood(num_probes=8))
    best = max(grid, key=grid.get)
    gp = ShardedNTKRegression(X, y, lin, noise=noise, variance=best, preconditioner_rank=args.rank)
    lin.comm.stats.reset()
    with tqdm(total=1, desc="predictive solve (CG)", disable=not progress, leave=False) as bar:
        mean, var = gp.predict(Xt, noiseless=False)  # each rank: its own test points
        bar.update()
    solve = gp.last_solve
    with torch.no_grad():
        net_pred = net(Xt).squeeze(-1)
    inside = ((yt - mean).abs() <= 1.96 * var.sqrt()).double()
    local = torch.stack(
        [
            (mean - yt).square().sum(),
            (net_pred - yt).square().sum(),
            inside.sum(),
            torch.tensor(float(len(yt)), dtype=torch.float64),
        ]
    )
    total = comm.all_reduce(local)
    summary = {
        "world_size": comm.world_size,
        "n_train": args.n_train,
        "num_params": lin.num_params,
        "variance": best,
        "log_marginal_likelihood": grid,
        "converged": bool(solve.converged),
        "cg_iterations": solve.iterations,
        "test_rmse": math.sqrt(float(total[0] / total[3])),
        "network_rmse": math.sqrt(float(total[1] / total[3])),
        "coverage_95": float(total[2] / total[3]),
        "predict_bytes_all_reduced": lin.comm.stats.bytes,
        "seconds": time.perf_counter() - start,
    }
    if comm.rank == 0:
        print(f"ranks: {comm.world_size}, target points: {args.n_train} (this rank {len(y)})")
        shown = ", ".join(f"{v:g}: {lml:.2f}" for v, lml in grid.items())
        print(f"P = {lin.num_params}; σ² by marginal likelihood: {best:g} ({shown})")
        print(f"predictive solve: {solve}")
        print(
            f"test RMSE {summary['test_rmse']:.4f} (source network {summary['network_rmse']:.4f}),"
            f" 95% coverage {summary['coverage_95']:.3f}"
        )
        print(
            f"predict: {lin.comm.stats.bytes} bytes all-reduced in {lin.comm.stats.calls} "
            f"collectives; total {summary['seconds']:.1f} s"
        )
    return summary


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        # joins gloo's worker threads before the interpreter finalizes (docs: "Teardown")
        dist.barrier()
        dist.destroy_process_group()
