r"""Tables, paired win/tie/loss counts, the issue's targets, and the NLL figure.

Rows are dicts ``{task, kind, size, draw, method, seconds, <scores>}``; a *cell* is one
(task, size). The paired rule is :func:`transfer_suite.scores.paired_outcome` on the NLL
over the draws. The **best baseline** of a cell is the non-NTK method with the lowest mean
NLL there (for a baseline itself: the best *other* baseline).

Targets (stated before any run):

1. on ≥ 75 % of cells an NTK method has the best mean NLL, or is within one paired standard
   error of the best (``d̄ ≤ se`` for the best NTK method against the best method);
2. on every regression cell the NTK-GP's 95 % coverage lies in [0.85, 0.99];
3. on every classification cell the NTK method's ECE is no worse than fine-tuning's.

Example:
    >>> rows = [dict(task="t", kind="regression", size=10, draw=d, method=m, nll=v, seconds=0.0)
    ...         for d, (a, b) in enumerate([(1.0, 2.0), (1.5, 2.0)]) for m, v in (("ntk_gp", a), ("fine_tune", b))]
    >>> win_tie_loss(rows, "ntk_gp", "fine_tune")
    {'win': 1, 'tie': 0, 'loss': 0}
"""

from __future__ import annotations

import math
from collections import defaultdict

from transfer_suite.scores import paired_difference, paired_outcome

NTK_METHODS = (
    "ntk_gp",
    "ntk_gp_bayes",
    "ntk_gp_floor",
    "ntk_gp_layers",
    "ntk_gp_layers_bayes",
    "lin_laplace",
    "lin_laplace_t",
    "lin_svi",
)
#: rows added after the first full run (a recipe the suite taught): target 1 is also counted
#: without them, so that the recipe's own effect on the count is visible.
RECIPE_METHODS = ("ntk_gp_floor", "ntk_gp_bayes", "ntk_gp_layers_bayes")
LABELS = {
    "source": "source net (no adaptation)",
    "fine_tune": "fine-tuning (CV, L2 to θ*)",
    "last_layer": "last layer (CV)",
    "ablr": "Bayesian last layer (ABLR)",
    "rbf_gp": "RBF GP (raw inputs)",
    "ensemble": "deep ensemble (M=5, fine-tuned)",
    "la_last_layer": "laplace-torch last layer",
    "la_kfac": "laplace-torch KFAC",
    "ntk_gp": "NTK-GP σ² (pyro_ntk)",
    "ntk_gp_bayes": "NTK-GP σ², s² integrated (pyro_ntk)",
    "ntk_gp_floor": "NTK-GP σ², s² ≥ 1 % var(y) (pyro_ntk)",
    "ntk_gp_layers": "NTK-GP σ_g² (pyro_ntk)",
    "ntk_gp_layers_bayes": "NTK-GP σ_g², s² integrated (pyro_ntk)",
    "lin_laplace": "lin. Laplace (pyro_ntk)",
    "lin_laplace_t": "lin. Laplace, T by CV (pyro_ntk)",
    "lin_svi": "LinearizedModel SVI (pyro_ntk)",
}
METRICS = {
    "regression": ("rmse", "nll", "coverage"),
    "count": ("rmse", "nll", "coverage"),
    "classification": ("accuracy", "nll", "ece"),
}


