r"""Run the transfer suite: every task × size × draw × method; tables, targets, figure.

``python benchmarks/transfer_suite/run.py [--quick] [--tasks ...] [--methods ...]
[--draws 5] [--out-dir benchmarks/_out] [--write]``

Per task, the source networks (member 0 = θ*, members 1–4 for the ensemble) are trained
once by the recipe of :mod:`transfer_suite.source` (cached). Per draw, every method starts
from the same θ*, sees the same shots and is scored on the same test rows; ``seconds`` is
the method's wall time (adaptation + prediction, one thread; the rows that reuse the
fine-tuned network or its CV include their seconds). Warnings raised inside a method are
counted in its ``warnings`` column of the JSON.

``--quick``: tasks diabetes, computers, hpc, baseball; 2 draws. Writes
``<out-dir>/transfer_suite.{json,md,png}``; ``--write`` also replaces the section
"Transfer suite" of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pyro  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pyro_ntk.demo.config import run_settings  # noqa: E402
from transfer_suite import baselines, laplace_torch, ntk, report, scores  # noqa: E402
from transfer_suite.source import source_network  # noqa: E402
from transfer_suite.tasks import TASKS, load_task, make_draw  # noqa: E402

ALL = {**baselines.METHODS, **laplace_torch.METHODS, **ntk.METHODS}
BY_KIND = {
    "regression": ["source", "fine_tune", "last_layer", "ablr", "rbf_gp", "la_last_layer",
                   "la_kfac", "ensemble", "ntk_gp", "ntk_gp_bayes", "ntk_gp_floor",
                   "ntk_gp_layers", "ntk_gp_layers_bayes"],
    "classification": ["source", "fine_tune", "last_layer", "la_last_layer", "la_kfac",
                       "ensemble", "lin_laplace", "lin_laplace_t"],
    "count": ["source", "fine_tune", "last_layer", "ensemble", "lin_laplace", "lin_svi"],
}  # fmt: skip
USES_FT = {"ensemble": "ft_choice", "la_last_layer": "ft_net", "la_kfac": "ft_net"}
QUICK_TASKS = ["diabetes", "computers", "hpc", "baseball"]
QUICK_DRAWS = 2


def score(kind: str, pred: dict, y) -> dict:
    if kind == "classification":
        return scores.classification_scores(pred["probs"], y)
    if kind == "count":
        return scores.count_scores(pred["rates"], y)
    if "mixture" in pred:
        return scores.mixture_scores(*pred["mixture"], y)
    return scores.gaussian_scores(pred["mean"], pred["var"], y)


def run_method(name: str, ctx: baselines.Context) -> dict:
    """One method on one draw: scores, seconds (with reused fine-tuning), info, warnings."""
    reused = 0.0
    if name in USES_FT and USES_FT[name] in ctx.cache:
        reused = ctx.cache["ft_seconds" if USES_FT[name] == "ft_net" else "ft_choice"]
        reused = reused if isinstance(reused, float) else reused["seconds"]
    pyro.clear_param_store()  # every model fits its own hyperparameters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        pred = ALL[name](ctx)
        seconds = time.perf_counter() - t0 + reused
    row = score(ctx.kind, pred, ctx.draw.yt)
    messages = sorted({str(w.message).splitlines()[0][:160] for w in caught})
    return {**row, "seconds": seconds, "info": pred.get("info", ""), "warnings": messages}


def run(tasks, methods, draws, progress=True) -> list[dict]:
    """All rows; methods not applicable to a task's kind are left out."""
    rows = []
    plan = []
    for name in tasks:
        kind = TASKS[name][0].kind
        ms = [m for m in BY_KIND[kind] if m in methods]
        for size in TASKS[name][0].sizes:
            plan += [(name, size, d, ms) for d in range(draws)]
    bar = tqdm(total=sum(len(p[3]) for p in plan), disable=not progress, desc="transfer suite")
    for name, size, d, ms in plan:
        task = load_task(name)
        net, _ = source_network(task, 0)
        for m in range(1, baselines.ENSEMBLE_SIZE if "ensemble" in ms else 1):
            source_network(task, m)  # train (or load) outside the ensemble's seconds
        ctx = baselines.Context(task, make_draw(task, size, d), net)
        for m in ms:
            bar.set_postfix_str(f"{name} n={size} d={d} {m}")
            try:
                r = run_method(m, ctx)
            except Exception as err:  # report it and go on with the other methods
                tqdm.write(f"{name} n={size} draw {d} {m}: FAILED {type(err).__name__}: {err}")
                bar.update()
                continue
            rows.append({"task": name, "kind": task.spec.kind, "size": size, "draw": d,
                         "method": m, **r})  # fmt: skip
            bar.update()
    bar.close()
    return rows


