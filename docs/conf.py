"""Sphinx configuration for pyro_ntk (``make docs`` builds it with warnings as errors).

Built offline: no extension fetches anything at build time (no intersphinx inventories),
and MathJax is only referenced by the generated pages, for the reader's browser.

Every API page is always built, so a module that fails to import fails the build. Example
figures are embedded only where they were generated: the ``example-figure`` directive shows
``_static/<name>.png`` only if the file exists. The tutorial notebooks are rendered by
myst-nb with the outputs stored in them; the build never executes them.
"""

from __future__ import annotations

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

# -- extensions (nothing is downloaded at build time) --------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",  # the tutorial notebooks (docs/tutorials/*.ipynb), from the docs extra
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

# -- the modules with an API page and the tutorials (tests/test_docs.py checks both lists) ---
API_MODULES = [
    "linearization",
    "parameters",
    "operators",
    "kernels",
    "means",
    "distributions",
    "gp",
    "models",
    "likelihoods",
    "laplace",
    "adaptation",
    "infer",
    "plot",
    "preconditioners",
    "solvers",
    "options",
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
    "image_transfer",
]


exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# -- notebooks: rendered with the outputs stored in them (`make notebooks` re-executes them) --
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]  # $...$ and $$...$$ in markdown cells


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
