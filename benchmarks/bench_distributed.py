"""Sharded K·v on 1, 2 and 4 gloo processes: time per product, bytes all-reduced, compute/comm split.

Problem: a tanh MLP ``d-w-w-1`` (default 16-128-128-1, P = 18,817) in float64 with random
weights (the cost of a product does not depend on training), N = 8,000 inputs in total,
row-sharded over R processes (``pyro_ntk.distributed.shard_rows``), one thread per process.
Each rank times ``ShardedLinearization.ntk_mvm`` (``K V`` for ``V`` of ``k`` columns: one
local VJP, one all-reduce of ``P·k`` numbers, one local JVP), with a barrier before every
product; the time of a product is the slowest rank's. Per product it records:

* ``product``: wall time (min over repeats of the max over ranks);
* ``all-reduce``: seconds inside the product's collective (transfer + waiting for the
  slowest rank's VJP), and ``transfer`` the same all-reduce of ``P·k`` numbers timed alone
  after a barrier (pure communication on this machine's loopback);
* ``compute``: ``product − all-reduce`` on the slowest rank;
* ``CPU ms / rank``: thread CPU time of the same VJP + JVP on the rank's rows without
  communication (a plain ``Linearization``; max over ranks), which the machine's load does
  not inflate, and ``speed-up on R free cores`` = ``CPU(R = 1) / (CPU(R) + transfer(R))``,
  what R dedicated cores with this interconnect would give;
* ``bytes``: payload bytes each rank all-reduces per product (counted by the
  ``Communicator``: ``8·P·k``), and per CG iteration the extra scalars (``3·8·k``) and the
  preconditioner's ``8·r·k`` (rank ``r``).

The ranks are subprocesses of this script meeting through a ``file://`` rendezvous; run
sizes with 1, 2 and 4 processes one after another. Every rank uses the same ``chunk_size``
(default 1000 rows), so a rank's working set per chunk is the same for every R and the
speed-up measures parallelism, not cache effects (without chunks, one process on all 8,000
rows streams ~100 MB activations per layer for k = 16 and runs slower per row). The machine has 2 cores, so 4 processes
oversubscribe it (two ranks share each core): that row shows contention, not scaling.

Usage::

    python benchmarks/bench_distributed.py                 # N = 8000, k = 1 and 16
    python benchmarks/bench_distributed.py --write         # also write RESULTS.md's section
    python benchmarks/bench_distributed.py --quick         # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace, rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    import torch.distributed as dist

    from pyro_ntk import Linearization
    from pyro_ntk.distributed import ShardedLinearization, init_from_env, shard_rows

    comm = init_from_env("gloo", timeout=300, init_method=f"file://{rendezvous}")
    torch.manual_seed(0)
    w = args.width
    net = torch.nn.Sequential(
        torch.nn.Linear(args.dim, w),
        torch.nn.Tanh(),
        torch.nn.Linear(w, w),
        torch.nn.Tanh(),
        torch.nn.Linear(w, 1),
    ).double()
    X = torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(1))
    Xr = X.double()[shard_rows(args.n, rank, world)]
    lin = ShardedLinearization(net, chunk_size=args.chunk_size or None)
    local = Linearization(net, chunk_size=args.chunk_size or None)  # the same work, no comm
    P = lin.num_params
    barrier = dist.barrier if comm.distributed else (lambda: None)

    def slowest(seconds: float) -> float:
        if not comm.distributed:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    rows = []
    for k in args.columns:
        V = torch.randn(Xr.shape[0], k, dtype=torch.float64)
        payload = torch.randn(P, k, dtype=torch.float64)
        lin.ntk_mvm(Xr, Xr, V)  # warm-up (engine caches, gloo buffers)
        local.ntk_mvm(Xr, Xr, V)
        best = {name: float("inf") for name in ("product", "allreduce", "transfer", "cpu")}
        best_compute = float("inf")
        nbytes = 0
        for _ in range(args.repeats):
            barrier()
            before_s, before_b = lin.comm.stats.seconds, lin.comm.stats.bytes
            t0 = time.perf_counter()
            lin.ntk_mvm(Xr, Xr, V)
            product = time.perf_counter() - t0
            inside = lin.comm.stats.seconds - before_s
            nbytes = lin.comm.stats.bytes - before_b
            best["product"] = min(best["product"], slowest(product))
            best["allreduce"] = min(best["allreduce"], slowest(inside))
            best_compute = min(best_compute, slowest(product - inside))
            barrier()
            t0 = time.perf_counter()
            comm.all_reduce(payload)
            best["transfer"] = min(best["transfer"], slowest(time.perf_counter() - t0))
            t0 = time.thread_time()  # CPU seconds of this rank's VJP + JVP: load-independent
            local.ntk_mvm(Xr, Xr, V)
            best["cpu"] = min(best["cpu"], slowest(time.thread_time() - t0))
        rows.append(
            dict(
                world=world,
                k=k,
                P=P,
                n_local=Xr.shape[0],
                bytes=nbytes if comm.distributed else 8 * P * k,
                compute=best_compute,
                **best,
            )
        )
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    if comm.distributed:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous, out = Path(tmp) / "rendezvous", Path(tmp) / "rows.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        env.pop("WORLD_SIZE", None)
        base = [sys.executable, __file__, "--n", str(args.n), "--dim", str(args.dim)]
        base += ["--width", str(args.width), "--repeats", str(args.repeats)]
        base += ["--chunk-size", str(args.chunk_size), "--columns"]
        base += [str(k) for k in args.columns]
        procs = [
            subprocess.Popen(
                [*base, "--worker", str(r), str(world), str(rendezvous), str(out)], env=env
            )
            for r in range(world)
        ]
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise RuntimeError(f"rank failed with exit code {p.returncode}")
        return json.loads(out.read_text())


def report(results: list[dict], args: argparse.Namespace, header: str) -> str:
    wall = {r["k"]: r["product"] for r in results if r["world"] == 1}
    cpu = {r["k"]: r["cpu"] for r in results if r["world"] == 1}
    table = []
    for r in results:
        many = r["world"] > 1
        model = cpu[r["k"]] / (r["cpu"] + (r["transfer"] if many else 0.0))
        table.append(
            [
                r["world"],
                r["k"],
                r["n_local"],
                f"{1e3 * r['product']:.1f}",
                f"{wall[r['k']] / r['product']:.2f}",
                f"{1e3 * r['compute']:.1f}",
                f"{1e3 * r['allreduce']:.2f}" if many else "–",
                f"{1e3 * r['transfer']:.2f}" if many else "–",
                f"{r['bytes']:,}",
                f"{1e3 * r['cpu']:.1f}",
                f"{model:.2f}",
            ]
        )
    heads = [
        "R",
        "k",
        "N_r",
        "K·v wall ms",
        "wall speed-up",
        "compute ms",
        "all-reduce in product ms",
        "transfer alone ms",
        "bytes all-reduced / rank",
        "CPU ms / rank",
        "speed-up on R free cores",
    ]
    return header + "\n\n" + markdown_table(heads, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=10, help="products per launch")
    parser.add_argument("--rounds", type=int, default=3, help="launches per process count")
    parser.add_argument(
        "--chunk-size", type=int, default=1000, help="rows per chunk on every rank (0: none)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md's section")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank, world, rendezvous, out = args.worker
        _worker(args, int(rank), int(world), rendezvous, out)
        return
    if args.quick:
        args.n, args.width, args.repeats, args.columns, args.rounds = 400, 16, 2, [1, 4], 1
    header = (
        f"{machine()}. MLP {args.dim}-{args.width}-{args.width}-1 tanh, float64, "
        f"N = {args.n} in total, chunk_size {args.chunk_size or 'none'} on every rank, gloo "
        f"over loopback, one thread per rank; min over {args.rounds} round-robin launches "
        f"× {args.repeats} products."
    )
    best: dict[tuple[int, int], dict] = {}
    for _ in range(args.rounds):  # the sweep round-robin, min per cell: robust to load drift
        for world in args.worlds:
            for row in launch(args, world):
                key = (row["world"], row["k"])
                old = best.setdefault(key, row)
                for name in ("product", "compute", "allreduce", "transfer", "cpu"):
                    old[name] = min(old[name], row[name])
    results = [best[key] for key in sorted(best)]
    text = report(results, args, header)
    print(text)
    if args.write:
        write_section("Distributed", text)


if __name__ == "__main__":
    main()
