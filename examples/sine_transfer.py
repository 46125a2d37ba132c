"""Few-shot transfer on the sine family: NTK-GP adaptation versus fine-tuning.

A 1-40-40-1 tanh MLP is trained on a source sine task (plenty of data). A new target task
of the same family (y = A sin(x + φ)) is then learned from 10 points in two ways:

* **NTK-GP**: :class:`pyro_ntk.NTKGPRegression` with the source network as mean and its
  empirical NTK as kernel; the noise s² and kernel variance σ² are fitted by
  :func:`pyro_ntk.fit` (L-BFGS on the exact marginal likelihood of the 10 points, from
  initial values scaled to the data). Predictions are the exact GP posterior.
* **Fine-tuning**: a *copy* of the source network trained with Adam on the 10 points.
  Its predictive is N(f(x), ŝ²) with ŝ² the noise variance fitted on the same 10 points by
  maximum likelihood, i.e. the mean squared training residual (floored at 1e-6). No
  held-out data is used for either method.
* For reference, the **source network** unchanged, with the same noise rule.

Both are scored on 500 test points of the target task: RMSE, Gaussian NLL of the noisy
targets (mean over points) and the coverage of the 95% predictive interval. The predictive
bands (:func:`pyro_ntk.plot.predictive_bands`) are written to ``OUT_DIR/sine_transfer.png``
(default ``outputs/``).

Run: ``python examples/sine_transfer.py [--out-dir DIR] [--quick] [--no-progress]``.
``--quick`` trains the source network for 1000 Adam steps instead of 3000 and fine-tunes
for 200 instead of 500 (a few seconds; its figures differ from the documented ones).
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

from pyro_ntk import NTKGPRegression, fit  # noqa: E402
from pyro_ntk.datasets import sample_sine_tasks  # noqa: E402
from pyro_ntk.demo import gaussian_scores, make_network, run_settings, train_mse  # noqa: E402
from pyro_ntk.options import SolverOptions  # noqa: E402
from pyro_ntk.plot import predictive_bands  # noqa: E402

FULL = {"source_steps": 3000, "tune_steps": 500}
QUICK = {"source_steps": 1000, "tune_steps": 200}


def fit_ntk_gp(net, Xa, ya, progress: bool):
    """NTK-GP on the adaptation points; s² and σ² start from the data and are fitted by ``fit``."""
    # The targets carry 1 % noise (ρ = 0.01), nearly noise-free: the floor of s² is the
    # default's value, 1e-4 var(y), chosen here on purpose (fit warns when s² ends on a floor
    # it chose by default).
    floor = 1e-4 * float(ya.var())
    gp = NTKGPRegression(Xa, ya, net, options=SolverOptions(solver="cholesky"), noise_floor=floor)
    return gp, fit(gp, progress=progress, desc="NTK-GP: fitting s2 and sigma2")


def main(
    quick: bool = False,
    out_dir: str = "outputs",
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = 1,
):
    """Run the experiment; returns a dict of the printed figures and the figure's path.

    ``num_threads`` sets torch's intra-op threads for the run (restored afterwards): these
    problems are tiny (10×10 Cholesky, 1,761 parameters) and one thread avoids the
    synchronisation cost of several on a shared CPU.
    """
    with run_settings(num_threads, module_local_params=False):
        return _run(QUICK if quick else FULL, out_dir, seed, progress)


def _run(steps: dict, out_dir: str, seed: int, progress: bool):
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    t0 = time.perf_counter()
    n_source, n_adapt, n_test = 400, 10, 500

    source_task, target_task = sample_sine_tasks(2, seed=seed)
    Xs, ys = source_task.sample(n_source, seed=seed + 1)
    Xa, ya = target_task.sample(n_adapt, seed=seed + 2)
    Xt, yt = target_task.sample(n_test, seed=seed + 3)

    net = make_network("sine", 1)  # 1-40-40-1 tanh MLP
    source_mse = train_mse(net, net.parameters(), Xs, ys, steps["source_steps"], 1e-2,
                           "training the source network", progress)  # fmt: skip

    # --- NTK-GP adaptation (the network itself is never trained here)
    gp, result = fit_ntk_gp(net, Xa, ya, progress=progress)
    gp_mean, gp_var = (t.detach() for t in gp(Xt, noiseless=False))
    gp_scores = gaussian_scores(gp_mean, gp_var, yt)

    # --- fine-tuning a copy of the same network
    tuned = copy.deepcopy(net)
    train = train_mse(tuned, tuned.parameters(), Xa, ya, steps["tune_steps"], 1e-2,
                      "fine-tuning a copy", progress)  # fmt: skip
    noise_ft = max(train, 1e-6)  # ML noise variance on the 10 adaptation points
    with torch.no_grad():
        ft_mean = tuned(Xt).squeeze(-1)
        src_mean = net(Xt).squeeze(-1)
        src_noise = float((net(Xa).squeeze(-1) - ya).square().mean())
    ft_scores = gaussian_scores(ft_mean, torch.full_like(ft_mean, noise_ft), yt)
    src_scores = gaussian_scores(src_mean, torch.full_like(src_mean, src_noise), yt)

    rows = {"source network": src_scores, "fine-tuning": ft_scores, "NTK-GP": gp_scores}
    print(
        f"source task A={source_task.amplitude:.2f} phi={source_task.phase:.2f} "
        f"(train MSE {source_mse:.2e}); target task A={target_task.amplitude:.2f} "
        f"phi={target_task.phase:.2f}, {n_adapt} adaptation points, {n_test} test points"
    )
    print(
        f"NTK-GP fit: noise s2={float(gp.noise.detach()):.3e}, "
        f"variance sigma2={float(gp.variance.detach()):.3e}, "
        f"loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f} in {result.steps} "
        f"{result.method} steps"
    )
    print(f"{'method':<16}{'RMSE':>10}{'NLL':>12}{'95% cover':>12}")
    for name, (rmse, nll, cov) in rows.items():
        print(f"{name:<16}{rmse:>10.4f}{nll:>12.3f}{cov:>12.2f}")

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "sine_transfer.png")
    grid = torch.linspace(-5, 5, 200).unsqueeze(-1)
    gm, gv = (t.detach() for t in gp(grid, noiseless=False))
    with torch.no_grad():
        fm, src = tuned(grid).squeeze(-1), net(grid).squeeze(-1)
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    ax.plot(grid.squeeze(-1), src, color="0.55", lw=1, label="source network")
    predictive_bands(grid, fm, torch.full_like(fm, noise_ft), ax=ax, color="C3",
                     label="fine-tuned", band_label="fine-tuned: 95% band")  # fmt: skip
    predictive_bands(
        grid, gm, gv, y=target_task(grid), x_train=Xa, y_train=ya, ax=ax, color="C0",
        label="NTK-GP mean", band_label="NTK-GP: 95% band", reference_label="target task",
    )  # fmt: skip
    ax.set_title(
        f"New sine task from {n_adapt} points: NTK-GP RMSE {gp_scores[0]:.2f}, "
        f"NLL {gp_scores[1]:.2f}; fine-tuning RMSE {ft_scores[0]:.2f}, NLL {ft_scores[1]:.0f}",
        fontsize=10,
    )
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
    order = ["target task", f"{n_adapt} training points", "source network", "NTK-GP mean",
             "NTK-GP: 95% band", "fine-tuned", "fine-tuned: 95% band"]  # fmt: skip
    ax.legend([handles[k] for k in order], order, loc="upper center", bbox_to_anchor=(0.5, -0.15),
              ncol=4, fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"figure: {path}  ({time.perf_counter() - t0:.1f} s)")
    return {
        "scores": rows,
        "noise": float(gp.noise.detach()),
        "variance": float(gp.variance.detach()),
        "losses": result.losses,
        "converged": result.converged,
        "figure": path,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="outputs", help="where sine_transfer.png goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer training steps: seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    main(quick=args.quick, out_dir=args.out_dir, seed=args.seed, progress=not args.no_progress)
