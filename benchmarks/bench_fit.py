"""Hyperparameter fits of the NTK Gaussian process, side by side, at N = 30, 300, 3000.

Problem: an MLP 4-64-64-1 (tanh, P = 4,545) trained on a source task (y = sin(x·w) + 0.3 x₁²,
2,000 points, Adam); the target task draws N inputs from a shifted Gaussian and targets from
the linearized network itself, ``y = f(X; θ*) + J(X) δ + ε`` with ``δ ~ N(0, σ² I)``, σ² = 0.3,
and ``ε ~ N(0, s²)``, s² = 0.1, so the true hyperparameters are known. Contenders, each in
the same process, timed from the model's construction to fitted hyperparameters:

- ``fit``: :class:`pyro_ntk.NTKGPRegression` with :func:`pyro_ntk.infer.fit` (its defaults);
- ``gp.util.train``: the same model with Pyro's ``gp.util.train`` defaults (Adam, lr 0.01,
  1000 steps);
- ``dense reference``: a hand-written exact marginal likelihood, ``K = lin.ntk_dense(X)``
  once, Cholesky of ``σ²K + s²I`` per evaluation, L-BFGS (strong Wolfe) on ``log σ², log s²``
  until the gradient is below 1e-9 — the optimum the others are measured against;
- ``RBF + fit``: Pyro's ``GPRegression`` with an RBF kernel and the network as mean
  function, fitted by the same ``fit`` (another model: its values are not comparable).

Every contender starts from the same data-aware values
(:func:`pyro_ntk.gp.initial_hyperparameters`). The loss is the negative log marginal
likelihood divided by N; seconds at N ≤ 300 are the minimum of three runs. ``Δloss`` is
the relative gap to the reference's loss; ``Δσ²`` and ``Δs²`` the relative gaps of the
fitted values.

Usage::

    python benchmarks/bench_fit.py            # N = 30, 300, 3000
    python benchmarks/bench_fit.py --quick    # N = 30, 300
    python benchmarks/bench_fit.py --write    # also replace "Hyperparameter fit" in RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import pyro
import pyro.contrib.gp as gp
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_section  # noqa: E402

from pyro_ntk import Linearization, NTKGPRegression  # noqa: E402
from pyro_ntk.gp import initial_hyperparameters  # noqa: E402
from pyro_ntk.infer import fit  # noqa: E402

TRUE_VARIANCE, TRUE_NOISE = 0.3, 0.1
REPEATS = 3  # timings at N ≤ 300: the minimum over this many runs


# ---------------------------------------------------------------------------- problem
def trained_network(seed: int = 0) -> nn.Module:
    """MLP 4-64-64-1 trained on the source task (float64, seeded, one thread: the same weights every run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded reductions round differently from run to run
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    net = net.double()
    X = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, generator=g, dtype=torch.float64)
    y = torch.sin(X @ w) + 0.3 * X[:, 0] ** 2
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(800):
        opt.zero_grad()
        (net(X).squeeze(-1) - y).square().mean().backward()
        opt.step()
    torch.set_num_threads(threads)
    return net.eval()


