"""Rank-k preconditioners on several trained networks, against the exact top-k eigenvectors.

For each network (trained on ``diamonds`` like ``bench_precond.py``) the NTK of ``--n``
held-out rows is formed densely (structured engine) and ``eigh`` gives the best rank-k
eigen-form there is ("exact top-k"); CG iterations (relative residual ``--tol``, exact and
load-independent) are reported for it, the Fisher preconditioner's Kronecker default, a larger
Kronecker pool, the range finder (half of the inputs, and ⅛) and Nyström, at
s² = 1e-2 and 1e-3 × mean diag K.

Usage::

    python benchmarks/bench_precond_networks.py --n 3000 --csv .benchdata/diamonds.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precond import TRAIN_ROWS, shuffled_diamonds  # noqa: E402

from pyro_ntk import Linearization  # noqa: E402
from pyro_ntk.preconditioners import FisherPreconditioner, NystromPreconditioner  # noqa: E402
from pyro_ntk.solvers import conjugate_gradient  # noqa: E402

NETWORKS = [  # (activation, Adam steps, width)
    (nn.Tanh, 300, 128),
    (nn.ReLU, 2000, 128),
    (nn.Tanh, 2000, 64),
]


def train(X, y, act, steps: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(X.shape[1], width), act(), nn.Linear(width, width), act(), nn.Linear(width, 1)
    ).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (512,), generator=gen)
        opt.zero_grad()
        (net(X[idx]).squeeze(-1) - y[idx]).square().mean().backward()
        opt.step()
    return net


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    Xall, yall = shuffled_diamonds(args.csv, torch.float64)
    X = Xall[TRAIN_ROWS : TRAIN_ROWS + args.n]
    k = args.rank
    variants = {
        "Kronecker (default)": dict(),
        "Kronecker pool 1000": dict(pool=1000),
        "range finder (half)": dict(kronecker=False),
        "range finder 1/8": dict(kronecker=False, subsample=1 / 8),
    }
    for act, steps, width in NETWORKS:
        net = train(Xall[:TRAIN_ROWS], yall[:TRAIN_ROWS], act, steps, width)
        with torch.no_grad():
            b = (yall[TRAIN_ROWS : TRAIN_ROWS + args.n] - net(X).squeeze(-1)).unsqueeze(-1)
        lin = Linearization(net, implementation="structured")
        K = lin.ntk_dense(X)
        ev, V = torch.linalg.eigh(K)
        forms = {"exact top-k": (V[:, -k:], ev[-k:])}
        for name, opts in variants.items():
            eig, _ = FisherPreconditioner(lin, X, rank=k, **opts).build().eigenform()
            forms[name] = (eig.U, eig.d)
        eig, _ = NystromPreconditioner(lin, X, rank=k).build().eigenform()
        forms["Nyström"] = (eig.U, eig.d)
        for ratio in (1e-2, 1e-3):
            s2 = ratio * float(K.diagonal().mean())
            A = K + s2 * torch.eye(K.shape[0], dtype=K.dtype)
            row = {}
            for name, (U, d) in forms.items():
                coef = (d / (d + s2)).unsqueeze(-1)

                def M(R, U=U, coef=coef, s2=s2):
                    return (R - U @ (coef * (U.T @ R))) / s2

                _, diag = conjugate_gradient(A, b, preconditioner=M, tol=args.tol, max_iter=5000)
                row[name] = diag.iterations
            print(
                f"{act.__name__} {width}-{width}, {steps} steps, s2={ratio:g}m: {row}", flush=True
            )


if __name__ == "__main__":
    main()
