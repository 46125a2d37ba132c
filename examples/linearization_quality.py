r"""How close is the linearized network to the fine-tuned one? (Maddox et al., 2021).

The first finding of the paper, reproduced on the sine family.

A 1-40-40-1 tanh MLP is trained on the source task :math:`y = \sin x`. Target tasks
:math:`y = \sin(x + \varphi)` move away from the source as the phase shift φ grows. On each
target, 20 noisy points are fitted in two ways:

* **linearized network** (NTK-GP): :class:`pyro_ntk.NTKGPRegression`, noise s² and variance
  σ² fitted by :func:`pyro_ntk.fit`; its posterior mean is the linearized network
  :math:`f(x;\theta^*) + J(x)\,\delta` at the MAP weights change
  :math:`\delta = \sigma^2 J(X)^\top (\sigma^2 K_{XX} + s^2 I)^{-1}(y - f(X;\theta^*))`;
* **fine-tuned network**: a copy of the network trained on the same points by Adam
  (full batch, lr 1e-3, 1000 steps).

Printed per φ: the RMSE between the two prediction curves on a grid of 200 inputs in
[-5, 5], the RMSE of each against the noise-free target, and the relative distances
:math:`\|\theta_{ft} - \theta^*\| / \|\theta^*\|` and :math:`\|\delta\| / \|\theta^*\|`.
While the target is close to the source, the two predictors nearly coincide and both weight
changes are small; as φ grows, fine-tuning travels further and the two part ways. The figure,
``OUT_DIR/linearization_quality.png`` (default ``outputs/``), plots these RMSEs against φ and,
for φ = 1, the two predictors with the NTK-GP's 95 % band
(:func:`pyro_ntk.plot.predictive_bands`).

Run: ``python examples/linearization_quality.py [--out-dir DIR] [--quick] [--no-progress]``.
``--quick`` trains the source network for 1000 Adam steps instead of 3000 and fits three
targets (φ = 0.25, 1, 2) instead of six (a few seconds; its figures differ from the
documented ones).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from torch.nn.utils import parameters_to_vector  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pyro_ntk import NTKGPRegression, fit  # noqa: E402
from pyro_ntk.datasets import SineTask  # noqa: E402
from pyro_ntk.demo import make_network, run_settings, train_mse  # noqa: E402
from pyro_ntk.options import SolverOptions  # noqa: E402
from pyro_ntk.plot import predictive_bands  # noqa: E402

FULL = {"source_steps": 3000, "phases": (0.1, 0.25, 0.5, 1.0, 1.5, 2.0)}
QUICK = {"source_steps": 1000, "phases": (0.25, 1.0, 2.0)}
SHOWN = 1.0  # the phase whose curves are drawn


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean().sqrt())


def linearized_fit(net, X, y, progress: bool = False):
    """NTK-GP with s², σ² fitted by ``fit``; returns the model and the MAP weight change δ (P,)."""
    gp = NTKGPRegression(X, y, net, options=SolverOptions(solver="cholesky"))
    fit(gp, progress=progress, desc="NTK-GP: fitting s2 and sigma2")
    lin = gp.linearization
    s2, v = gp.noise.detach(), gp.variance.detach()
    A = v * lin.ntk_dense(X) + (s2 + gp.jitter) * torch.eye(X.shape[0])
    alpha = torch.linalg.solve(A, y - lin(X).squeeze(-1))
    delta = v * lin.vjp(X, alpha.unsqueeze(-1))
    return gp, delta


def main(
    quick: bool = False,
    out_dir: str = "outputs",
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = 1,
):
    """Run the experiment; returns a dict of the printed figures and the figure's path.

    Runs in float64 with ``num_threads`` threads and Pyro's module-local parameters (one GP
    model per target in one process); all are restored afterwards.
    """
    with run_settings(num_threads):
        return _run(QUICK if quick else FULL, out_dir, seed, progress)


def _run(sizes: dict, out_dir: str, seed: int, progress: bool):
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    n_source, n_target, tune_steps, phases = 400, 20, 1000, sizes["phases"]

    Xs, ys = SineTask(1.0, 0.0).sample(n_source, seed=seed + 1)
    net = make_network("sine", 1)  # 1-40-40-1 tanh MLP
    source_mse = train_mse(net, net.parameters(), Xs, ys, sizes["source_steps"], 1e-2,
                           "training the source network", progress)  # fmt: skip
    theta = parameters_to_vector(net.parameters()).detach()
    print(
        f"source network: y = sin(x), {n_source} points, training MSE {source_mse:.2e}, "
        f"||theta*|| = {float(theta.norm()):.2f} ({theta.numel()} parameters)"
    )
    grid = torch.linspace(-5, 5, 200).unsqueeze(-1)
    rows, curves = [], {}
    for phi in tqdm(phases, desc="target tasks", disable=not progress, leave=False):
        task = SineTask(1.0, phi)
        X, y = task.sample(n_target, seed=seed + 2)
        gp, delta = linearized_fit(net, X, y, progress)
        with torch.no_grad():
            lin_mean, lin_var = gp(grid, noiseless=False)
        tuned = copy.deepcopy(net)
        train_mse(tuned, tuned.parameters(), X, y, tune_steps, 1e-3, "fine-tuning a copy", progress)
        with torch.no_grad():
            ft_mean = tuned(grid).squeeze(-1)
        theta_ft = parameters_to_vector(tuned.parameters()).detach()
        truth = task(grid)
        rows.append(
            {
                "phase": phi,
                "lin_vs_ft": rmse(lin_mean, ft_mean),
                "lin_vs_truth": rmse(lin_mean, truth),
                "ft_vs_truth": rmse(ft_mean, truth),
                "source_vs_truth": rmse(net(grid).squeeze(-1).detach(), truth),
                "ft_distance": float((theta_ft - theta).norm() / theta.norm()),
                "lin_distance": float(delta.norm() / theta.norm()),
            }
        )
        curves[phi] = (truth, lin_mean, lin_var, ft_mean, X, y)

    print(
        f"\n{n_target} target points per task; RMSE on 200 grid points in [-5, 5]; "
        "distances relative to ||theta*||"
    )
    head = (
        f"{'phase':>6}{'lin vs ft':>11}{'lin vs truth':>14}{'ft vs truth':>13}"
        f"{'source vs truth':>17}{'|θft-θ*|':>10}{'|δ|':>8}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['phase']:>6.2f}{r['lin_vs_ft']:>11.4f}{r['lin_vs_truth']:>14.4f}"
            f"{r['ft_vs_truth']:>13.4f}{r['source_vs_truth']:>17.4f}"
            f"{r['ft_distance']:>10.4f}{r['lin_distance']:>8.4f}"
        )

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "linearization_quality.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 4.4))
    ph = [r["phase"] for r in rows]
    ax1.plot(ph, [r["lin_vs_ft"] for r in rows], "o-", color="C2", label="linearized vs fine-tuned")
    ax1.plot(ph, [r["lin_vs_truth"] for r in rows], "s--", color="C0", label="linearized vs target")
    ax1.plot(ph, [r["ft_vs_truth"] for r in rows], "^--", color="C3", label="fine-tuned vs target")
    ax1.set_xlabel("phase shift φ of the target (source: φ = 0)", fontsize=10)
    ax1.set_ylabel("RMSE between the curves", fontsize=10)
    ax1.set_ylim(0, 1.5 * max(max(r["lin_vs_truth"], r["ft_vs_truth"]) for r in rows))
    ax1.legend(fontsize=9, loc="upper left")
    ax1.set_title("the two adaptations, by distance from the source", fontsize=10)
    shown = SHOWN if SHOWN in curves else phases[-1]
    truth, lin_mean, lin_var, ft_mean, X, y = curves[shown]
    ax2.plot(grid.squeeze(-1), net(grid).squeeze(-1).detach(), color="0.6", lw=1, label="source")
    ax2.plot(grid.squeeze(-1), ft_mean, "C3", lw=1.2, label="fine-tuned")
    predictive_bands(grid, lin_mean, lin_var, y=truth, x_train=X, y_train=y, ax=ax2,
                     label="linearized", band_label="linearized: 95% band",
                     reference_label="target")  # fmt: skip
    ax2.set_ylim(-2.9, 1.6)
    ax2.legend(fontsize=9, loc="lower center", ncol=2)
    ax2.set_title(f"target φ = {shown:g}: the two predictors", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"figure: {path}  ({time.perf_counter() - t0:.1f} s)")
    return {"rows": rows, "figure": path}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="outputs", help="where linearization_quality.png goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer steps and targets: seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    main(quick=args.quick, out_dir=args.out_dir, seed=args.seed, progress=not args.no_progress)
