"""CG escalation on a badly conditioned NTK system: what each step does, measured.

Trains the 1-32-32-1 tanh MLP of ``bench_precision.py`` (float64, P = 1153, N = 200), then
solves ``(K + s² I) x = y − f(X)`` on the matrix-free path (:class:`pyro_ntk.ntk_system.
NTKSystem`, ``solver="cg"``) with a deliberately low ``max_cg_iterations`` and tiny noise,
and prints every escalation attempt (:attr:`SolverDiagnostics.attempts`) with the error of
the returned solution against a dense float64 solve on an independently built K
(:func:`pyro_ntk.testing.reference_ntk`). The marginal likelihood path (linear_operator's
mBCG + SLQ, escalated the same way) is evaluated on the same systems for comparison.

Run: ``.venv/bin/python benchmarks/bench_escalation.py`` (well under a minute on one core).
"""

from __future__ import annotations

import math
import warnings

import torch
from bench_precision import train

from pyro_ntk import Linearization, LinearizedNetwork
from pyro_ntk.gp import NTKSystem
from pyro_ntk.options import SolverOptions
from pyro_ntk.testing import reference_ntk


def main() -> None:
    torch.set_num_threads(1)
    net, X, y = train()
    lin = Linearization(net)
    N = X.shape[0]
    K = reference_ntk(net, X)
    mbar = float(K.diagonal().mean())
    eig = torch.linalg.eigvalsh(K)
    r = (y - lin(X).squeeze(-1)).unsqueeze(-1)
    print(f"1-32-32-1 tanh MLP, trained; P = {lin.num_params}, N = {N}, mean diag K = {mbar:.3g}")
    print(
        f"eigenvalues of K: largest {float(eig[-1]):.3g}, 10th {float(eig[-10]):.3g}, 30th {float(eig[-30]):.3g}"
    )
    configs = [
        # (s² / mean diag, preconditioner, rank, max_cg_iterations)
        (1e-3, "fisher", 10, 10),
        (1e-5, "fisher", 10, 10),
        (1e-7, "fisher", 10, 10),
        (1e-7, None, 10, 10),
        (1e-9, "fisher", 5, 5),
    ]
    for rel_noise, kind, rank, its in configs:
        noise = torch.tensor(rel_noise * mbar, dtype=torch.float64)
        A = K + noise * torch.eye(N, dtype=torch.float64)
        want = torch.linalg.solve(A, r)
        cond = float(eig[-1] + noise) / float(eig[0].clamp_min(0) + noise)
        sysm = NTKSystem(
            lin, X,
            options=SolverOptions(solver="cg", preconditioner=kind, preconditioner_rank=rank, max_cg_iterations=its, cg_tolerance=1e-6),
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = sysm.solve(r, torch.tensor(1.0, dtype=torch.float64), False, noise)
        err = float((x - want).norm() / want.norm())
        d = sysm.last_solve
        print(
            f"\ns² = {rel_noise:.0e}·m̄, κ ≈ {cond:.1e}, preconditioner {kind} k = {rank}, "
            f"max_cg_iterations {its}, tol 1e-6: {len(caught)} warning(s); "
            f"returned {d.method}, residual {d.relative_residual:.1e}, "
            f"error vs dense {err:.1e}, total {d.solve_seconds + d.setup_seconds:.2f} s"
        )
        for a in d.attempts:
            print(f"   {a}  [{a.seconds:.3f} s]")
        # the marginal likelihood on the same system: mBCG + SLQ, escalated the same way
        dist = LinearizedNetwork(
            lin, X, variance=1.0, mean="zero", jitter=0.0, noise=noise,
            options=SolverOptions(solver="cg", preconditioner=kind, preconditioner_rank=rank, max_cg_iterations=its, cg_tolerance=1e-6),
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lp = float(dist.log_prob(r))
        L = torch.linalg.cholesky(A)
        exact = float(
            -0.5 * (r.T @ torch.cholesky_solve(r, L)).squeeze()
            - torch.log(L.diagonal()).sum()
            - 0.5 * N * math.log(2 * math.pi)
        )
        steps = [
            f"{a.step} ({a.method}, {a.preconditioner} k={a.rank}, ≤{a.max_iter} its, "
            f"residual {a.relative_residual:.1e})"
            for a in dist.system.last_log_prob.attempts
        ]
        print(f"   log_prob: {lp:.6g} vs exact {exact:.6g}; {len(caught)} warning(s); {steps}")


if __name__ == "__main__":
    main()
