"""Run a benchmark on two source trees, alternately, and put their tables side by side.

``python benchmarks/compare_revisions.py --base /path/to/other/checkout -- bench_engine.py
--headline-only`` runs each tree's own copy of the script with that tree's ``pyro_ntk``
(``--base`` and this tree), alternating for ``--rounds`` rounds so that both see the
same machine load. Every markdown table row that both runs print is paired by its first
cell, and with ``--json PATH`` in the command every number of the JSON file the script
writes is paired by its path; each is reported as the base value, this tree's value and
their ratio (the smallest value over the rounds, as for timings). ``--write SECTION`` records the
result in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, markdown_table, write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NUMBER = re.compile(r"^\*{0,2}(-?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)\*{0,2}$")


def run(tree: Path, argv: list[str]) -> dict[tuple[str, int], float]:
    """The numbers ``benchmarks/<script> args`` prints (or writes as JSON), ``pyro_ntk`` from ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    if "--json" in argv:
        with tempfile.TemporaryDirectory() as tmp:
            argv = list(argv)
            argv[argv.index("--json") + 1] = str(Path(tmp) / "out.json")
            subprocess.run(
                [sys.executable, str(tree / "benchmarks" / argv[0]), *argv[1:]],
                env=env,
                cwd=tree / "benchmarks",
                capture_output=True,
                check=True,
            )
            return flatten(json.loads((Path(tmp) / "out.json").read_text()))
    out = subprocess.run(
        [sys.executable, str(tree / "benchmarks" / argv[0]), *argv[1:]],
        env=env,
        cwd=tree / "benchmarks",
        capture_output=True,
        text=True,
        check=True,
    )
    return rows(out.stdout)


def flatten(obj: object, path: str = "") -> dict[tuple[str, int], float]:
    """``{(path, 0): number}`` for every number in a JSON value."""
    if isinstance(obj, dict):
        return {
            k: v for key, item in obj.items() for k, v in flatten(item, f"{path}.{key}").items()
        }
    if isinstance(obj, list):
        return {
            k: v for i, item in enumerate(obj) for k, v in flatten(item, f"{path}[{i}]").items()
        }
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {(path.lstrip("."), 0): float(obj)}
    return {}


def rows(text: str) -> dict[tuple[str, int], float]:
    """``{(first cell, column): number}`` over every markdown table row of ``text``."""
    found = {}
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for j, cell in enumerate(cells[1:], start=1):
            match = NUMBER.match(cell)
            if match:
                found[(cells[0], j)] = float(match.group(1))
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the other source tree")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", default=None, help="RESULTS.md section to write")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py [args]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    best: dict[str, dict] = {"base": {}, "this": {}}
    for _ in range(args.rounds):
        for name, tree in (("base", args.base), ("this", ROOT)):
            for key, value in run(tree, command).items():
                best[name][key] = min(value, best[name].get(key, value))
    shared = [k for k in best["base"] if k in best["this"]]
    table = markdown_table(
        ["row", "column", "base", "this tree", "this / base"],
        [
            [k[0], str(k[1]), f"{best['base'][k]:.4g}", f"{best['this'][k]:.4g}"]
            + [f"{best['this'][k] / best['base'][k]:.2f}" if best["base"][k] else "—"]
            for k in shared
        ],
    )
    head = (
        f"{machine()}\n\nCommand: `python benchmarks/compare_revisions.py --base "
        f"{args.base} --rounds {args.rounds} -- {' '.join(command)}` (minimum over rounds; "
        "the two trees alternate).\n"
    )
    print(head + "\n" + table)
    if args.write:
        write_section(args.write, head + "\n" + table + "\n")


if __name__ == "__main__":
    main()
