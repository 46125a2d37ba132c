"""Destroying the process group joins gloo's worker threads, after every collective we use.

A gloo worker thread that is still alive when the interpreter finalizes may free a
Python-owned tensor there (a finished collective's buffers); CPython < 3.14 then ends the
thread with ``pthread_exit``, which aborts the rank with "terminate called without an active
exception" (docs/distributed.rst, "Teardown"). The ranks here run the differentiable
all-reduce (forward and backward), an all-gather and a barrier, destroy the group, and
report which threads are left; the parent checks that no gloo thread is, and that each rank
then exits normally through the interpreter's own teardown.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def _rank(rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    from pyro_ntk.distributed import init_from_env

    comm = init_from_env("gloo", timeout=20, init_method=f"file://{rendezvous}")
    # torch.func imports torch._dynamo lazily, which imports torch.distributed.nn.functional
    # (whose defaults must not hold the group): import it after init, as the engine would
    importlib.import_module("torch._dynamo")

    x = torch.ones(5, dtype=torch.float64, requires_grad=True)
    (comm.all_reduce(x) ** 2).sum().backward()
    comm.all_reduce(torch.ones(7))
    comm.all_gather_rows(torch.ones(rank + 1, 3))
    threads_before = [Path(t, "comm").read_text().strip() for t in glob.glob("/proc/self/task/*")]
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    threads = [Path(t, "comm").read_text().strip() for t in glob.glob("/proc/self/task/*")]
    result = {"grad": x.grad.tolist(), "before": threads_before, "after": threads}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.skipif(sys.platform != "linux", reason="reads thread names from /proc")
def test_destroy_process_group_joins_gloo_threads(tmp_path):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, GLOO_SOCKET_IFNAME="lo")
    env.pop("WORLD_SIZE", None)
    world = 2
    args = [str(world), str(tmp_path / "rendezvous"), str(tmp_path)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        texts = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, text) in enumerate(zip(procs, texts, strict=True)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{text}"
        assert "terminate called" not in text, text
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # d/dx Σ_j (Σ_r x_r)_j² summed over both ranks' losses: 2 · 2 · (2 · 1) = 8
        assert got["grad"] == [8.0] * 5
        assert any(name in GLOO_THREADS for name in got["before"]), got["before"]
        left = [name for name in got["after"] if name in GLOO_THREADS]
        assert not left, f"rank {rank}: gloo threads alive after destroy_process_group: {left}"


if __name__ == "__main__":
    _rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