def cells(rows: list[dict]) -> dict[tuple, dict[str, dict[int, dict]]]:
    """``{(task, size): {method: {draw: row}}}`` in first-seen order."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        out[(r["task"], r["size"])][r["method"]][r["draw"]] = r
    return out


def _values(cell: dict, method: str, key: str = "nll", draws=None) -> list[float]:
    draws = sorted(cell[method]) if draws is None else draws
    return [cell[method][d][key] for d in draws]


def _common(cell: dict, a: str, b: str) -> list[int]:
    return sorted(set(cell[a]) & set(cell[b]))


def _mean(xs):
    return sum(xs) / len(xs)


def best_method(cell: dict, candidates) -> str | None:
    cands = [m for m in candidates if m in cell and cell[m]]
    return min(cands, key=lambda m: _mean(_values(cell, m))) if cands else None


def win_tie_loss(rows: list[dict], method: str, reference: str) -> dict[str, int]:
    """Counts over cells of ``method``'s paired outcome against ``reference``.

    ``reference="best_baseline"``: the cell's best baseline other than ``method``.
    """
    counts = {"win": 0, "tie": 0, "loss": 0}
    for cell in cells(rows).values():
        if method not in cell:
            continue
        ref = reference
        if reference == "best_baseline":
            ref = best_method(cell, [m for m in cell if m not in NTK_METHODS and m != method])
        if ref is None or ref not in cell or ref == method:
            continue
        draws = _common(cell, method, ref)
        if len(draws) < 2:
            continue
        out = paired_outcome(_values(cell, method, draws=draws), _values(cell, ref, draws=draws))
        counts[out] += 1
    return counts


def _pm(xs: list[float], digits: int) -> str:
    m = _mean(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def markdown(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(rows: list[dict]) -> str:
    """Per (task, size, method): metric 1, NLL, coverage or ECE, seconds (mean ± sd)."""
    out = []
    for (task, size), cell in cells(rows).items():
        kind = next(iter(next(iter(cell.values())).values()))["kind"]
        a, b, c = METRICS[kind]
        best = best_method(cell, list(cell))
        for m in cell:
            nll = _pm(_values(cell, m), 3)
            out.append([task, size, LABELS.get(m, m),
                        f"{a} {_pm(_values(cell, m, a), 3)}",
                        f"**{nll}**" if m == best else nll,
                        f"{c} {_pm(_values(cell, m, c), 3)}",
                        _pm(_values(cell, m, "seconds"), 2), len(cell[m])])  # fmt: skip
    headers = ["task", "size", "method", "RMSE / accuracy", "NLL", "coverage / ECE", "seconds",
               "draws"]  # fmt: skip
    return markdown(headers, out)


def wtl_table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in methods:
        ft = win_tie_loss(rows, m, "fine_tune") if m != "fine_tune" else None
        bb = win_tie_loss(rows, m, "best_baseline")
        fmt = lambda c: "–" if c is None else f"{c['win']} / {c['tie']} / {c['loss']}"  # noqa: E731
        out.append([LABELS.get(m, m), fmt(ft), fmt(bb)])
    return markdown(["method", "vs fine-tuning (W / T / L)", "vs best baseline (W / T / L)"], out)


def targets(rows: list[dict]) -> tuple[str, dict]:
    """The issue's three targets, cell by cell, and a summary."""
    lines, met1, n1, met_plain = [], 0, 0, 0
    cover_bad, ece_bad = [], []
    for (task, size), cell in cells(rows).items():
        kind = next(iter(next(iter(cell.values())).values()))["kind"]
        ntk = best_method(cell, NTK_METHODS)
        best = best_method(cell, list(cell))
        if ntk is None:
            continue
        n1 += 1
        ok, d, se = _against_best(cell, ntk, best)
        met1 += ok
        # as if the recipe rows had not run: against the best of the other methods
        plain = best_method(cell, [m for m in NTK_METHODS if m not in RECIPE_METHODS])
        best_plain = best_method(cell, [m for m in cell if m not in RECIPE_METHODS])
        met_plain += plain is not None and _against_best(cell, plain, best_plain)[0]
        lines.append(f"- {task} @ {size}: best {best} ({_mean(_values(cell, best)):.3f}), best NTK "
                     f"{ntk} ({_mean(_values(cell, ntk)):.3f}); Δ = {d:+.3f} ± {se:.3f} → "
                     f"{'met' if ok else 'missed'}")  # fmt: skip
        if kind == "regression":
            for m in (
                "ntk_gp",
                "ntk_gp_bayes",
                "ntk_gp_floor",
                "ntk_gp_layers",
                "ntk_gp_layers_bayes",
            ):
                if m in cell:
                    cov = _mean(_values(cell, m, "coverage"))
                    if not 0.85 <= cov <= 0.99:
                        cover_bad.append(f"{task}@{size} {m} {cov:.3f}")
        if kind == "classification" and "fine_tune" in cell:
            ft = _mean(_values(cell, "fine_tune", "ece"))
            for m in ("lin_laplace", "lin_laplace_t"):
                if m in cell:
                    e = _mean(_values(cell, m, "ece"))
                    if e > ft:
                        ece_bad.append(f"{task}@{size} {m} {e:.3f} > {ft:.3f}")
    summary = {"nll_cells_met": met1, "nll_cells": n1, "coverage_misses": cover_bad,
               "ece_misses": ece_bad, "nll_cells_met_without_recipes": met_plain}  # fmt: skip
    text = (f"Target 1 (NTK best NLL or within one paired SE): {met1} / {n1} cells "
            f"({100 * met1 / max(n1, 1):.0f} %; target ≥ 75 %); without the recipe rows "
            f"({', '.join(RECIPE_METHODS)}): {met_plain} / {n1}.\n" + "\n".join(lines)
            + "\n\nTarget 2 (NTK-GP 95 % coverage in [0.85, 0.99]) misses: "
            + (", ".join(cover_bad) or "none")
            + "\n\nTarget 3 (NTK ECE ≤ fine-tuning's) misses: " + (", ".join(ece_bad) or "none"))  # fmt: skip
    return text, summary


SHORT = {
    "source": "source", "fine_tune": "fine-tune", "last_layer": "last layer", "ablr": "ABLR",
    "rbf_gp": "RBF GP", "la_last_layer": "LT last", "la_kfac": "LT KFAC",
    "ensemble": "ensemble", "ntk_gp": "NTK-GP σ²", "ntk_gp_bayes": "NTK-GP integrated",
    "ntk_gp_floor": "NTK-GP σ², floor",
    "ntk_gp_layers": "NTK-GP σ_g²", "ntk_gp_layers_bayes": "NTK-GP σ_g² integrated",
    "lin_laplace": "lin. Laplace",
    "lin_laplace_t": "lin. Laplace, T by CV", "lin_svi": "LinearizedModel SVI",
}  # fmt: skip


def _number(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.3g}"


