r"""Transfer benchmark: pyro_ntk's NTK-GP against laplace-torch and fine-tuning.

A source network is trained on a source task, then adapted to a target task from a few
labelled points; every method starts from the *same* source network and sees the *same*
target points, and all are scored on the same held-out target points:

* ``source`` — the source network unchanged (reference), plug-in noise (below);
* ``fine_tuning`` — a copy trained by Adam on the target points; its predictive is
  :math:`\mathcal N(f(x), \hat s^2)` with :math:`\hat s^2` its mean squared training
  residual (the maximum-likelihood noise, floored at 1e-6), as in ``examples/sine_transfer.py``;
* ``ntk_gp`` — :class:`pyro_ntk.NTKGPRegression` on the source network (mean = network,
  kernel = its empirical NTK), noise s² and variance σ² fitted by SVI on the marginal
  likelihood (``pyro.contrib.gp.util.train``, Adam, lr 0.05 as in the example); predictive
  :math:`\mathcal N(\mu_*, \Sigma_* + s^2)`;
* ``la_full`` / ``la_full_ft`` — laplace-torch's ``Laplace(net, "regression",
  subset_of_weights="all", hessian_structure="full")`` (``FullLaplace``) on the source
  network / on the fine-tuned copy, fitted on the target points;
* ``la_func`` / ``la_func_ft`` — laplace-torch's ``FunctionalLaplace``
  (``hessian_structure="gp"``, ``n_subset`` = all target points), same two networks;
* ``la_func_src`` / ``la_full_src`` — the same on the source network with laplace-torch's
  ``prior_mean`` set to the source weights θ* (its default is 0).

laplace-torch's hyperparameters are fitted the way its regression example does it: the prior
precision and the observation noise ``sigma_noise`` jointly, by Adam (lr 0.1, from
log-values 1) on ``la.log_marginal_likelihood(prior_precision, sigma_noise)``;
``optimize_prior_precision(method="marglik")`` is the same loop with ``sigma_noise`` held
fixed, and would leave the noise to be chosen by hand. Its GLM predictive
(``la(x, pred_type="glm")``; ``pred_type="gp"`` for ``FunctionalLaplace``) is the variance of
the latent function only: as the example does, :math:`\sigma_{\mathrm{noise}}^2` is added to
it. Its predictive mean is the network's own output (no posterior mean update).
Every method takes the same number of hyperparameter steps (``--hyper-steps``).

Scores: RMSE, mean Gaussian NLL of the noisy test targets, coverage of the central 95 %
interval, seconds (fit + predict, after a 2-step warm-up in the same process; ``*_ft`` rows
include the fine-tuning seconds), and peak resident memory: each method runs in its own
Python process (all seeds in turn), whose peak RSS (``VmHWM``) is reset after the imports;
``Δ MiB`` is that peak minus the RSS after the imports. Tasks: ``sine`` (the few-shot family
of :mod:`pyro_ntk.datasets`, 10 target points) and ``diabetes`` (scikit-learn's bundled table
split by sex: source = one sex, target = 30 patients of the other, tested on the rest).
Networks: ``d``-16-16-1 tanh MLPs (``--width``; P = 321 and 449), small because FullLaplace's
marginal likelihood differentiates a dense P × P log-determinant at every step (at P = 1761,
the width of ``examples/sine_transfer.py``, 300 steps took 404 s on the loaded 2-core CPU).
``la_full_src`` is left out of the default methods to keep a run near 5 minutes.

laplace-torch is optional: install it as in ``benchmarks/requirements-bench.txt``
(``--no-deps``!). Without it, its rows are skipped with a note.

Run: ``python benchmarks/bench_transfer.py [--quick] [--seeds 0 1 2] [--write]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, peak_rss_subprocess, write_section  # noqa: E402

Z95 = 1.959963984540054
TASKS = ("sine", "diabetes")
LAPLACE_PACKAGES = (
    "laplace-torch",
    "asdfghjkl",
    "backpack-for-pytorch",
    "curvlinops-for-pytorch",
    "torchmetrics",
    "lightning-utilities",
    "einops",
    "einconv",
    "unfoldNd",
    "opt_einsum",
)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table."""

    label: str
    laplace: str | None = None  # "full" | "gp" (laplace-torch's hessian_structure)
    fine_tuned: bool = False  # start from the fine-tuned copy
    prior_at_source: bool = False  # laplace-torch prior_mean = θ* instead of 0


