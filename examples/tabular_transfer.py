"""Transfer on a real table: diabetes progression, younger patients → older patients.

scikit-learn's bundled diabetes table (442 patients, 10 standardized covariates, the target
is disease progression one year later; nothing is downloaded) is split by the ``age``
covariate: a 10-50-50-1 tanh MLP is trained on the patients aged below the median (with
early stopping on a fifth of them), then adapted to the *older* patients from a few of
them, and scored on all the remaining older patients. Four adaptations are compared:

* **NTK-GP**: :class:`pyro_ntk.NTKGPRegression`, the GP with the network as mean and its
  empirical NTK as kernel; noise s² and variance σ² fitted by :func:`pyro_ntk.fit` (L-BFGS on
  the marginal likelihood, from initial values read off the data);
* **fine-tuning** a copy of the network (Adam, all weights);
* **last layer retrained** (Adam, the other layers frozen);
* **RBF GP** (``pyro.contrib.gp``, ARD lengthscales, fitted by the same ``fit``), which ignores
  the network.

The network baselines predict N(f(x), ŝ²) with ŝ² their mean squared training residual on
the adaptation points (the ML plug-in); a network that interpolates its few points gets a
tiny ŝ², hence a huge NLL and low coverage. No test data are used for any choice. The whole
experiment (source network included) is repeated over several seeds, each seed drawing its
own source initialization and adaptation points; the table gives mean ± sd over seeds of
RMSE, NLL and the coverage of the 95 % interval. The figure,
``OUT_DIR/tabular_transfer.png`` (default ``outputs/``), shows for the first seed the
predicted against the observed outcome of every test patient with 95 % intervals, one panel
per method (:func:`pyro_ntk.plot.predicted_vs_observed_grid`).

The data, split and methods are those of ``python -m pyro_ntk demo --task diabetes``
(imported from :mod:`pyro_ntk.demo`).

Run: ``python examples/tabular_transfer.py [--out-dir DIR] [--num-target N] [--seeds S]
[--quick] [--no-progress]``. ``--quick`` trains each source network for 500 Adam steps
instead of 2000 and fine-tunes for 200 instead of 500 (a few seconds; its figures differ
from the documented ones).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pyro_ntk.demo import (  # noqa: E402
    DemoConfig,
    diabetes_data,
    fine_tune,
    last_layer,
    ntk_gp,
    rbf_gp,
    run_settings,
    source_network,
)
from pyro_ntk.plot import predicted_vs_observed_grid  # noqa: E402

FULL = {"source_steps": 2000, "finetune_steps": 500}
QUICK = {"source_steps": 500, "finetune_steps": 200}
METHODS = ("NTK-GP (pyro_ntk)", "fine-tuning", "last layer retrained", "RBF GP (pyro.contrib.gp)")


def run_seed(cfg: DemoConfig) -> tuple[dict, object, str]:
    """One seed: data split, source network, the four adaptations; returns their Results."""
    pyro.set_rng_seed(cfg.seed)
    data = diabetes_data(cfg)
    net, how = source_network(cfg, data, torch.device("cpu"))
    ntk, gpr = ntk_gp(net, data, cfg)
    ft, _ = fine_tune(net, data, cfg)
    ll, _ = last_layer(net, data, cfg)
    rbf, _ = rbf_gp(net, data, cfg)
    results = {r.method: r for r in (ntk, ft, ll, rbf)}
    return results, data, f"{how}; {ntk.info}"


def _pm(mu: float, sd: float) -> str:
    """``mu ± sd``, in scientific notation when large."""
    return f"{mu:.3f} ± {sd:.2f}" if abs(mu) < 1e3 else f"{mu:.2e} ± {sd:.1e}"


def main(
    quick: bool = False,
    out_dir: str = "outputs",
    seeds: int = 3,
    num_target: int = 20,
    progress: bool = True,
    num_threads: int | None = 1,
):
    """Run the experiment; returns a dict of the printed figures and the figure's path.

    Runs in float64 with ``num_threads`` intra-op threads (tiny networks: one thread avoids
    synchronisation costs on a shared CPU) and Pyro's module-local parameters (several GP
    models in one process); all are restored afterwards.
    """
    with run_settings(num_threads):
        return _run(QUICK if quick else FULL, out_dir, seeds, num_target, progress)


def _run(steps: dict, out_dir: str, seeds: int, num_target: int, progress: bool):
    t0 = time.perf_counter()
    scores = {m: [] for m in METHODS}
    first = None
    for seed in tqdm(range(seeds), desc="seeds", disable=not progress, leave=False):
        cfg = DemoConfig(
            task="diabetes",
            num_target=num_target,
            seed=seed,
            device="cpu",
            cache_dir="",  # train afresh: the example leaves nothing behind
            progress=progress,
            plot=False,
            **steps,
        )
        results, data, info = run_seed(cfg)
        if first is None:
            first = results, data
            tqdm.write(f"task: {data.description}")
        tqdm.write(f"seed {seed}: {info}")
        for m in METHODS:
            r = results[m]
            scores[m].append((r.rmse, r.nll, r.coverage))

    def mean_sd(values):
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    table = {}
    print(f"\nmean ± sd over {seeds} seeds, {num_target} adaptation points (standardized units)")
    print(f"{'method':<28}{'RMSE':>20}{'NLL':>20}{'95% cover':>20}")
    for m in METHODS:
        cols = [mean_sd([s[k] for s in scores[m]]) for k in range(3)]
        table[m] = cols
        print(f"{m:<28}" + "".join(f"{_pm(mu, sd):>20}" for mu, sd in cols))

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tabular_transfer.png")
    results, data = first
    fig = predicted_vs_observed_grid(
        data.y_test, {m: (results[m].mean, results[m].var) for m in METHODS}, level=0.95,
        figsize=(8, 7.8), xlabel="observed outcome", ylabel="predicted mean",
        title=f"Diabetes: adapted to older patients from {num_target} of them; "
        f"{len(data.y_test)} test patients (seed 0, standardized units)",
    )  # fmt: skip
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"figure: {path}  ({time.perf_counter() - t0:.1f} s)")
    return {"table": table, "scores": scores, "figure": path}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="outputs", help="where tabular_transfer.png goes")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (>= 1)")
    parser.add_argument("--num-target", type=int, default=20, help="adaptation points")
    parser.add_argument("--quick", action="store_true", help="fewer training steps: seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    main(quick=args.quick, out_dir=args.out_dir, seeds=args.seeds, num_target=args.num_target,
         progress=not args.no_progress)  # fmt: skip
