"""Sketch variants of the Fisher preconditioner against Nyström: iterations and total cost.

Same problem as ``bench_precond.py`` (trained 26-128-128-1 tanh MLP on ``diamonds``, σ² = 1,
s² = ratio × mean diag K, CG to ``--tol``). For each variant: CG iterations (exact,
load-independent), the structural set-up cost in K·v-equivalents (``products``: one JVP or VJP
column = ½), the time-based set-up (set-up seconds ÷ one single-column K·v, min of
``--repeats`` builds) and the totals ``set-up + iterations`` in both units.

Usage::

    python benchmarks/bench_precond_variants.py --n 5000 --ratios 1e-2 1e-3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precond import TRAIN_ROWS, kv_seconds, shuffled_diamonds, train_network  # noqa: E402

from pyro_ntk import Linearization  # noqa: E402
from pyro_ntk.preconditioners import FisherPreconditioner, NystromPreconditioner  # noqa: E402
from pyro_ntk.solvers import conjugate_gradient  # noqa: E402


def variants(k: int):
    half = k // 2
    yield "Nyström on K", lambda lin, X: NystromPreconditioner(lin, X, rank=k)
    yield (
        "Fisher default (Kronecker pool max(5k, 500) + range finder on the rest)",
        lambda lin, X: FisherPreconditioner(lin, X, rank=k),
    )
    for pool in (2 * k, 3 * k, 10 * k):
        yield (
            f"Fisher Kronecker pool {pool}",
            lambda lin, X, pool=pool: FisherPreconditioner(lin, X, rank=k, pool=pool),
        )
    # the randomized range finder on every parameter (kronecker=False)
    for sketch, q, p, sub in [
        ("function", 0, 0, None),
        ("function", 1, half, None),
        ("function", 1, half, "auto"),
        ("function", 1, half, 1 / 8),
    ]:
        yield (
            f"range finder {sketch} q={q} p={p} subsample {sub}",
            lambda lin, X, sketch=sketch, q=q, p=p, sub=sub: FisherPreconditioner(
                lin, X, rank=k, sketch=sketch, power_iterations=q, oversampling=p,
                subsample=sub, kronecker=False,
            ),
        )  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[5000])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = torch.float64, torch.device("cpu")
    print(dict(torch=torch.__version__, threads=torch.get_num_threads(), load=os.getloadavg()))
    Xall, yall = shuffled_diamonds(args.csv, dtype)
    net = train_network(Xall[:TRAIN_ROWS], yall[:TRAIN_ROWS], args.train_steps, device, dtype)
    lin = Linearization(net)
    Xgp, ygp = Xall[TRAIN_ROWS:], yall[TRAIN_ROWS:]
    with torch.no_grad():
        res = ygp - net(Xgp).squeeze(-1)
    for n in args.n:
        X, b = Xgp[:n], res[:n].unsqueeze(-1)
        t_kv = kv_seconds(lin, X, device)
        mbar = float(lin.ntk_diag(X).mean())
        built = []
        for name, make in variants(args.rank):
            best = math.inf
            for _ in range(args.repeats):
                pre = make(lin, X)
                t0 = time.perf_counter()
                pre.build()
                best = min(best, time.perf_counter() - t0)
            built.append((name, pre, best))
        for ratio in args.ratios:
            s2 = ratio * mbar
            for name, pre, t in built:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, diag = conjugate_gradient(
                        lambda V, s2=s2, X=X: lin.ntk_mvm(X, None, V) + s2 * V,
                        b,
                        preconditioner=pre.solve_closure(1.0, s2),
                        tol=args.tol,
                        max_iter=3000,
                    )
                it = diag.iterations
                print(
                    f"N={n} s2={ratio:g}m  {name:38s} it {it:4d}  setup {pre.products:6.1f} kv "
                    f"(struct) / {t / t_kv:6.1f} kv (time)  total {pre.products + it:6.1f} / "
                    f"{t / t_kv + it:6.1f}  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
