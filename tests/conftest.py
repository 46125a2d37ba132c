"""Test configuration: float64 by default, fixed seeds, a clean Pyro param store, a GPU skip."""

import pyro
import pytest
import torch

torch.set_default_dtype(torch.float64)
# The suite runs thousands of tiny products: one thread avoids oversubscription overhead.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    # a test that changes the thread count (the demo's restore test) must not leak it
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_param_store():
    # Pyro's parameter store is global: a test must not see another test's parameters
    # (a model built under the same names would start from them).
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