METHODS: dict[str, MethodSpec] = {
    "source": MethodSpec("source network (no adaptation)"),
    "fine_tuning": MethodSpec("fine-tuning"),
    "ntk_gp": MethodSpec("NTK-GP (pyro_ntk)"),
    "la_func": MethodSpec("FunctionalLaplace", "gp"),
    "la_func_src": MethodSpec("FunctionalLaplace, prior mean θ*", "gp", prior_at_source=True),
    "la_func_ft": MethodSpec("fine-tuning + FunctionalLaplace", "gp", fine_tuned=True),
    "la_full": MethodSpec("FullLaplace", "full"),
    "la_full_src": MethodSpec("FullLaplace, prior mean θ*", "full", prior_at_source=True),
    "la_full_ft": MethodSpec("fine-tuning + FullLaplace", "full", fine_tuned=True),
}


@dataclass
class Config:
    """Sizes and steps (per task where they differ)."""

    width: int = 16
    num_source: int = 400  # sine only (the table uses all its source rows)
    num_target: dict = dataclasses.field(default_factory=lambda: {"sine": 10, "diabetes": 30})
    num_test: int = 500  # sine only (the table tests on all remaining target rows)
    source_steps: int = 3000
    finetune_steps: int = 500
    hyper_steps: int = 300
    ntk_lr: float = 0.05
    laplace_lr: float = 0.1


DEFAULT_METHODS = [m for m in METHODS if m != "la_full_src"]  # la_full_src: ~1/3 more time
QUICK = dict(num_source=100, num_test=200, source_steps=500, finetune_steps=100, hyper_steps=50)


NOTES = """\
How the rows were made. Per seed, one source network is trained (in the parent process) and
saved; every method loads it and sees the same target and test points (float64, one thread
per method). *seconds*: adaptation (fit + predict) after a 2-step warm-up in the same
process; the `fine-tuning + …` rows include the fine-tuning seconds. *s ÷ NTK-GP*: the
per-seed ratio to the NTK-GP's seconds (robust to the machine's load), mean ± sd. *peak
MiB*: peak RSS (`VmHWM`) of the method's own Python process over the task's seeds, reset
after the imports; *Δ MiB*: that peak minus the RSS after the imports (torch, Pyro,
pyro_ntk, and laplace-torch for its rows). *noise var*: the fitted observation-noise
variance (NTK-GP: s²; laplace-torch: `sigma_noise²`; network rows: the plug-in training MSE).

Noise and hyperparameters. NTK-GP: s² and σ² by SVI on the exact marginal likelihood
(`pyro.contrib.gp.util.train`, Adam lr 0.05 from s² = 0.1, σ² = 1). laplace-torch: as its
regression example, the prior precision and `sigma_noise` jointly by Adam (lr 0.1, from
log-values 1) on `la.log_marginal_likelihood(prior_precision, sigma_noise)` (this is
`optimize_prior_precision(method="marglik")` with the noise fitted too, where that method
would hold it fixed), the same number of steps as the NTK-GP's SVI; its GLM predictive
(`pred_type="glm"`, `"gp"` for FunctionalLaplace) holds no observation noise, so
`sigma_noise²` is added to its variance, as the example does. laplace-torch's predictive
mean is the network's own output: without fine-tuning its RMSE is the source network's.
Its prior mean is 0 by default (`prior_mean=θ*` rows: centred on the weights being
linearized). FunctionalLaplace uses all target points (`n_subset` = N); laplace-torch warns
that `marglik` is discouraged for FunctionalLaplace and suggests cross-validation, which
needs held-out target points that a few-shot task does not have. The network rows'
predictive is N(f(x), training MSE) (the maximum-likelihood plug-in); fine-tuning has no
held-out data to stop early on the target."""


def laplace_available() -> bool:
    """Whether laplace-torch (module ``laplace``) can be imported."""
    try:
        return importlib.util.find_spec("laplace") is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------- data
