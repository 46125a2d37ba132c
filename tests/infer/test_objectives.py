"""Names of the objects fit speaks of in its messages."""

import torch

from pyro_ntk.infer.objectives import describe


def test_describe_names_a_local_function_by_its_own_name():
    def model(x):
        return x

    assert describe(model) == "model"
    assert describe(torch.nn.Linear(1, 1)) == "Linear"
    assert describe(describe) == "describe"
