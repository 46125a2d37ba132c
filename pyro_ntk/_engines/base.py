"""The engine interface: Jacobian products for one chunk of inputs."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pyro_ntk._parameters import ParameterSpace


class Engine(ABC):
    """Jacobian products of ``f(θ, X)`` at θ* for one chunk ``X`` of ``n`` inputs.

    Shapes: ``P`` parameters, ``O`` outputs per example, ``k`` right-hand sides. Every
    method is called with the network already in eval mode.

    Args:
        network: the user's network; only called through ``functional_call``.
        space: the linearized parameter space (θ* and the fixed tensors).
    """

    name: str = "base"

    def __init__(self, network: nn.Module, space: ParameterSpace):
        self.network = network
        self.space = space

    def f(self, theta: dict[str, Tensor], X: Tensor) -> Tensor:
        """The network as a function of its linearized parameters, output ``(n, O)``."""
        out = functional_call(self.network, (theta, self.space.fixed), (X,))
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Linearization: the network must return a single tensor, got {type(out).__name__}."
            )
        return out.reshape(X.shape[0], -1)

    def forward(self, X: Tensor) -> Tensor:
        """f(X; θ*), shape ``(n, O)``."""
        with torch.no_grad():
            return self.f(self.space.theta, X)

    @abstractmethod
    def jvp(self, X: Tensor, V: Tensor) -> Tensor:
        """J(X) V for ``V`` of shape ``(P, k)``, giving ``(n, O, k)``."""

    @abstractmethod
    def vjp(self, X: Tensor, U: Tensor) -> Tensor:
        """J(X)ᵀ U for ``U`` of shape ``(n, O, k)``, giving ``(P, k)``."""

    @abstractmethod
    def jacobian(self, X: Tensor) -> Tensor:
        """Dense per-example Jacobian, shape ``(n, O, P)``."""

    def ntk_diag(self, X: Tensor, scale: Tensor | None) -> Tensor:
        """Diag of J diag(scale) Jᵀ for this chunk, shape ``(n, O)``; ``scale`` is ``(P,)``."""
        J = self.jacobian(X)
        return (J.square() * scale).sum(-1) if scale is not None else J.square().sum(-1)

    def ntk_block(self, X1: Tensor, X2: Tensor, scale: Tensor | None) -> Tensor:
        """Dense block J(X1) diag(scale) J(X2)ᵀ, shape ``(n1·O, n2·O)``."""
        J1 = self.jacobian(X1)
        J2 = J1 if X2 is X1 else self.jacobian(X2)
        if scale is not None:
            J1 = J1 * scale
        # (n1, O, P) · (n2, O, P) → (n1, O, n2, O), rows n·O + o
        K = torch.einsum("aop,bqp->aobq", J1, J2)
        return K.reshape(J1.shape[0] * J1.shape[1], J2.shape[0] * J2.shape[1])