def make_data(task: str, seed: int, cfg: Config) -> dict[str, Tensor]:
    """Source, adaptation and test data of one task, deterministic given ``seed`` (float64)."""
    if task == "sine":
        from pyro_ntk.datasets import sample_sine_tasks

        source, target = sample_sine_tasks(2, seed=seed)
        Xs, ys = source.sample(cfg.num_source, seed=seed + 1, dtype=torch.float64)
        Xa, ya = target.sample(cfg.num_target["sine"], seed=seed + 2, dtype=torch.float64)
        Xt, yt = target.sample(cfg.num_test, seed=seed + 3, dtype=torch.float64)
        return dict(Xs=Xs, ys=ys, Xa=Xa, ya=ya, Xt=Xt, yt=yt)
    if task == "diabetes":
        from sklearn.datasets import load_diabetes

        X, y = load_diabetes(return_X_y=True)  # bundled with scikit-learn, no download
        X = torch.as_tensor(X, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64)
        sex = X[:, 1]
        target_rows = sex > sex.mean()  # 207 patients of one sex; the 235 others are the source
        X = torch.cat([X[:, :1], X[:, 2:]], dim=1)  # sex is constant within each group
        Xs, ys, Xo, yo = X[~target_rows], y[~target_rows], X[target_rows], y[target_rows]
        mu, sd, ymu, ysd = Xs.mean(0), Xs.std(0), ys.mean(), ys.std()  # source statistics only
        Xs, Xo, ys, yo = (Xs - mu) / sd, (Xo - mu) / sd, (ys - ymu) / ysd, (yo - ymu) / ysd
        perm = torch.randperm(Xo.shape[0], generator=torch.Generator().manual_seed(seed))
        n = cfg.num_target["diabetes"]
        ia, it = perm[:n], perm[n:]
        return dict(Xs=Xs, ys=ys, Xa=Xo[ia], ya=yo[ia], Xt=Xo[it], yt=yo[it])
    raise ValueError(f"bench_transfer: task must be one of {TASKS}, got {task!r}.")


def make_network(input_dim: int, width: int) -> nn.Module:
    """A ``input_dim``-width-width-1 tanh MLP (float64)."""
    return nn.Sequential(
        nn.Linear(input_dim, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 1),
    ).double()


def train_source(task: str, data: dict[str, Tensor], seed: int, cfg: Config) -> nn.Module:
    """The source network: Adam, lr 1e-2; the table holds out a fifth of its rows and stops early."""
    from pyro_ntk.demo import train_mse

    torch.manual_seed(seed)
    net = make_network(data["Xs"].shape[1], cfg.width)
    X, y, validation = data["Xs"], data["ys"], None
    if task == "diabetes":
        perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
        n_val = X.shape[0] // 5
        validation = (X[perm[:n_val]], y[perm[:n_val]])
        X, y = X[perm[n_val:]], y[perm[n_val:]]
    train_mse(net, net.parameters(), X, y, cfg.source_steps, 1e-2, "", False, validation)
    return net


def fine_tune(net: nn.Module, X: Tensor, y: Tensor, steps: int) -> tuple[nn.Module, float]:
    """A fine-tuned copy (Adam, lr 1e-2, full batch) and its training MSE."""
    from pyro_ntk.demo import train_mse

    tuned = copy.deepcopy(net)
    return tuned, train_mse(tuned, tuned.parameters(), X, y, steps, 1e-2, "", False)


def gaussian_scores(mean: Tensor, var: Tensor, y: Tensor) -> dict[str, float]:
    """RMSE, mean NLL and 95 % coverage of N(mean, var) for the targets y."""
    mean, var, y = mean.detach().reshape(-1), var.detach().reshape(-1), y.reshape(-1)
    nll = (0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean).square() / var).mean()
    return {
        "rmse": float((mean - y).square().mean().sqrt()),
        "nll": float(nll),
        "coverage": float(((y - mean).abs() <= Z95 * var.sqrt()).double().mean()),
    }


# ----------------------------------------------------------------------------- methods
def _plug_in(net: nn.Module, X: Tensor, mse: float) -> tuple[Tensor, Tensor, dict]:
    with torch.no_grad():
        mean = net(X).squeeze(-1)
    noise = max(mse, 1e-6)
    return mean, torch.full_like(mean, noise), {"noise": noise}


def _ntk_gp(net: nn.Module, data: dict, steps: int, cfg: Config):
    import pyro.contrib.gp as gp

    from pyro_ntk import NTKGPRegression
    from pyro_ntk.options import SolverOptions

    model = NTKGPRegression(
        data["Xa"],
        data["ya"],
        net,
        noise=torch.tensor(0.1, dtype=torch.float64),
        variance=torch.tensor(1.0, dtype=torch.float64),
        options=SolverOptions(solver="cholesky"),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.ntk_lr)
    losses = gp.util.train(model, optimizer=optimizer, num_steps=steps)
    with torch.no_grad():
        mean, var = model(data["Xt"], noiseless=False)
    info = {
        "noise": float(model.noise.detach()),
        "variance": float(model.variance.detach()),
        "objective": [float(losses[0]), float(losses[-1])],
    }
    return mean, var, info