def tasks_table(names) -> str:
    out = []
    for n in names:
        s = TASKS[n][0]
        t = load_task(n)
        unit = "per class" if s.kind == "classification" else "labels"
        out.append([n, s.kind + (f" ({t.num_classes})" if t.num_classes else ""), s.source,
                    s.target_variable, s.shift, f"{len(t.ys)} / {len(t.yo)}", t.Xs.shape[1],
                    f"{s.sizes[0]}, {s.sizes[1]} {unit}"])  # fmt: skip
    return report.markdown(["task", "kind", "data", "y", "shift: source → target",
                            "n source / n target", "D", "target sizes"], out)  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"tasks {QUICK_TASKS}, {QUICK_DRAWS} draws")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None)
    p.add_argument("--methods", nargs="+", choices=list(ALL), default=list(ALL))
    p.add_argument("--draws", type=int, default=None, help="draws per cell (default 5; quick 3)")
    p.add_argument("--out-dir", default=str(HERE.parent / "_out"))
    p.add_argument("--write", action="store_true", help="replace RESULTS.md's section")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", type=Path, default=None,
                   help="report the rows of an earlier run's JSON instead of running")  # fmt: skip
    args = p.parse_args(argv)
    tasks = args.tasks or (QUICK_TASKS if args.quick else list(TASKS))
    draws = args.draws or (QUICK_DRAWS if args.quick else 5)
    methods = list(args.methods)
    if not laplace_torch.available():
        methods = [m for m in methods if m not in laplace_torch.METHODS]
        print("note: laplace-torch is not installed: its rows are skipped (install it as "
              "benchmarks/requirements-bench.txt says, with --no-deps)")  # fmt: skip
    from _common import machine, write_section

    command = f"python benchmarks/transfer_suite/run.py {' '.join(argv or sys.argv[1:])}".strip()
    where = machine()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        rows, total = saved["rows"], saved["total_s"]
        draws = max(r["draw"] for r in rows) + 1
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        command = saved.get("command", "python benchmarks/transfer_suite/run.py")
        where = saved.get("machine", f"{where} (when reported; the run's line was not saved)")
    else:
        t0 = time.perf_counter()
        with run_settings(1, dtype=torch.float64, module_local_params=None):
            rows = run(tasks, methods, draws, progress=not args.no_progress)
        total = time.perf_counter() - t0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target_text, summary = report.targets(rows)
    body = (
        f"Command: `{command}` "
        f"({total:.0f} s, one thread).\n\n### Tasks\n\n{tasks_table(tasks)}\n\n"
        f"### Results (mean ± sd over {draws} draws; bold: best mean NLL of the cell)\n\n"
        f"{report.results_table(rows)}\n\n### Paired win / tie / loss on NLL over draws "
        f"(tie: |mean difference| ≤ one paired standard error), counted over cells\n\n"
        f"{report.wtl_table(rows)}\n\n### Targets\n\n{target_text}\n\n### Figure\n\n"
        f"`transfer_suite_nll.png` in the output directory; the docs' copy (of the full run):\n\n"
        f"![Test NLL per task and method](../docs/_static/transfer_suite_nll.png)\n"
    )
    (out / "transfer_suite.md").write_text(body)
    saved = {"rows": rows, "total_s": total, "command": command, "machine": where}
    (out / "transfer_suite.json").write_text(json.dumps(saved, indent=1))
    report.nll_figure(rows, out / "transfer_suite_nll.png")
    print(body)
    print(f"total {total:.0f} s; wrote {out}/transfer_suite.{{md,json}} and transfer_suite_nll.png")
    if args.write:
        write_section("Transfer suite", f"Machine: {where}.\n\n" + body)
    return {"rows": rows, "summary": summary, "total_s": total}


if __name__ == "__main__":
    main()