def target_task(lin: Linearization, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N target points drawn from the linearized network with σ², s² known."""
    g = torch.Generator().manual_seed(seed)
    X = 0.5 + torch.randn(N, 4, generator=g, dtype=torch.float64)
    delta = math.sqrt(TRUE_VARIANCE) * torch.randn(lin.num_params, generator=g, dtype=X.dtype)
    with torch.no_grad():
        f = lin(X) + lin.jvp(X, delta)
    noise = math.sqrt(TRUE_NOISE) * torch.randn(N, generator=g, dtype=X.dtype)
    return X, f.squeeze(-1) + noise


# ---------------------------------------------------------------------------- contenders
def initial_values(lin: Linearization, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        return initial_hyperparameters(y - lin(X).squeeze(-1), lin.ntk_diag(X))


def with_fit(lin, X, y, init) -> dict:
    noise, variance = init
    model = NTKGPRegression(X, y, lin, noise=noise, variance=variance)
    result = fit(model, progress=False)
    return dict(
        steps=result.steps,
        loss=result.losses[-1] / len(y),
        variance=float(model.variance.detach()),
        noise=float(model.noise.detach()),
        converged=result.converged,
    )


def with_train(lin, X, y, init) -> dict:
    noise, variance = init
    model = NTKGPRegression(X, y, lin, noise=noise, variance=variance)
    with pyro.get_param_store().scope():
        losses = gp.util.train(model)
    return dict(
        steps=len(losses),
        loss=exact_loss(lin, X, y, float(model.variance.detach()), float(model.noise.detach())),
        variance=float(model.variance.detach()),
        noise=float(model.noise.detach()),
        converged=None,
    )


def dense_reference(lin, X, y, init) -> dict:
    """Exact −log p(y)/N by Cholesky, L-BFGS on log-parameters to a 1e-9 gradient."""
    noise, variance = init
    with torch.no_grad():
        K, r = lin.ntk_dense(X), y - lin(X).squeeze(-1)
    eye = torch.eye(len(y), dtype=K.dtype)
    logs = torch.tensor([math.log(variance), math.log(noise)], dtype=K.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [logs], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )  # fmt: skip
    evaluations = 0

    def loss() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad()
        v, s = logs.exp()
        L = torch.linalg.cholesky(v * K + s * eye)
        a = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
        value = 0.5 * (r @ a) + L.diagonal().log().sum() + 0.5 * len(r) * math.log(2 * math.pi)
        value = value / len(r)
        value.backward()
        return value

    opt.step(loss)
    v, s = logs.detach().exp().tolist()
    return dict(steps=evaluations, loss=exact_loss(lin, X, y, v, s), variance=v, noise=s)


def rbf_fit(lin, X, y, init) -> dict:
    noise, _ = init
    kernel = gp.kernels.RBF(input_dim=X.shape[1], lengthscale=torch.ones(X.shape[1], dtype=X.dtype))
    model = gp.models.GPRegression(
        X, y, kernel, mean_function=lambda Z: lin(Z).squeeze(-1).detach(),
        noise=torch.tensor(noise, dtype=X.dtype),
    )  # fmt: skip
    result = fit(model, progress=False)
    return dict(
        steps=result.steps,
        loss=result.losses[-1] / len(y),
        variance=float(model.kernel.variance.detach()),
        noise=float(model.noise.detach()),
        converged=result.converged,
    )


def exact_loss(lin, X, y, variance: float, noise: float) -> float:
    """−log p(y)/N at the given values (float64 MultivariateNormal)."""
    with torch.no_grad():
        K, m = lin.ntk_dense(X), lin(X).squeeze(-1)
        cov = variance * K + noise * torch.eye(len(y), dtype=K.dtype)
        dist = torch.distributions.MultivariateNormal(m, covariance_matrix=cov)
        return float(-dist.log_prob(y) / len(y))


CONTENDERS = {
    "dense reference": dense_reference,
    "fit": with_fit,
    "gp.util.train": with_train,
    "RBF + fit": rbf_fit,
}


# ---------------------------------------------------------------------------- main
def run(sizes: list[int], seed: int) -> list[dict]:
    torch.set_default_dtype(torch.float64)
    net = trained_network(seed)
    rows = []
    for N in sizes:
        X, y = target_task(Linearization(net), N, seed + N)
        ref = None
        for name, contender in CONTENDERS.items():
            best = math.inf
            for _ in range(REPEATS if N <= 300 else 1):  # small N: min of a few (ms timings)
                lin = Linearization(net)  # a fresh one each: no cached products shared
                pyro.clear_param_store()
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = contender(lin, X, y, initial_values(lin, X, y))
                best = min(best, time.perf_counter() - t0)
            out.update(N=N, method=name, seconds=best)
            out["warnings"] = len(caught)
            if name == "dense reference":
                ref = out
            rows.append(out | {"ref": ref})
            print(f"N={N:5d} {name:16s} {out['seconds']:8.2f}s steps={out['steps']}", flush=True)
    return rows


def factor_costs(net: nn.Module, N: int, seed: int) -> str:
    """One Cholesky against one eigendecomposition of σ²K + s²I at N (the fit's one-off cost)."""
    lin = Linearization(net)
    X, _ = target_task(lin, N, seed + N)
    with torch.no_grad():
        A = TRUE_VARIANCE * lin.ntk_dense(X) + TRUE_NOISE * torch.eye(N, dtype=X.dtype)
    seconds = {}
    for name, op in (("cholesky", torch.linalg.cholesky), ("eigh", torch.linalg.eigh)):
        t0 = time.perf_counter()
        op(A)
        seconds[name] = time.perf_counter() - t0
    return (
        f"At N = {N}: one Cholesky of σ²K + s²I {seconds['cholesky']:.2f} s, one `eigh` "
        f"{seconds['eigh']:.2f} s ({seconds['eigh'] / seconds['cholesky']:.0f} Cholesky "
        "factorizations); `fit` makes the eigendecomposition once, the reference a Cholesky"
        " and its backward pass at every evaluation."
    )


def table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        ref, comparable = r["ref"], r["method"] != "RBF + fit"

        def gap(key: str, r=r, ref=ref, comparable=comparable) -> str:
            if not comparable or r is ref:
                return "—"
            return f"{abs(r[key] - ref[key]) / abs(ref[key]):.1e}"

        body.append([
            r["N"], r["method"], f"{r['seconds']:.2f}",
            "1.00" if r is ref else f"{r['seconds'] / ref['seconds']:.2f}",
            r["steps"], f"{r['loss']:.6f}", f"{r['variance']:.4g}", f"{r['noise']:.4g}",
            gap("loss"), gap("variance"), gap("noise"),
            {None: "—", True: "yes", False: "no"}[r.get("converged")], r["warnings"],
        ])  # fmt: skip
    return markdown_table(
        ["N", "method", "s", "× ref", "steps", "loss/N", "σ²", "s²", "Δloss", "Δσ²", "Δs²",
         "converged", "warnings"],
        body,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 30, 300 only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write RESULTS.md's section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [30, 300] if args.quick else [30, 300, 3000]
    rows = run(sizes, args.seed)
    text = table(rows) + "\n\n" + factor_costs(trained_network(args.seed), sizes[-1], args.seed)
    print(text)
    if args.write:
        command = "python benchmarks/bench_fit.py" + (" --quick" if args.quick else "")
        body = (
            f"{machine()}, `{command}`. True σ² = {TRUE_VARIANCE},"
            f" s² = {TRUE_NOISE}; steps: optimizer steps (L-BFGS: loss evaluations for the"
            " reference). Seconds include building the kernel. Both NTKGPRegression rows take"
            " the spectral route of the dense marginal likelihood (one eigendecomposition, then"
            " O(N) per step), `gp.util.train`'s 1000 Adam steps included.\n\n" + text
        )
        write_section("Hyperparameter fit", body)


if __name__ == "__main__":
    main()