def _laplace(spec: MethodSpec, net: nn.Module, data: dict, steps: int, cfg: Config):
    from laplace import Laplace
    from torch.nn.utils import parameters_to_vector
    from torch.utils.data import DataLoader, TensorDataset

    Xa, ya = data["Xa"], data["ya"]
    loader = DataLoader(TensorDataset(Xa, ya.unsqueeze(-1)), batch_size=Xa.shape[0])
    kwargs = {"n_subset": Xa.shape[0]} if spec.laplace == "gp" else {}
    if spec.prior_at_source:
        kwargs["prior_mean"] = parameters_to_vector(net.parameters()).detach().clone()
    la = Laplace(
        net, "regression", subset_of_weights="all", hessian_structure=spec.laplace, **kwargs
    )
    with warnings.catch_warnings():  # BackPACK's hook warns that inputs need no gradient
        warnings.simplefilter("ignore")
        la.fit(loader)
    # laplace-torch's regression example: prior precision and sigma_noise jointly by marglik
    log_prior = torch.ones(1, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.ones(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([log_prior, log_sigma], lr=cfg.laplace_lr)
    objective = []
    with warnings.catch_warnings():
        # FunctionalLaplace warns at every step that the prior changed since fit
        warnings.simplefilter("ignore")
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
            loss.backward()
            optimizer.step()
            objective.append(float(loss.detach()))
        pred_type = "gp" if spec.laplace == "gp" else "glm"
        f_mu, f_var = la(data["Xt"], pred_type=pred_type)
    sigma2 = float(la.sigma_noise.detach()) ** 2
    mean = f_mu.detach().reshape(-1)
    var = f_var.detach().reshape(-1) + sigma2  # the example's pred_std² = f_var + sigma_noise²
    info = {
        "noise": sigma2,
        "prior_precision": float(la.prior_precision.detach().reshape(-1)[0]),
        "objective": [objective[0], objective[-1]],
    }
    return mean, var, info


def adapt(method: str, source: nn.Module, data: dict, cfg: Config, tuned=None, steps=None):
    """Run one method; returns ``(mean, var, info)`` on ``data["Xt"]``.

    ``tuned`` is ``(network, training MSE)`` of the fine-tuned copy for the ``*_ft`` rows.
    """
    spec = METHODS[method]
    steps = cfg.hyper_steps if steps is None else steps
    if method == "source":
        with torch.no_grad():
            mse = float((source(data["Xa"]).squeeze(-1) - data["ya"]).square().mean())
        return _plug_in(source, data["Xt"], mse)
    if method == "fine_tuning":
        net, mse = fine_tune(source, data["Xa"], data["ya"], cfg.finetune_steps)
        return _plug_in(net, data["Xt"], mse)
    if method == "ntk_gp":
        return _ntk_gp(source, data, steps, cfg)
    if spec.laplace is not None:
        net = tuned[0] if spec.fine_tuned else copy.deepcopy(source)
        return _laplace(spec, net, data, steps, cfg)
    raise ValueError(f"bench_transfer: unknown method {method!r}; expected one of {list(METHODS)}.")


def _proc_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> int | None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; returns that RSS (KiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_kib("VmRSS")


def evaluate(
    method: str,
    tasks: list[str],
    seeds: list[int],
    cfg: Config,
    workdir: str,
    measure_memory: bool = False,
) -> dict:
    """Score one method on each task for every seed (in this process).

    Loads the source networks ``{workdir}/{task}-{seed}-source.pt`` saved by :func:`main`.
    The fine-tuned copy of the ``*_ft`` rows is fine-tuned here (deterministic given the
    seed) and its seconds are added to theirs. With ``measure_memory`` (Linux), the peak
    RSS of each task is measured from a reset at its start.
    """
    import pyro

    from pyro_ntk.demo import run_settings

    out = {}
    # tiny problems: one thread avoids spin-waits on a shared CPU
    with run_settings(num_threads=1):
        for task in tasks:
            base = _reset_peak() if measure_memory else None
            rows = []
            for i, seed in enumerate(seeds):
                pyro.set_rng_seed(seed)
                data = make_data(task, seed, cfg)
                source = make_network(data["Xs"].shape[1], cfg.width)
                state = torch.load(Path(workdir) / f"{task}-{seed}-source.pt")
                source.load_state_dict(state)
                source.eval()
                fine_tuned = METHODS[method].fine_tuned
                if i == 0:  # warm-up: first calls into autograd, torch.func, the backends
                    warm = dataclasses.replace(cfg, finetune_steps=2)
                    tuned = fine_tune(source, data["Xa"], data["ya"], 2) if fine_tuned else None
                    adapt(method, source, data, warm, tuned, steps=2)
                t0 = time.perf_counter()
                tuned = None
                if fine_tuned:
                    tuned = fine_tune(source, data["Xa"], data["ya"], cfg.finetune_steps)
                mean, var, info = adapt(method, source, data, cfg, tuned)
                seconds = time.perf_counter() - t0
                scores = gaussian_scores(mean, var, data["yt"])
                rows.append({"seed": seed, "seconds": seconds, **scores, **info})
            peak = _proc_kib("VmHWM") if base is not None else None
            out[task] = {
                "method": method,
                "task": task,
                "rows": rows,
                "peak_mib": None if peak is None else peak / 1024,
                "baseline_mib": None if base is None else base / 1024,
            }
    return out


# ----------------------------------------------------------------------------- driver
def _run_isolated(method: str, tasks: list[str], seeds: list[int], cfg: Config, workdir: str):
    """:func:`evaluate` in a fresh Python process (imports done before any peak reset)."""
    here = str(Path(__file__).resolve().parent)
    code = (
        f"sys.path.insert(0, {here!r})\n"
        "import warnings\n"
        "warnings.filterwarnings('ignore')\n"
        "import pyro, pyro.contrib.gp\n"
        "import bench_transfer as bt\n"
        + ("import laplace\n" if METHODS[method].laplace else "")
        + ("import sklearn.datasets\n" if "diabetes" in tasks else "")
        + f"cfg = bt.Config(**json.loads({json.dumps(dataclasses.asdict(cfg))!r}))\n"
        + f"RESULT = bt.evaluate({method!r}, {tasks!r}, {seeds!r}, cfg, {workdir!r}, True)\n"
    )
    result = peak_rss_subprocess(code)
    return {task: result[task] for task in tasks}


def _mean_sd(values: list[float], digits: int, style: str = "f") -> str:
    t = torch.tensor(values, dtype=torch.float64)
    if t.numel() == 1:
        return f"{float(t):.{digits}{style}}"
    return f"{float(t.mean()):.{digits}{style}} ± {float(t.std()):.{digits}{style}}"


def summarize(results: list[dict]) -> str:
    """A markdown table: mean ± sd over seeds of each metric, one row per task and method."""
    ref = {r["task"]: r for r in results if r["method"] == "ntk_gp"}
    rows = []
    for r in sorted(
        results, key=lambda r: (TASKS.index(r["task"]), list(METHODS).index(r["method"]))
    ):
        rs = r["rows"]
        ratio = "–"
        if r["task"] in ref and r["method"] != "source":
            base = {x["seed"]: x["seconds"] for x in ref[r["task"]]["rows"]}
            ratio = _mean_sd([x["seconds"] / base[x["seed"]] for x in rs], 2)
        memory = ["n/a", "n/a"]
        if r.get("peak_mib") is not None:
            memory = [f"{r['peak_mib']:.0f}", f"{r['peak_mib'] - r['baseline_mib']:.0f}"]
        rows.append(
            [
                r["task"],
                METHODS[r["method"]].label,
                _mean_sd([x["rmse"] for x in rs], 3),
                _mean_sd([x["nll"] for x in rs], 2),
                _mean_sd([x["coverage"] for x in rs], 2),
                _mean_sd([x["seconds"] for x in rs], 2),
                ratio,
                *memory,
                _mean_sd([x["noise"] for x in rs], 2, "e"),
            ]
        )
    headers = ["task", "method", "RMSE", "NLL", "95% cover", "seconds", "s ÷ NTK-GP"]
    headers += ["peak MiB", "Δ MiB", "noise var"]
    return markdown_table(headers, rows)


def versions() -> str:
    """Installed versions of torch, pyro and (when present) laplace-torch and its deps."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "pyro-ppl", "gpytorch", "linear_operator", *LAPLACE_PACKAGES):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def _line(r: dict) -> str:
    parts = []
    for x in r["rows"]:
        extra = ""
        if "prior_precision" in x:
            extra = f" prior prec {x['prior_precision']:.2e}"
        if "variance" in x:
            extra = f" variance {x['variance']:.2e}"
        parts.append(
            f"seed {x['seed']} rmse {x['rmse']:.3f} cov {x['coverage']:.2f} "
            f"noise {x['noise']:.2e}{extra}"
        )
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    """Parse the options, train the source networks, run every method, print (and write)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        choices=list(METHODS),
        help=f"default: {' '.join(DEFAULT_METHODS)}",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=Config.width, help="hidden width of the MLPs")
    parser.add_argument(
        "--hyper-steps", type=int, default=None, help="marginal-likelihood steps (every method)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and steps, one seed, --in-process"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocess per method (memory not measured)"
    )
    parser.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    parser.add_argument("--json", default=None, help="write the per-seed results here")
    args = parser.parse_args(argv)

    cfg = Config(width=args.width, **(QUICK if args.quick else {}))
    if args.hyper_steps is not None:
        cfg.hyper_steps = args.hyper_steps
    seeds = args.seeds[:1] if args.quick else args.seeds
    in_process = args.in_process or args.quick
    methods = list(args.methods)
    if not laplace_available():
        skipped = [m for m in methods if METHODS[m].laplace]
        methods = [m for m in methods if not METHODS[m].laplace]
        if skipped:
            print(
                "note: laplace-torch is not installed, skipping "
                + ", ".join(skipped)
                + " (install it as benchmarks/requirements-bench.txt says, with --no-deps)"
            )
    header = machine()
    print(header)
    print(versions())
    print(f"config: {dataclasses.asdict(cfg)}, seeds {seeds}")

    results = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        previous = torch.get_default_dtype(), torch.get_num_threads()
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        try:
            for task in args.tasks:
                for seed in seeds:
                    data = make_data(task, seed, cfg)
                    t0 = time.perf_counter()
                    net = train_source(task, data, seed, cfg)
                    P = sum(p.numel() for p in net.parameters())
                    with torch.no_grad():
                        mse = float((net(data["Xs"]).squeeze(-1) - data["ys"]).square().mean())
                    print(
                        f"{task} seed {seed}: source network P = {P}, source MSE {mse:.3g} "
                        f"({time.perf_counter() - t0:.1f} s); {data['Xa'].shape[0]} target "
                        f"points, {data['Xt'].shape[0]} test points",
                        flush=True,
                    )
                    torch.save(net.state_dict(), Path(workdir) / f"{task}-{seed}-source.pt")
        finally:
            torch.set_default_dtype(previous[0])
            torch.set_num_threads(previous[1])
        for task in args.tasks:
            for method in methods:
                t0 = time.perf_counter()
                try:
                    if in_process:
                        r = evaluate(method, [task], seeds, cfg, workdir)[task]
                    else:  # one process per task and method: its own peak memory
                        r = _run_isolated(method, [task], seeds, cfg, workdir)[task]
                except RuntimeError as err:  # report it and go on with the other methods
                    print(f"{task} {method}: FAILED\n{err}")
                    continue
                results.append(r)
                print(
                    f"{task:9s} {method:12s} ({time.perf_counter() - t0:5.1f} s) {_line(r)}",
                    flush=True,
                )
    table = summarize(results)
    total = time.perf_counter() - t_start
    print()
    print(table)
    print(f"\ntotal {total:.0f} s")
    if args.json:
        payload = {"config": dataclasses.asdict(cfg), "seeds": seeds, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    if args.write:
        given = argv if argv is not None else sys.argv[1:]
        command = " ".join(["python benchmarks/bench_transfer.py", *given])
        body = (
            f"Command: `{command}` (total {total:.0f} s, one run).\n\n"
            f"Machine: {header}.\n\nVersions: {versions()}.\n\n"
            f"Config: {dataclasses.asdict(cfg)}; seeds {seeds}; mean ± sd over seeds.\n\n"
            + table
            + "\n\n"
            + NOTES
        )
        write_section("Transfer", body)
    return {"results": results, "table": table}


if __name__ == "__main__":
    main()
