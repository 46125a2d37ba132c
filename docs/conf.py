"""Sphinx configuration for pyro_ntk (``make docs`` builds it with warnings as errors).

Built offline: no extension fetches anything at build time (no intersphinx inventories),
and MathJax is only referenced by the generated pages, for the reader's browser.

Pages that describe code written in parallel (API modules, example scripts) are built only
when that code exists, so the site builds cleanly at every stage of the project:

* ``api/<module>.rst`` is excluded unless ``pyro_ntk.<module>`` imports;
* ``tutorials/<script>.rst`` is excluded unless ``examples/<script>.py`` exists;
* the ``example-figure`` directive shows ``_static/<name>.png`` only if the file exists.

The toctrees of these folders use ``:glob:``, so an excluded page leaves no dangling entry.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst.directives.images import Figure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

import pyro_ntk  # noqa: E402

# -- project ------------------------------------------------------------------------------
project = "pyro_ntk"
author = "pyro_ntk developers"
copyright = "2026, pyro_ntk developers"
release = pyro_ntk.__version__
version = ".".join(release.split(".")[:2])

# -- extensions (built-in only; nothing is downloaded at build time) -----------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# -- pages that exist only once their code exists ------------------------------------------
API_MODULES = [
    "linearization",
    "operators",
    "kernels",
    "means",
    "distributions",
    "ntk_system",
    "models",
    "fisher",
    "preconditioners",
    "solvers",
    "infer",
    "datasets",
    "testing",
    "distributed",
]
TUTORIALS = [
    "sine_transfer",
    "digits_transfer",
    "tabular_transfer",
    "layer_relevance",
    "linearization_quality",
    "distributed_regression",
]


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
exclude_patterns += [f"api/{m}.rst" for m in API_MODULES if not _importable(f"pyro_ntk.{m}")]
exclude_patterns += [
    f"tutorials/{t}.rst" for t in TUTORIALS if not (ROOT / "examples" / f"{t}.py").exists()
]

# -- output ------------------------------------------------------------------------------------
try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:  # the docs extra installs furo; fall back to Sphinx's default theme
    html_theme = "alabaster"
html_title = f"pyro_ntk {release}"
html_static_path = ["_static"] if (HERE / "_static").is_dir() else []
templates_path: list[str] = []
pygments_style = "sphinx"


class ExampleFigure(Figure):
    """``.. example-figure:: name.png``: a figure from ``docs/_static``, if it was generated.

    Example scripts write their plots when run; the docs embed the ones that were copied to
    ``docs/_static`` and otherwise say how to produce them, instead of failing the build.
    """

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        if (HERE / "_static" / name).exists():
            self.arguments[0] = f"/_static/{name}"
            return super().run()
        para = nodes.paragraph()
        para += nodes.emphasis(
            text=f"(The figure {name} appears here once the script has been run and its "
            "PNG copied to docs/_static.)"
        )
        return [para]


def setup(app):  # noqa: D103
    app.add_directive("example-figure", ExampleFigure)
    return {"parallel_read_safe": True}
