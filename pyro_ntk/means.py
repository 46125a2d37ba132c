r"""The network itself as a GP mean function: :math:`m(x) = f(x; \theta^*)`.

With :class:`pyro_ntk.EmpiricalNTK` as the kernel this makes a Pyro GP model the
linearized network :math:`f(x;\theta^*) + J(x)(\theta-\theta^*)`.
"""

from __future__ import annotations

from torch import Tensor, nn

from pyro_ntk._checks import check_tensor
from pyro_ntk.kernels._output import check_output
from pyro_ntk.linearization import Linearization, as_linearization


class NetworkMean(nn.Module):
    r"""The trained network's output as a mean function for ``pyro.contrib.gp`` models.

    .. math:: m(x) = f(x; \theta^*)_k \quad\text{(or the only output, or all outputs)}.

    Shapes follow what Pyro's GP models add the mean to (``f_loc`` has shape
    ``latent_shape + (N,)``):

    * ``output=k``, or a single-output network: ``(N,)``; the form ``GPRegression`` and
      ``SparseGPRegression`` need: their ``model()`` expands the likelihood by
      ``y.shape[:-1]``, which mis-broadcasts an ``(O, N)`` mean against ``(O, N)`` targets,
      so fit one model per output there;
    * ``output=None`` with ``O > 1`` outputs: ``(O, N)``, matching
      ``VariationalGP``/``VariationalSparseGP`` with ``latent_shape=(O,)`` (e.g. the
      ``MultiClass`` likelihood), beside ``EmpiricalNTK(network)``'s output-averaged kernel.

    θ* is copied at construction (the network may change later without effect); the
    network is evaluated in eval mode (its train/eval flags are restored) and without
    gradients, so this module has no parameters and never trains the network. 1-D inputs
    are read as ``N × 1``, as Pyro's kernels do; other inputs reach the network unchanged.

    Cost: one forward pass of the network over ``X``.

    Args:
        network: the trained ``nn.Module``, or a :class:`~pyro_ntk.Linearization` to share
            its θ* copy (e.g. with an :class:`~pyro_ntk.EmpiricalNTK` built from it).
        output: ``None`` or an output index ``k``.
        chunk_size: inputs per forward pass (``None``: all at once).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X = torch.randn(5, 2)
        >>> NetworkMean(net)(X).shape, NetworkMean(net, output=1)(X).shape
        (torch.Size([3, 5]), torch.Size([5]))
        >>> list(NetworkMean(net).parameters())
        []
    """

    def __init__(
        self,
        network: nn.Module | Linearization,
        output: int | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.output = check_output("NetworkMean", output)
        # Every parameter is held fixed at θ*: a plain object, outside the module tree. A
        # Linearization is shared as it is (f(X; θ*) does not depend on its selection).
        if isinstance(network, Linearization):
            self._lin = as_linearization("NetworkMean", network, None, chunk_size)
        else:
            self._lin = as_linearization(
                "NetworkMean", network, lambda name, p: True, chunk_size=chunk_size
            )

    def forward(self, X: Tensor) -> Tensor:
        """f(X; θ*): ``(N,)`` for one output, ``(O, N)`` for all ``O > 1`` outputs."""
        X = check_tensor("NetworkMean", "X", X)
        if X.dim() == 1:
            X = X.unsqueeze(1)
        X = self._lin.check_inputs("NetworkMean", "X", X)
        out = self._lin(X)  # (N, O), no graph to θ
        O = out.shape[1]
        if self.output is not None:
            if self.output >= O:
                raise ValueError(
                    f"NetworkMean: output={self.output} is out of range; the network has {O} "
                    f"output(s) per example (valid: 0..{O - 1})."
                )
            return out[:, self.output]
        return out[:, 0] if O == 1 else out.T.contiguous()

    def extra_repr(self) -> str:
        """The network's class and the output index, for ``print(module)``."""
        return f"network={type(self._lin.network).__name__}, output={self.output}"
