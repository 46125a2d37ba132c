r"""Which layers must adapt? Per-layer NTK variances fitted on tasks built to know.

A 1-40-40-1 tanh MLP is trained on a source sine task. Two target tasks are then built from
the trained network itself, so the right answer is known by construction:

* **new readout**: :math:`y = w'^\top h(x) + b'`, with :math:`h(x)` the network's own
  penultimate (second hidden layer) features and a fresh random readout :math:`w', b'`.
  Only the last layer has to change;
* **input warp**: :math:`y = f(a x + c;\theta^*)` with :math:`a = 1.2, c = 0.3`, the
  source network on warped inputs. It is the network with a changed *first* layer
  (:math:`W_1 \to a W_1`, :math:`b_1 \to b_1 + c W_1`): the first layer has to move, the
  last layer alone cannot do it. (A strong warp leaves the linear regime, and the fit then
  spreads over the layers.)

Each target is observed at 40 noisy points. :class:`pyro_ntk.NTKGPRegression` with
``layer_variances=True`` (kernel :math:`\sum_g \sigma_g^2 J_g J_g^\top`) fits one variance
per layer and the noise with :func:`pyro_ntk.fit` (L-BFGS on the exact marginal likelihood,
from initial values scaled to the data). The script prints the fitted
:math:`\sigma_g^2` and each layer's share of the kernel's trace,
:math:`c_g = \sigma_g^2 \operatorname{tr} J_g J_g^\top / \sum_h \sigma_h^2
\operatorname{tr} J_h J_h^\top` (what :meth:`pyro_ntk.EmpiricalNTK.layer_contributions`
computes), beside the shares before fitting (all :math:`\sigma_g^2 = 1`), and draws both
with :func:`pyro_ntk.plot.layer_variances` into ``OUT_DIR/layer_relevance.png`` (default
``outputs/``). It also integrates every :math:`\sigma_g^2` and the noise out
(:func:`pyro_ntk.integrate_hyperparameters` on the same model) and prints each share's
posterior mean ± standard deviation: how sure 40 points make us of the answer.

Run: ``python examples/layer_relevance.py [--out-dir DIR] [--quick] [--no-progress]``.
``--quick`` trains the source network for 1000 Adam steps instead of 3000 (a few seconds;
its figures differ from the documented ones).
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pyro_ntk import NTKGPRegression, fit, integrate_hyperparameters  # noqa: E402
from pyro_ntk.datasets import SineTask  # noqa: E402
from pyro_ntk.demo import make_network, run_settings, train_mse  # noqa: E402
from pyro_ntk.options import SolverOptions  # noqa: E402
from pyro_ntk.plot import layer_variances  # noqa: E402

WARP = (1.2, 0.3)  # y = f(1.2 x + 0.3; θ*): a mild warp, inside the linear regime
LAYER_NAMES = {"0": "layer 1 (1→40)", "2": "layer 2 (40→40)", "4": "layer 3 (40→1)"}


def trace_shares(gp: NTKGPRegression, X: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    r"""Each layer's share :math:`\sigma_g^2 \operatorname{tr} J_g J_g^\top / \operatorname{tr} K`."""
    lin = gp.linearization
    sq = lin.jacobian(X).square().sum((0, 1))  # (P,)
    per_group = torch.zeros(len(lin.groups), dtype=sq.dtype).index_add_(
        0, lin.space.group_index(), sq
    )
    weighted = per_group * variance  # (G,) or, for several variance vectors, (S, G)
    return weighted / weighted.sum(-1, keepdim=True)


def fit_layer_variances(net, X, y, progress: bool, desc: str):
    """NTK-GP with one σ_g² per layer; s² and the σ_g² start from the data, ``fit`` fits them."""
    gp = NTKGPRegression(X, y, net, layer_variances=True, options=SolverOptions(solver="cholesky"))
    return gp, fit(gp, progress=progress, desc=desc)


def main(
    quick: bool = False,
    out_dir: str = "outputs",
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = 1,
):
    """Run the experiment; returns a dict of the printed figures and the figure's path.

    Runs in float64 with ``num_threads`` threads and Pyro's module-local parameters (two GP
    models in one process); all are restored afterwards.
    """
    with run_settings(num_threads):
        return _run(1000 if quick else 3000, out_dir, seed, progress)


