import torch

from pyro_ntk import Linearization
from pyro_ntk.testing import reference_ntk


def test_ntk_mvm_matches_dense_reference():
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    X1, X2 = torch.randn(5, 3), torch.randn(4, 3)
    V = torch.randn(8, 3)
    K = reference_ntk(net, X1, X2)
    torch.testing.assert_close(Linearization(net).ntk_mvm(X1, X2, V), K @ V, rtol=1e-10, atol=1e-12)
