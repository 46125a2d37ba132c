"""The tutorial notebooks run: each is executed in a fresh Jupyter kernel in quick mode.

``PYRO_NTK_QUICK=1`` makes every notebook use small sizes (a few seconds each). A cell that
raises fails the test, and so does a warning the kernel prints (except the step-cap warning
of :func:`pyro_ntk.fit`, expected from the quick sizes); each notebook must draw a figure.
Nothing is written into the repository: the kernel runs in a temporary folder and the
executed notebook is not saved.

``python tests/test_notebooks.py`` (``make notebooks``) executes them in full mode instead
and stores the outputs in the notebooks, which the docs render as they are.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))
# pyro_ntk.fit's warning when a fit reaches its step cap: expected at the quick sizes
QUICK_WARNING = re.compile(r": UserWarning: fit: .* unconverged")


def execute(path: Path, workdir: Path, timeout: int):
    """Run the notebook at ``path`` in a fresh ``python3`` kernel started in ``workdir``.

    Returns the executed notebook (not saved). Cell timings are not recorded, so a stored
    notebook changes only where its outputs do.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return nb


def _outputs(nb, kind: str) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if out.output_type == kind or kind in out.get("data", {})]  # fmt: skip


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    """The environment a kernel inherits: quick mode, inline figures, state in ``tmp_path``."""
    monkeypatch.setenv("PYRO_NTK_QUICK", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws figures
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files
    return tmp_path


def test_the_tutorials_are_notebooks():
    names = {path.stem for path in NOTEBOOKS}
    assert {"getting_started", "digits_story"} <= names, names
    rst = {path.stem for path in (ROOT / "docs" / "tutorials").glob("*.rst")}
    assert not names & rst, f"a notebook and a page share a name (Sphinx docname): {names & rst}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_are_one_clean_run(path):
    """What the docs render: every cell run once, in order, with figures and no error."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: run `make notebooks` ({counts})"
    assert not _outputs(nb, "error"), f"{path.name} stores an error"
    assert not [out for out in _outputs(nb, "stream") if out.name == "stderr"], path.name
    assert _outputs(nb, "image/png"), f"{path.name} stores no figure"
    assert path.stat().st_size < 600_000, f"{path.name}: {path.stat().st_size} bytes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, kernel_env):
    before = path.read_bytes()
    nb = execute(path, kernel_env, timeout=120)
    assert path.read_bytes() == before  # the stored notebook (with its full outputs) is kept
    stderr = [line for out in _outputs(nb, "stream") if out.name == "stderr"
              for line in out.text.splitlines()]  # fmt: skip
    # a warning's first line is not indented (the source line it quotes is)
    unexpected = [line for line in stderr
                  if line.strip() and not line[0].isspace() and not QUICK_WARNING.search(line)]  # fmt: skip
    assert not unexpected, f"{path.name} printed to stderr:\n" + "\n".join(stderr)
    assert _outputs(nb, "image/png"), f"{path.name} drew no figure"


def main() -> None:
    """Execute every notebook in full mode and store its outputs in place (``make notebooks``)."""
    import nbformat

    os.environ.pop("PYRO_NTK_QUICK", None)
    os.environ.pop("MPLBACKEND", None)
    for path in NOTEBOOKS:
        with tempfile.TemporaryDirectory() as workdir:
            print(f"executing {path.relative_to(ROOT)} ...", flush=True)
            nb = execute(path, Path(workdir), timeout=1200)
        nbformat.write(nb, path)
        print(f"  stored: {path.stat().st_size / 1e3:.0f} kB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