def _run(source_steps: int, out_dir: str, seed: int, progress: bool):
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    n_source, n_target, noise_std = 400, 40, 0.05

    source = SineTask(amplitude=1.0, phase=0.0)
    Xs, ys = source.sample(n_source, seed=seed + 1)
    net = make_network("sine", 1)  # 1-40-40-1 tanh MLP
    source_mse = train_mse(net, net.parameters(), Xs, ys, source_steps, 1e-2,
                           "training the source network", progress)  # fmt: skip
    print(f"source network: y = sin(x), {n_source} points, training MSE {source_mse:.2e}")

    gen = torch.Generator().manual_seed(seed + 2)
    X = 10 * torch.rand(n_target, 1, generator=gen) - 5
    eps = noise_std * torch.randn(n_target, generator=gen)
    features = net[:4]  # the penultimate features h(x)
    w = torch.randn(40, generator=gen)
    b = torch.randn((), generator=gen)

    def readout(Z):
        with torch.no_grad():
            out = features(Z) @ w + b
        return (out - out.mean()) / out.std()  # unit scale on these inputs

    def warped(Z):
        with torch.no_grad():
            return net(WARP[0] * Z + WARP[1]).squeeze(-1)

    tasks = {"new readout": readout, "input warp": warped}
    results = {}
    for name, task in tqdm(tasks.items(), desc="target tasks", disable=not progress, leave=False):
        y = task(X) + eps
        gp, result = fit_layer_variances(net, X, y, progress, f"fitting: {name}")
        variance = gp.variance.detach()
        before = trace_shares(gp, X, torch.ones_like(variance))
        after = trace_shares(gp, X, variance)
        # the same model with every σ_g² and s² integrated out: the posterior of the shares
        post = integrate_hyperparameters(gp).posterior
        samples = trace_shares(gp, X, post.variance)  # (S, G)
        w = post.weights[:, None]
        share_mean = (w * samples).sum(0)
        share_sd = (w * (samples - share_mean).square()).sum(0).sqrt()
        groups = gp.linearization.groups
        results[name] = {
            "variances": {g: float(v) for g, v in zip(groups, variance)},
            "shares": {g: float(c) for g, c in zip(groups, after)},
            "shares_before": {g: float(c) for g, c in zip(groups, before)},
            "shares_integrated": {
                g: (float(m), float(sd)) for g, m, sd in zip(groups, share_mean, share_sd)
            },
            "noise": float(gp.noise.detach()),
            "losses": result.losses,
            "converged": result.converged,
        }
        lines = [
            f"\ntarget '{name}': {n_target} points, noise sd {noise_std}; fitted noise "
            f"s2 = {float(gp.noise.detach()):.2e} (true {noise_std**2:.1e}); "
            f"loss {result.losses[0]:.1f} -> {result.losses[-1]:.1f} in {result.steps} "
            f"{result.method} steps",
            f"{'layer':<18}{'sigma_g^2':>12}{'share before':>14}{'share fitted':>14}"
            f"{'share integrated':>20}",
        ]
        for g, v, c0, c, m, sd in zip(groups, variance, before, after, share_mean, share_sd):
            lines.append(
                f"{LAYER_NAMES.get(g, g):<18}{float(v):>12.3e}{float(c0):>14.3f}{float(c):>14.3f}"
                f"{float(m):>13.3f} ± {float(sd):.3f}"
            )
        tqdm.write("\n".join(lines))

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "layer_relevance.png")
    groups = list(results["new readout"]["shares"])
    labels = [LAYER_NAMES.get(g, g).replace(" (", "\n(") for g in groups]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4.2))
    fitted = {n: list(r["variances"].values()) for n, r in results.items()}
    layer_variances(
        labels, fitted, ax=left, xlabel="", ylabel=r"fitted prior variance $\sigma_g^2$"
    )
    left.get_legend().remove()
    left.set_title(r"fitted $\sigma_g^2$ per layer", fontsize=10)
    shares = {n: list(r["shares"].values()) for n, r in results.items()}
    shares[r"before fitting (all $\sigma_g^2 = 1$)"] = list(
        results["new readout"]["shares_before"].values()
    )
    layer_variances(labels, shares, ax=right, log=False, xlabel="",
                    ylabel="share of the kernel trace")  # fmt: skip
    right.get_legend().remove()
    right.set_title("each layer's share of the kernel", fontsize=10)
    handles, names = right.get_legend_handles_labels()
    names = [f"target: {n}" if n in results else n for n in names]
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nfigure: {path}  ({time.perf_counter() - t0:.1f} s)")
    return {"results": results, "figure": path}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="outputs", help="where layer_relevance.png goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer training steps: seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    main(quick=args.quick, out_dir=args.out_dir, seed=args.seed, progress=not args.no_progress)
