"""Test configuration: float64 by default, fixed seeds, a ``requires_cuda`` skip."""

import pytest
import torch

torch.set_default_dtype(torch.float64)
# The suite runs thousands of tiny products: one thread avoids oversubscription overhead.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
