"""Rank-k preconditioners on several trained networks, against the exact top-k eigenvectors.

For each network (trained on ``diamonds`` like ``bench_precond.py``) the NTK of ``--n``
held-out rows is formed densely (structured engine) and ``eigh`` gives the best rank-k
eigen-form there is ("exact top-k"); CG iterations (relative residual ``--tol``, exact and
load-independent) are reported for it, the Fisher preconditioner's Kronecker default, a larger
Kronecker pool, the range finder (half of the inputs, and ⅛) and Nyström, at
s² = 1e-2 and 1e-3 × mean diag K.

``--networks cnn`` runs three convolutional networks instead, trained (cross-entropy, Adam) on
scikit-learn's bundled 8×8 digits (nothing is downloaded), with the GP on their 10 logits at
``--n`` other images (``10·n`` rows; right-hand side one-hot − logits). Besides the exact top-k
and no preconditioner it compares the Fisher preconditioner with Kronecker directions for
every factored layer (the default: K-FAC for convolutions, KFC) against Kronecker directions
for the Linear layers only (the convolutions then go through the range finder) and the range
finder alone; "+ refine" adds one subspace step from the preconditioner's ``k`` function-space
eigenvectors ``U`` (``Q = orth(Jᵀ U)``, Rayleigh–Ritz of ``J Q``: ``k`` K·v-equivalents), and
"Kronecker only + refine" takes ``U`` from the Kronecker directions alone (no range finder:
the step's ``Jᵀ U`` reaches the uncovered parameters too). ``products`` is each set-up's cost
in K·v-equivalents, ``covered`` the share of ``P`` in Kronecker directions.

Usage::

    python benchmarks/bench_precond_networks.py --n 3000 --csv .benchdata/diamonds.csv
    python benchmarks/bench_precond_networks.py --networks cnn --n 300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precond import TRAIN_ROWS, shuffled_diamonds  # noqa: E402

from pyro_ntk import Linearization  # noqa: E402
from pyro_ntk.preconditioners import FisherPreconditioner, NystromPreconditioner  # noqa: E402
from pyro_ntk.preconditioners.kronecker import kronecker_columns, top_eigenpairs  # noqa: E402
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


CNNS = {  # name: (channels of the two convolutions, strided stem)
    "cnn 16-32": (16, 32, False),
    "cnn 32-64": (32, 64, False),
    "cnn stem 32-64": (32, 64, True),
}


def digits(dtype=torch.float64):
    """scikit-learn's 8×8 digits ``(1797, 1, 8, 8)`` in [0, 1], rows in a seeded random order."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    X = torch.as_tensor(images, dtype=dtype).reshape(-1, 1, 8, 8)[perm] / 16.0
    return X, torch.as_tensor(labels)[perm]


def train_cnn(X, y, shape: tuple[int, int, bool], steps: int = 300) -> nn.Module:
    """A digits classifier: two convolutions and a Linear head, trained with Adam.

    Two 3×3 convolutions (2×2 max-pool after each); or, with a strided stem, a 4×4
    stride-2 convolution (3×3 outputs) and a 3×3 one, whose factors the structured engine
    keeps for every layer (no per-example gradients).
    """
    torch.manual_seed(0)
    c1, c2, stem = shape
    if stem:
        layers = [nn.Conv2d(1, c1, 4, stride=2), nn.Tanh(), nn.Conv2d(c1, c2, 3, padding=1)]
        layers += [nn.Tanh(), nn.Flatten(), nn.Linear(c2 * 9, 10)]
    else:
        layers = [nn.Conv2d(1, c1, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)]
        layers += [nn.Conv2d(c1, c2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)]
        layers += [nn.Flatten(), nn.Linear(c2 * 4, 10)]
    net = nn.Sequential(*layers).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
        opt.step()
    return net


