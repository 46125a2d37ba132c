"""What the two NTK kernels share: the linearization of a network or of one of its outputs.

:class:`SelectOutput` is a thin ``nn.Module`` that *refers* to the user's network (its
parameters are the network's own, under the prefix ``network.``); a
:class:`~pyro_ntk.Linearization` of it copies θ* as usual, so the user's network is never
wrapped, mutated or trained. The helpers translate parameter selectors and group names
between the network's naming and the wrapper's. :class:`LinearizedKernel` holds the
linearization, its groups and the initial σ² of :class:`~pyro_ntk.EmpiricalNTK` and
:class:`~pyro_ntk.NTKKernel`.
"""

from __future__ import annotations

from torch import Tensor, nn

from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.parameters import ParamSelector, normalize_variance

PREFIX = "network."


class SelectOutput(nn.Module):
    r"""``x ↦ f_k(x)``: output ``k`` of ``network`` (outputs flattened per example).

    .. math:: \mathrm{SelectOutput}(x) = f(x; \theta)_k, \qquad \partial/\partial\theta
        \text{ is row } k \text{ of } J(x),

    so linearizing it costs one backward pass per example instead of ``O``.

    Args:
        network: the user's network (held by reference, never modified).
        k: the output index, ``0 <= k < O``.
        where: entry-point name for the out-of-range error.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> SelectOutput(net, 1, where="example")(torch.randn(4, 3)).shape
        torch.Size([4])
    """

    def __init__(self, network: nn.Module, k: int, where: str):
        super().__init__()
        self.network = network
        self.k = k
        self.where = where

    def forward(self, x: Tensor) -> Tensor:
        """Output ``k`` of the network, shape ``(n,)``."""
        out = self.network(x)
        out = out.reshape(out.shape[0], -1)
        if self.k >= out.shape[1]:
            raise ValueError(
                f"{self.where}: output={self.k} is out of range; the network has "
                f"{out.shape[1]} output(s) per example (valid: 0..{out.shape[1] - 1})."
            )
        return out[:, self.k]


def check_output(where: str, output: object) -> int | None:
    """Validate an ``output`` argument: ``None`` or a non-negative ``int``."""
    if output is None:
        return None
    if isinstance(output, bool) or not isinstance(output, int) or output < 0:
        raise ValueError(
            f"{where}: output must be None or a non-negative int (an output index), got {output!r}."
        )
    return output


def prefixed_selector(network: nn.Module, params: ParamSelector, where: str) -> ParamSelector:
    """Translate a parameter selector on ``network`` into one on ``SelectOutput(network)``."""
    if params is None or isinstance(params, str):
        return params  # str: Linearization rejects it with a clear message
    if callable(params):
        return lambda name, p: params(name[len(PREFIX) :], p)
    wanted = list(params)
    known = [n for n, _ in network.named_parameters()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(
            f"{where}: params names {unknown} are not parameters of the network {sorted(known)}."
        )
    return [PREFIX + n for n in wanted]


def output_linearization(
    network: nn.Module | Linearization,
    params: ParamSelector,
    output: int | None,
    chunk_size: int | None,
    where: str,
) -> Linearization:
    """The :class:`~pyro_ntk.Linearization` of ``network`` (``output=None``) or of its output ``k``.

    ``output`` is checked first (:func:`check_output`). A plain object, not an ``nn.Module``:
    it holds θ* as plain tensors, so a kernel that keeps it as an attribute never takes the
    network into its own module tree. A ``Linearization`` is used as it is (a kernel and a
    mean built from it share one θ* copy); narrowing one to a single output needs the network
    itself.
    """
    output = check_output(where, output)
    if output is None or not isinstance(network, nn.Module):
        if output is not None and isinstance(network, Linearization):
            raise ValueError(
                f"{where}: output={output} needs the nn.Module (a Linearization of all outputs "
                "cannot be narrowed to one); pass the network, or output=None."
            )
        return as_linearization(where, network, params, chunk_size)
    target = SelectOutput(network, output, where)
    return Linearization(target, prefixed_selector(network, params, where), chunk_size=chunk_size)


def unprefixed_group(group: str) -> str:
    """The network's own name for a group of ``SelectOutput(network)``."""
    return group[len(PREFIX) :] if group.startswith(PREFIX) else ""


class LinearizedKernel:
    r"""The base of the NTK kernels: the linearization, its groups and the initial σ².

    A mixin beside the framework's kernel class (Pyro's or GPyTorch's). After the framework's
    ``__init__``, :meth:`_keep_linearization` stores the linearization (a plain attribute:
    θ* never enters the kernel's ``parameters()``) and returns the initial σ².
    """

    _lin: Linearization
    output: int | None
    layer_variances: bool
    # whether the user passed ``variance`` (False: it defaulted to 1, and pyro_ntk.fit may
    # start it at the data-aware value, then set it to True)
    variance_given: bool

    def _keep_linearization(
        self,
        where: str,
        lin: Linearization,
        output: int | None,
        variance: Tensor | float | None,
        layer_variances: bool,
    ) -> Tensor:
        """Store ``lin`` and ``output``; the initial σ², ``()`` or ``(G,)``, detached."""
        self._lin = lin
        self.output = output
        self.variance_given = variance is not None
        init, self.layer_variances = normalize_variance(
            where,
            variance,
            self.groups,
            lin.dtype,
            lin.device,
            layer_variances,
            positive=True,
            convert=True,
        )
        return init.detach().clone()

    @property
    def linearization(self) -> Linearization:
        """The :class:`pyro_ntk.Linearization` this kernel is built on (θ* copied)."""
        return self._lin

    @property
    def groups(self) -> list[str]:
        """The layers (parameter groups), in the order of a per-layer ``variance``."""
        groups = self._lin.groups
        return groups if self.output is None else [unprefixed_group(g) for g in groups]
