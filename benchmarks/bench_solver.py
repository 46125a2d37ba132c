"""Dense Cholesky against matrix-free CG in NTKGPRegression: where ``solver="auto"`` switches.

Problem: the trained MLP of ``bench_precond.py`` (26-128-128-1 tanh, P = 20,097, ggplot2's
``diamonds``), GP sets of N held-out rows, σ² = 1, s² = ``--ratio`` × mean diag K. For each N
and each solver, a fresh :class:`pyro_ntk.NTKGPRegression` is timed on

* ``first``: the marginal likelihood ``log p(y)`` and its gradient with respect to σ² and s²,
  then the posterior mean at ``--m`` test rows. This includes everything built once per X:
  the dense kernel (the structured engine's per-layer contraction) and its Cholesky factor,
  or the Fisher preconditioner (``preconditioner="auto"``, rank ``--rank``) and CG;
* ``again``: the same evaluation a second time on the same model (what every later step of
  a hyperparameter fit pays: cached K, or cached preconditioner).

Solvers alternate within each repeat and the minimum over ``--repeats`` is reported (the
machine is shared). The posterior's CG path solves ``1 + --samples`` columns (pathwise
variances); ``--samples 1`` keeps the comparison about the mean.

Usage::

    python benchmarks/bench_solver.py --n 1000 2000 4000 8000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precond import TRAIN_ROWS, r2, shuffled_diamonds, train_network  # noqa: E402

from pyro_ntk import Linearization  # noqa: E402
from pyro_ntk.models import NTKGPRegression  # noqa: E402
from pyro_ntk.options import SolverOptions  # noqa: E402


def evaluate(model, y, Xtest) -> None:
    """One marginal-likelihood value + gradient, then one posterior mean."""
    loss = -model._distribution().log_prob(y)
    loss.backward()
    with torch.no_grad():
        model(Xtest)


def one(lin, X, y, Xtest, solver, noise, args):
    model = NTKGPRegression(
        X,
        y,
        lin,
        noise=noise,
        num_posterior_samples=args.samples,
        options=SolverOptions(
            solver=solver,
            max_cholesky_size=10**9,
            preconditioner_rank=args.rank,
            cg_tolerance=args.tol,
        ),
    )
    t0 = time.perf_counter()
    evaluate(model, y, Xtest)
    t1 = time.perf_counter()
    evaluate(model, y, Xtest)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, model.last_solve


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    ap.add_argument("--m", type=int, default=1000, help="test rows")
    ap.add_argument("--ratio", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=4000)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dtype = torch.float64
    info = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        load_start=os.getloadavg(),
    )
    print(info, flush=True)
    Xall, yall = shuffled_diamonds(args.csv, dtype, seed=args.seed)
    Xtr, ytr = Xall[:TRAIN_ROWS], yall[:TRAIN_ROWS]
    Xgp, ygp = Xall[TRAIN_ROWS:], yall[TRAIN_ROWS:]
    net = train_network(Xtr, ytr, args.train_steps, torch.device("cpu"), dtype, args.seed)
    lin = Linearization(net)
    info.update(P=lin.num_params, r2_train=r2(net, Xtr, ytr), engine=str(lin.implementation))
    print(info, flush=True)
    Xtest = Xgp[-args.m :]
    rows = []
    for n in args.n:
        X, y = Xgp[:n], ygp[:n]
        noise = torch.tensor(args.ratio * float(lin.ntk_diag(X).mean()), dtype=dtype)
        best = {}
        for _ in range(args.repeats):
            for solver in ("cholesky", "cg"):
                first, again, diag = one(lin, X, y, Xtest, solver, noise, args)
                b = best.setdefault(solver, [first, again, diag])
                b[0], b[1], b[2] = min(b[0], first), min(b[1], again), diag
        row = dict(
            N=n,
            cholesky_first_s=best["cholesky"][0],
            cholesky_again_s=best["cholesky"][1],
            cg_first_s=best["cg"][0],
            cg_again_s=best["cg"][1],
            cg_iterations=best["cg"][2].iterations,
            load=os.getloadavg()[0],
        )
        rows.append(row)
        print(
            f"N={n}: cholesky first {row['cholesky_first_s']:.2f}s again "
            f"{row['cholesky_again_s']:.2f}s | cg first {row['cg_first_s']:.2f}s again "
            f"{row['cg_again_s']:.2f}s ({row['cg_iterations']} it.) | load {row['load']:.2f}",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