def cg_iterations(K, b, forms, tol):
    """CG iterations to ``tol`` on ``K + s² I`` per eigen-form ``(U, d)`` (``None``: plain CG)."""
    for ratio in (1e-2, 1e-3):
        s2 = ratio * float(K.diagonal().mean())
        A = K + s2 * torch.eye(K.shape[0], dtype=K.dtype)
        row = {}
        for name, form in forms.items():
            M = None
            if form is not None:
                U, d = form
                coef = (d / (d + s2)).unsqueeze(-1)

                def M(R, U=U, coef=coef, s2=s2):
                    return (R - U @ (coef * (U.T @ R))) / s2

            _, diag = conjugate_gradient(
                A, b, preconditioner=M, tol=tol, max_iter=5000, check_every=1
            )
            row[name] = diag.iterations
        yield ratio, row


def linear_layers(factors):
    """``layer_factors`` restricted to Linear layers at one position (no convolution)."""

    def restricted(X):
        return [a for a in factors(X) if a.kind == "linear" and a.A[0].shape[1] == 1]

    return restricted


def refine(lin, X, U):
    """One subspace step from function-space vectors ``U (N·O, k)``: ``Q = orth(Jᵀ U)``, ``J Q``.

    The Rayleigh–Ritz top ``k`` of ``J Q``; ``k`` K·v-equivalents (``k`` VJPs and JVPs).
    """
    k = U.shape[1]
    Q = torch.linalg.qr(lin.vjp(X, U.reshape(X.shape[0], -1, k))).Q
    return top_eigenpairs(lin.jvp(X, Q).reshape(-1, k), k)


def run_cnns(args):
    X, y = digits()
    train, gp = slice(0, 1000), slice(1000, 1000 + args.n)
    k = args.rank
    for name, shape in CNNS.items():
        net = train_cnn(X[train], y[train], shape)
        Xg = X[gp]
        with torch.no_grad():
            f = net(Xg)
            acc = float((f.argmax(1) == y[gp]).double().mean())
        b = (nn.functional.one_hot(y[gp], 10).double() - f).reshape(-1, 1)
        lin = Linearization(net, implementation="structured")
        start = time.perf_counter()
        K = lin.ntk_dense(Xg)
        print(f"{name}: dense K {time.perf_counter() - start:.1f} s", flush=True)
        ev, V = torch.linalg.eigh(K)
        forms = {"none": None, "exact top-k": (V[:, -k:], ev[-k:])}
        products, covered = {}, {}
        full = lin.layer_factors
        for variant, linear_only in (
            ("Fisher, Linear-only Kronecker", True),
            ("Fisher (KFC)", False),
        ):
            lin.layer_factors = linear_layers(full) if linear_only else full
            pre = FisherPreconditioner(lin, Xg, rank=k).build()
            kc = kronecker_columns(lin, Xg, None, pool=1)
            covered[variant] = round(float(kc.covered.double().mean()), 3)
            eig, _ = pre.eigenform()
            forms[variant], products[variant] = (eig.U, eig.d), round(pre.products, 1)
            forms[variant + " + refine"] = refine(lin, Xg, eig.U)
            products[variant + " + refine"] = round(pre.products + k, 1)
        lin.layer_factors = full
        kc = kronecker_columns(lin, Xg, None, pool=max(5 * k, 500))
        variant = "Kronecker only + refine"
        forms[variant] = refine(lin, Xg, top_eigenpairs(kc.columns, k)[0])
        products[variant] = round(kc.products + k, 1)
        pre = FisherPreconditioner(lin, Xg, rank=k, kronecker=False).build()
        eig, _ = pre.eigenform()
        forms["range finder"], products["range finder"] = (eig.U, eig.d), round(pre.products, 1)
        layers = [(a.name, a.kind) for a in full(Xg)]
        print(
            f"{name}: P={lin.num_params}, N={args.n}, rows={K.shape[0]}, test acc {acc:.3f}, "
            f"factored layers {layers}, covered {covered}, set-up products {products}",
            flush=True,
        )
        for ratio, row in cg_iterations(K, b, forms, args.tol):
            print(f"  {name}, k={k}, s2={ratio:g}m: {row}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--networks", choices=["mlp", "cnn"], default="mlp")
    args = ap.parse_args(argv)
    if args.networks == "cnn":
        return run_cnns(args)
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
