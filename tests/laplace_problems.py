"""Small classification, count and regression problems for the Laplace tests, and the
likelihood Hessians written out independently of the package."""

import torch
from torch import nn

from pyro_ntk.testing import reference_output

OUTPUTS = {"categorical": 3, "bernoulli": 1, "poisson": 1, "gaussian": 2}
"""Network outputs per likelihood."""


def laplace_problem(likelihood: str, n: int, seed: int = 0, hidden: tuple = (5,)):
    """A tanh MLP ``2 → hidden… → O`` and ``n`` inputs with targets drawn from its outputs."""
    torch.manual_seed(seed)
    sizes = (2, *hidden)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    net = nn.Sequential(*layers, nn.Linear(sizes[-1], OUTPUTS[likelihood]))
    X = torch.randn(n, 2)
    f = reference_output(net, X)
    if likelihood == "categorical":
        y = torch.distributions.Categorical(logits=f).sample()
    elif likelihood == "bernoulli":
        y = torch.distributions.Bernoulli(logits=f[:, 0]).sample()
    elif likelihood == "poisson":
        y = torch.distributions.Poisson(f[:, 0].exp()).sample()
    else:
        y = f + 0.3 * torch.randn_like(f)
    return net, X, y


def dense_hessian(likelihood: str, f: torch.Tensor, noise: float | None) -> torch.Tensor:
    """Λ_n ``(N, O, O)`` at outputs ``f`` (``noise``: the Gaussian likelihood's s²)."""
    if likelihood == "categorical":
        p = torch.softmax(f, -1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if likelihood == "bernoulli":
        p = torch.sigmoid(f)
        return torch.diag_embed(p * (1 - p))
    if likelihood == "poisson":
        return torch.diag_embed(f.exp())
    return torch.diag_embed(torch.full_like(f, 1 / noise))
