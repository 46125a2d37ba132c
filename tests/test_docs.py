"""The documentation stays true: the README example runs, and every public name has a page."""

from __future__ import annotations

import copy
import pkgutil
import re
import warnings
from pathlib import Path

import pyro.contrib.gp as gp
import pytest
import torch
from networks import assert_unchanged, snapshot

import pyro_ntk
from pyro_ntk import Linearization

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOT_DOCUMENTED = {"demo"}  # the demo has a tutorial page instead (docs/tutorials/demo.rst)


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def _conf_list(name: str) -> list[str]:
    text = (DOCS / "conf.py").read_text()
    body = re.search(rf"^{name} = \[(.*?)\]", text, flags=re.S | re.M)
    assert body, f"docs/conf.py has no list {name}"
    return re.findall(r'"([^"]+)"', body.group(1))


def _documented_modules() -> dict[str, str]:
    """Module name → API page, from the ``.. automodule::`` directives in docs/api."""
    pages = {}
    for page in sorted((DOCS / "api").glob("*.rst")):
        for module in re.findall(r"^\.\. automodule:: (\S+)", page.read_text(), flags=re.M):
            pages[module] = page.name
    return pages


def test_readme_example_is_the_quickstart_page():
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md has no ```python block"
    assert blocks[0] == (DOCS / "quickstart.py").read_text(), (
        "README.md's example and docs/quickstart.py (shown on the getting-started page) differ; "
        "keep them identical."
    )


@pytest.fixture(scope="module")
def readme_example() -> dict:
    """The namespace of README.md's example, run as written, and the warnings it raised."""
    code = _python_blocks((ROOT / "README.md").read_text())[0]
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the one third-party warning the test suite ignores (pyproject.toml): linear_operator
        # decorates its helpers with torch.jit.script when it is first imported
        warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
        exec(compile(code, "README.md", "exec"), namespace)
    namespace["__warnings__"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    return namespace


def test_readme_example_fit_converges_to_the_true_noise(readme_example):
    assert readme_example["__warnings__"] == []
    result = readme_example["result"]
    assert result.converged, result.reason
    assert result.losses[-1] < result.losses[0] and result.steps == len(result.losses)
    noise = float(readme_example["gpr"].noise.detach())
    assert 0.01 / 2 <= noise <= 0.01 * 2, noise  # the target's true noise is s² = 0.1² = 0.01
    # the noise is what the marginal likelihood asks for: a dense float64 reference's optimum
    gpr = readme_example["gpr"]
    X, y = gpr.X.double(), gpr.y.double()
    net64 = copy.deepcopy(readme_example["net"]).double()
    K = Linearization(net64).ntk_dense(X).detach()
    r = (y - net64(X).squeeze(-1)).detach()
    log_params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_params], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        s2, v = log_params.exp()
        L = torch.linalg.cholesky(v * K + s2 * torch.eye(len(y), dtype=torch.float64))
        loss = 0.5 * r @ torch.cholesky_solve(r[:, None], L).squeeze(-1) + L.diagonal().log().sum()
        loss.backward()
        return loss

    opt.step(closure)
    reference = float(log_params[0].detach().exp())
    assert noise == pytest.approx(reference, rel=0.05)


def test_readme_example_adapts_without_training_the_network(readme_example):
    mean, var = readme_example["mean"], readme_example["var"]
    net, gpr = readme_example["net"], readme_example["gpr"]
    assert mean.shape == var.shape == (100,)
    assert torch.isfinite(mean).all() and (var > 0).all()
    # the posterior mean moved from the source network towards the target task
    Xs = torch.linspace(-5, 5, 100).unsqueeze(-1)
    truth = 1.5 * torch.sin(Xs + 0.5).squeeze(-1)
    with torch.no_grad():
        source_error = (net(Xs).squeeze(-1) - truth).square().mean()
    assert (mean.detach() - truth).square().mean() < source_error
    # Pyro's own gp.util.train still works on the model, and does not train the network
    before = snapshot(net)
    gp.util.train(pyro_ntk.NTKGPRegression(gpr.X, gpr.y, net), num_steps=2)
    assert_unchanged(net, before)


def test_every_public_name_is_in_the_api_reference():
    pages = _documented_modules()
    missing = []
    for name in pyro_ntk.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(pyro_ntk, name)
        owner = obj.__module__
        # the page of the module itself, or of a package above it that re-exports the name
        candidates = [m for m in pages if owner == m or owner.startswith(m + ".")]
        ok = False
        for module in candidates:
            mod = __import__(module, fromlist=["_"])
            exported = getattr(mod, "__all__", None)
            if owner == module or (exported is not None and name in exported):
                ok = True
        if not ok:
            missing.append(f"{name} (defined in {owner})")
    assert not missing, (
        "public names without an API page: "
        + ", ".join(missing)
        + ". Add docs/api/<module>.rst with '.. automodule:: pyro_ntk.<module>' (and the module "
        "to API_MODULES in docs/conf.py), or list the name in the package's __all__."
    )


def test_every_public_module_has_an_api_page():
    pages = _documented_modules()
    listed = _conf_list("API_MODULES")
    for info in pkgutil.iter_modules(pyro_ntk.__path__):
        name = info.name
        if name.startswith("_") or name in NOT_DOCUMENTED:
            continue
        assert f"pyro_ntk.{name}" in pages, f"pyro_ntk.{name} has no page in docs/api/"
        assert name in listed, f"add {name!r} to API_MODULES in docs/conf.py"
    for name in listed:
        assert (DOCS / "api" / f"{name}.rst").exists(), f"docs/api/{name}.rst is missing"


def test_every_example_has_a_tutorial_page():
    listed = _conf_list("TUTORIALS")
    for script in sorted((ROOT / "examples").glob("*.py")):
        name = script.stem
        if name.startswith("_"):
            continue
        page = DOCS / "tutorials" / f"{name}.rst"
        assert page.exists(), f"examples/{script.name} has no page docs/tutorials/{name}.rst"
        assert name in listed, f"add {name!r} to TUTORIALS in docs/conf.py"
        assert f"examples/{script.name}" in page.read_text()
