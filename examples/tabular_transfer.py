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
RMSE, NLL and the coverage of the 95 % interval. The plot shows predicted against true
values with 95 % error bars for the first seed.

The data, split and methods are those of ``python -m pyro_ntk demo --task diabetes``
(imported from :mod:`pyro_ntk.demo`).

Run: ``python examples/tabular_transfer.py [--out-dir DIR] [--num-target N] [--seeds S]
[--smoke-test]``.
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
    smoke_test: bool = False,
    out_dir: str = ".",
    seeds: int = 3,
    num_target: int = 20,
    progress: bool = True,
    num_threads: int | None = 1,
):
    """Run the experiment; returns a dict of the printed figures.

    Runs in float64 with ``num_threads`` intra-op threads (tiny networks: one thread avoids
    synchronisation costs on a shared CPU) and Pyro's module-local parameters (several GP
    models in one process); all are restored afterwards.
    """
    with run_settings(num_threads):
        return _run(smoke_test, out_dir, seeds, num_target, progress)


def _run(smoke_test: bool, out_dir: str, seeds: int, num_target: int, progress: bool):
    t0 = time.perf_counter()
    steps = (
        dict(source_steps=150, finetune_steps=30)
        if smoke_test
        else dict(source_steps=2000, finetune_steps=500)
    )
    scores = {m: [] for m in METHODS}
    first = None
    for seed in range(seeds):
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
            print(f"task: {data.description}")
        print(f"seed {seed}: {info}")
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
    y = data.y_test.numpy()
    lo, hi = float(y.min()) - 0.5, float(y.max()) + 0.5
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), sharex=True, sharey=True)
    for ax, m in zip(axes, METHODS):
        r = results[m]
        ax.errorbar(
            y,
            r.mean.numpy(),
            yerr=1.959963984540054 * r.var.sqrt().numpy(),
            fmt="o",
            ms=2.5,
            elinewidth=0.6,
            alpha=0.6,
            color="C0",
        )
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_title(f"{m}\nRMSE {r.rmse:.2f}, cover {r.coverage:.2f}", fontsize=9)
        ax.set_xlabel("true (standardized)")
    axes[0].set_ylabel("predicted ± 95%")
    axes[0].set_xlim(lo, hi)
    axes[0].set_ylim(lo - 1, hi + 1)
    fig.suptitle("Diabetes: younger → older patients (seed 0, test patients)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    print(f"figure: {path}  ({time.perf_counter() - t0:.1f} s)")
    return {"table": table, "scores": scores, "figure": path}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=".", help="where to write tabular_transfer.png")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (>= 1)")
    parser.add_argument("--num-target", type=int, default=20, help="adaptation points")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, for tests")
    args = parser.parse_args()
    main(
        smoke_test=args.smoke_test,
        out_dir=args.out_dir,
        seeds=args.seeds,
        num_target=args.num_target,
    )
