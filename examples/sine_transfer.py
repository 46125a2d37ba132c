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
targets (mean over points) and the coverage of the 95% predictive interval. A PNG of the
predictive bands is written to ``out_dir``.

Run: ``python examples/sine_transfer.py [--out-dir DIR] [--smoke-test]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pyro_ntk import NTKGPRegression, fit  # noqa: E402
from pyro_ntk.datasets import sample_sine_tasks  # noqa: E402
from pyro_ntk.demo import make_network, run_settings  # noqa: E402
from pyro_ntk.options import SolverOptions  # noqa: E402


def train_network(net: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int, lr: float):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (net(X).squeeze(-1) - y).square().mean()
        loss.backward()
        opt.step()
    return float(loss.detach())


def gaussian_scores(mean, var, y):
    """RMSE, mean NLL and 95% coverage of N(mean, var) for targets y."""
    rmse = float((mean - y).square().mean().sqrt())
    nll = float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean).square() / var).mean())
    half = 1.959963984540054 * var.sqrt()
    coverage = float(((y >= mean - half) & (y <= mean + half)).double().mean())
    return rmse, nll, coverage


def fit_ntk_gp(net, Xa, ya, progress: bool):
    """NTK-GP on the adaptation points; s² and σ² start from the data and are fitted by ``fit``."""
    gp = NTKGPRegression(Xa, ya, net, options=SolverOptions(solver="cholesky"))
    return gp, fit(gp, progress=progress, desc="NTK-GP: fitting s2 and sigma2")


def main(
    smoke_test: bool = False,
    out_dir: str = ".",
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = 1,
):
    """Run the experiment; returns a dict of the printed figures.

    ``num_threads`` sets torch's intra-op threads for the run (restored afterwards): these
    problems are tiny (10×10 Cholesky, 1,761 parameters) and one thread avoids the
    synchronisation cost of several on a shared CPU.
    """
    with run_settings(num_threads, module_local_params=False):
        return _run(smoke_test, out_dir, seed, progress)


def _run(smoke_test: bool, out_dir: str, seed: int, progress: bool):
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    t0 = time.perf_counter()

    n_source, n_adapt, n_test = (100, 10, 100) if smoke_test else (400, 10, 500)
    source_steps, tune_steps = (200, 50) if smoke_test else (3000, 500)

    source_task, target_task = sample_sine_tasks(2, seed=seed)
    Xs, ys = source_task.sample(n_source, seed=seed + 1)
    Xa, ya = target_task.sample(n_adapt, seed=seed + 2)
    Xt, yt = target_task.sample(n_test, seed=seed + 3)

    net = make_network("sine", 1)  # 1-40-40-1 tanh MLP
    source_mse = train_network(net, Xs, ys, source_steps, lr=1e-2)

    # --- NTK-GP adaptation (the network itself is never trained here)
    gp, result = fit_ntk_gp(net, Xa, ya, progress=progress)
    gp_mean, gp_var = (t.detach() for t in gp(Xt, noiseless=False))
    gp_scores = gaussian_scores(gp_mean, gp_var, yt)

    # --- fine-tuning a copy of the same network
    tuned = copy.deepcopy(net)
    train_mse = train_network(tuned, Xa, ya, tune_steps, lr=1e-2)
    noise_ft = max(train_mse, 1e-6)  # ML noise variance on the 10 adaptation points
    with torch.no_grad():
        ft_mean = tuned(Xt).squeeze(-1)
    ft_scores = gaussian_scores(ft_mean, torch.full_like(ft_mean, noise_ft), yt)

    with torch.no_grad():
        src_mean = net(Xt).squeeze(-1)
    src_noise = float((net(Xa).squeeze(-1) - ya).square().mean().detach())
    src_scores = gaussian_scores(src_mean, torch.full_like(src_mean, src_noise), yt)

    rows = {
        "source network": src_scores,
        "fine-tuning": ft_scores,
        "NTK-GP": gp_scores,
    }
    print(
        f"source task A={source_task.amplitude:.2f} phi={source_task.phase:.2f} "
        f"(train MSE {source_mse:.2e}); target task A={target_task.amplitude:.2f} "
        f"phi={target_task.phase:.2f}, {n_adapt} adaptation points, {n_test} test points"
    )
    print(
        f"NTK-GP fit: noise s2={float(gp.noise.detach()):.3e}, variance sigma2={float(gp.variance.detach()):.3e}, "
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
        fm = tuned(grid).squeeze(-1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = grid.squeeze(-1).numpy()
    ax.plot(x, target_task(grid).numpy(), "k--", lw=1, label="target task")
    ax.plot(x, net(grid).squeeze(-1).detach().numpy(), color="grey", lw=1, label="source net")
    ax.plot(x, gm.numpy(), "C0", label="NTK-GP mean")
    band = 1.96 * gv.sqrt()
    ax.fill_between(x, (gm - band).numpy(), (gm + band).numpy(), color="C0", alpha=0.25)
    ax.plot(x, fm.numpy(), "C3", label="fine-tuned")
    fband = 1.96 * math.sqrt(noise_ft)
    ax.fill_between(x, (fm - fband).numpy(), (fm + fband).numpy(), color="C3", alpha=0.2)
    ax.scatter(Xa.squeeze(-1).numpy(), ya.numpy(), color="k", zorder=3, label="10 points")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("Sine transfer: 95% predictive bands")
    ax.legend(loc="upper right", fontsize=8)
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
    parser.add_argument("--out-dir", default=".", help="where to write sine_transfer.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, for tests")
    args = parser.parse_args()
    main(smoke_test=args.smoke_test, out_dir=args.out_dir, seed=args.seed)
