"""CG convergence on a trained network's NTK, one curve per preconditioner (a PNG).

The problem of ``bench_precond.py`` (26-128-128-1 tanh MLP trained on ``diamonds``,
P = 20,097), at ``--n`` held-out rows, σ² = 1, s² = ``--ratio`` × mean diag K: relative
residual of CG against the iteration for no preconditioner, gpytorch's pivoted Cholesky,
randomized Nyström, the Fisher range finder (``kronecker=False``), the default Fisher
preconditioner (Kronecker eigen-directions) and, as the reference, the exact top-k
eigenvectors of K (dense ``eigh``), all at rank ``--rank``. The legend gives the set-up seconds.

Usage::

    python benchmarks/plot_precond.py --csv .benchdata/diamonds.csv --out docs/_static/precond_convergence.png
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precond import (  # noqa: E402
    TRAIN_ROWS,
    gpytorch_pivoted_cholesky,
    shuffled_diamonds,
    train_network,
)

from pyro_ntk import Linearization  # noqa: E402
from pyro_ntk.preconditioners import (  # noqa: E402
    EigenPreconditioner,
    FisherPreconditioner,
    NystromPreconditioner,
)
from pyro_ntk.solvers import conjugate_gradient  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--ratio", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--train-steps", type=int, default=4000)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--out", default="precond_convergence.png")
    args = ap.parse_args(argv)
    dtype, device = torch.float64, torch.device("cpu")
    Xall, yall = shuffled_diamonds(args.csv, dtype)
    net = train_network(Xall[:TRAIN_ROWS], yall[:TRAIN_ROWS], args.train_steps, device, dtype)
    lin = Linearization(net)
    X = Xall[TRAIN_ROWS : TRAIN_ROWS + args.n]
    with torch.no_grad():
        b = (yall[TRAIN_ROWS : TRAIN_ROWS + args.n] - net(X).squeeze(-1)).unsqueeze(-1)
    s2 = args.ratio * float(lin.ntk_diag(X).mean())
    k = args.rank

    def timed(make):
        start = time.perf_counter()
        closure = make()
        return closure, time.perf_counter() - start

    def exact():
        ev, V = torch.linalg.eigh(lin.ntk_dense(X))
        return EigenPreconditioner(V[:, -k:], ev[-k:]).solve_closure(1.0, s2)

    contenders = {
        "none": (None, 0.0),
        f"pivoted Cholesky k={k} (gpytorch)": timed(
            lambda: gpytorch_pivoted_cholesky(lin, X, k, s2)
        ),
        f"Nyström k={k}": timed(
            lambda: NystromPreconditioner(lin, X, rank=k).build().solve_closure(1.0, s2)
        ),
        "Fisher range finder": timed(
            lambda: (
                FisherPreconditioner(lin, X, rank=k, kronecker=False).build().solve_closure(1.0, s2)
            )
        ),
        "Fisher, Kronecker (default)": timed(
            lambda: FisherPreconditioner(lin, X, rank=k).build().solve_closure(1.0, s2)
        ),
        f"exact top-{k} eigenvectors (reference)": timed(exact),
    }
    fig, ax = plt.subplots(figsize=(10.5, 4.5))
    for name, (closure, seconds) in contenders.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, diag = conjugate_gradient(
                lambda V: lin.ntk_mvm(X, None, V) + s2 * V,
                b,
                preconditioner=closure,
                tol=args.tol,
                max_iter=3000,
                check_every=1,
            )
        hist = diag.residual_history
        style = ":" if "reference" in name else "-"
        ax.semilogy(
            range(1, len(hist) + 1),
            hist,
            style,
            label=f"{name}: {diag.iterations} it., set-up {seconds:.2f} s",
        )
        print(f"{name:45s} iterations {diag.iterations:5d}  set-up {seconds:6.2f} s", flush=True)
    ax.axhline(args.tol, color="k", lw=0.8)
    ax.set(
        xscale="log",
        xlabel="CG iteration",
        ylabel="relative residual",
        title=f"NTK of a trained MLP (P = {lin.num_params:,}), N = {args.n}, "
        f"s² = {args.ratio:g} × mean diag K",
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
