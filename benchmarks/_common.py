"""Shared benchmark helpers: interleaved min-of-k timing, subprocess peak memory, markdown.

The machine is shared and its load varies, so every benchmark times all its contenders
*round-robin* in one process (one call of each per round, ``repeats`` rounds) and reports
the minimum per contender, as a ratio to a baseline timed in the same rounds.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def interleaved_min(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, number: int = 1
):
    """Min wall time (seconds per call) of each callable over ``repeats`` round-robin rounds.

    In each round every callable runs ``number`` times in a row and is charged the mean of
    that block: with ``number > 1`` each contender is timed in its own steady state (a CG
    solve calls K·v back to back; a training loop calls forward+backward back to back)
    rather than right after a different contender has evicted its working set from the
    caches (measured: a K·v timed straight after a forward+backward costs ~0.1× of a
    forward+backward more than the same K·v after another K·v).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / number)
    return best


def peak_rss_subprocess(code: str, timeout: float = 1800) -> dict:
    """Run ``code`` in a fresh Python; it must print one JSON line; peak RSS is added.

    The child's peak resident memory while ``code`` runs (``VmHWM``, reset after the imports
    through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is unavailable) and its RSS
    after the imports (``baseline``) are returned in MiB.
    """
    prelude = (
        "import resource, json, sys\n"
        "import torch\n"
        "import pyro_ntk\n"
        "torch.set_num_threads(2)\n"
        "def _status(key):\n"
        "    try:\n"
        "        for line in open('/proc/self/status'):\n"
        "            if line.startswith(key + ':'):\n"
        "                return int(line.split()[1])\n"
        "    except OSError:\n"
        "        return None\n"
        "_base = _status('VmRSS') or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"  # reset the peak so that import-time spikes do not count
        "    open('/proc/self/clear_refs', 'w').write('5')\n"
        "except OSError:\n"
        "    pass\n"
    )
    epilogue = (
        "\n_peak = _status('VmHWM') or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print('@@' + json.dumps({**RESULT, 'peak_mib': _peak / 1024, "
        "'baseline_mib': _base / 1024}))\n"
    )
    src = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code + epilogue],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def machine() -> str:
    """One line: date, CPU model, cores used, torch version, load average."""
    cpu = platform.processor() or "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now}; {cpu}; {os.cpu_count()} cores visible, torch.set_num_threads"
        f"({torch.get_num_threads()}); torch {torch.__version__}; Python "
        f"{platform.python_version()}; load average at start {load[0]:.2f}"
        if isinstance(load[0], float)
        else f"{now}; {cpu}; torch {torch.__version__}"
    )


def write_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``## heading`` of RESULTS.md, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    title = f"## {heading}"
    section = f"{title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