def _list_table(headers: list[str], body: list[list[str]]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [headers, *body]:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {x}" for x in row[1:]]
    return "\n".join(lines)


def rst_tables(rows: list[dict], kind: str, second: str | None = None) -> str:
    """A reStructuredText list-table of mean NLL per cell (rows) and method (columns).

    ``second``: a score shown after the NLL (``"coverage"``, ``"ece"``); the best mean NLL of
    each cell is bold; ``–``: the method did not run on that cell. For the docs page.
    """
    chosen = {k: c for k, c in cells(rows).items()
              if next(iter(next(iter(c.values())).values()))["kind"] == kind}  # fmt: skip
    methods = list(dict.fromkeys(m for c in chosen.values() for m in c))
    body = []
    for (task, size), cell in chosen.items():
        best = best_method(cell, list(cell))
        row = [f"{task} @ {size}"]
        for m in methods:
            if m not in cell:
                row.append("–")
                continue
            nll = _number(_mean(_values(cell, m)))
            text = f"**{nll}**" if m == best else nll
            if second is not None:
                text += f" / {_mean(_values(cell, m, second)):.2f}"
            row.append(text)
        body.append(row)
    return _list_table(["cell"] + [SHORT.get(m, m) for m in methods], body)


def rst_wtl(rows: list[dict]) -> str:
    """The paired win / tie / loss list-table (NLL) against fine-tuning and the best baseline."""
    methods = [
        m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("source", "fine_tune")
    ]
    body = []
    for m in methods:
        ft, bb = win_tie_loss(rows, m, "fine_tune"), win_tie_loss(rows, m, "best_baseline")
        body.append([LABELS.get(m, m)] + ["{win} / {tie} / {loss}".format(**c) for c in (ft, bb)])
    return _list_table(["method", "vs fine-tuning", "vs best baseline"], body)


def _against_best(cell: dict, method: str, best: str) -> tuple[bool, float, float]:
    """``(close, d̄, se)`` of ``method``'s paired mean NLL difference ``d̄`` to ``best``.

    Close: ``method`` is ``best``, or ``d̄`` is within one paired standard error ``se``.
    """
    draws = _common(cell, method, best)
    d, se = paired_difference(_values(cell, method, draws=draws), _values(cell, best, draws=draws))
    return method == best or d <= se, d, se


def _y_range(means: list[float]) -> tuple[float, float]:
    """A panel's NLL range: the best mean up to three times its distance to the median above it."""
    lo, mid = min(means), sorted(means)[len(means) // 2]
    top = mid + 2 * max(mid - lo, 0.05)
    pad = 0.05 * (top - lo)
    return lo - pad, top + pad


def nll_figure(rows: list[dict], path) -> None:
    """One panel per task: mean NLL ± sd over draws per method, one marker per size.

    Each panel's y-range runs from its best mean to three times that mean's distance to the
    median; means above it are drawn at the top edge as a triangle labelled with the value
    (the catastrophic rows would otherwise flatten every other difference).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task = defaultdict(dict)
    for (task, size), cell in cells(rows).items():
        by_task[task][size] = cell
    n = len(by_task)
    cols = min(4, n)
    rws = math.ceil(n / cols)
    fig, axes = plt.subplots(rws, cols, figsize=(4.2 * cols, 3.4 * rws), squeeze=False)
    for ax, (task, sizes) in zip(axes.flat, by_task.items()):
        methods = list(dict.fromkeys(m for c in sizes.values() for m in c))
        lo, hi = _y_range([_mean(_values(c, m)) for c in sizes.values() for m in c])
        for j, (size, cell) in enumerate(sorted(sizes.items())):
            xs = [i + (j - 0.5) * 0.3 for i, m in enumerate(methods) if m in cell]
            vals = [_values(cell, m) for m in methods if m in cell]
            mu = [_mean(v) for v in vals]
            sd = [
                math.sqrt(sum((x - a) ** 2 for x in v) / max(len(v) - 1, 1))
                for v, a in zip(vals, mu)
            ]
            inside = [k for k, a in enumerate(mu) if a <= hi]
            marker = "o" if j == 0 else "s"
            ax.errorbar([xs[k] for k in inside], [mu[k] for k in inside],
                        yerr=[sd[k] for k in inside], fmt=marker, ms=4, color=f"C{j}",
                        label=f"n = {size}")  # fmt: skip
            for k in (k for k, a in enumerate(mu) if a > hi):
                ax.plot(xs[k], hi, "^", color=f"C{j}", ms=6, clip_on=False)
                ax.annotate(_number(mu[k]), (xs[k], hi), xytext=(0, -9 - 8 * j), textcoords="offset points",
                            ha="center", fontsize=6, color=f"C{j}")  # fmt: skip
        ax.set_ylim(lo, hi)
        for i, m in enumerate(methods):
            if m in NTK_METHODS:
                ax.axvspan(i - 0.45, i + 0.45, color="C2", alpha=0.12, lw=0)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=7)
        ax.set_title(task, fontsize=10)
        ax.set_ylabel("test NLL (mean ± sd over draws)", fontsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        "Transfer suite: NLL per task and method (green: pyro_ntk methods; ▲: off the scale)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
