"""The linearized parameter space: which parameters, their layout as one flat vector, groups.

A :class:`ParameterSpace` owns *detached copies* of the selected parameters θ* (and of the
remaining parameters and buffers, held fixed), so the user's network is never touched.
Flat vectors of length ``P`` concatenate the selected parameters in ``named_parameters()``
order; each parameter belongs to a *group*, the module that owns it (a layer), which is
what per-layer variances σ_g² attach to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

ParamSelector = None | Iterable[str] | Callable[[str, nn.Parameter], bool]


class ParameterSpace:
    """Detached copies of a network's parameters, split into linearized and fixed ones.

    Args:
        network: the trained network.
        params: ``None`` (every parameter with ``requires_grad``), an iterable of parameter
            names, or a predicate ``(name, parameter) -> bool``.
        where: entry-point name used in error messages.

    Attributes:
        names: names of the linearized parameters, in flat order.
        shapes: their shapes.
        numels: their sizes; ``P = sum(numels)``.
        theta: ``dict`` name → detached copy of θ* (linearized parameters).
        fixed: ``dict`` name → detached copy of the other parameters and all buffers.
        groups: group (owning-module) names, in order of first appearance.
        group_of: for each linearized parameter, the index of its group.
    """

    def __init__(self, network: nn.Module, params: ParamSelector = None, *, where: str):
        if not isinstance(network, nn.Module):
            raise TypeError(
                f"{where}: network must be a torch.nn.Module, got {type(network).__name__}."
            )
        named = list(network.named_parameters())
        if not named:
            raise ValueError(
                f"{where}: network ({type(network).__name__}) has no parameters to linearize; "
                f"expected at least one."
            )
        selected = _select(named, params, where)
        if not selected:
            hint = " (params=None selects those with requires_grad=True)" if params is None else ""
            raise ValueError(
                f"{where}: params selected no parameters{hint}; expected at least one of "
                f"{[n for n, _ in named]}."
            )
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) > 1:
            raise TypeError(
                f"{where}: network parameters have several dtypes {sorted(map(str, dtypes))}."
            )
        if len(devices) > 1:
            raise ValueError(
                f"{where}: network parameters are on several devices {sorted(map(str, devices))}."
            )
        if not next(iter(dtypes)).is_floating_point:
            raise TypeError(
                f"{where}: network parameters must be floating point, got {dtypes.pop()}."
            )

        chosen = set(selected)
        self.names: list[str] = list(selected)
        self.theta: dict[str, Tensor] = {n: p.detach().clone() for n, p in named if n in chosen}
        self.fixed: dict[str, Tensor] = {n: p.detach().clone() for n, p in named if n not in chosen}
        self.fixed.update({n: b.detach().clone() for n, b in network.named_buffers()})
        self.shapes = [self.theta[n].shape for n in self.names]
        self.numels = [self.theta[n].numel() for n in self.names]
        self.groups: list[str] = []
        self.group_of: list[int] = []
        for n in self.names:
            g = n.rsplit(".", 1)[0] if "." in n else ""
            if g not in self.groups:
                self.groups.append(g)
            self.group_of.append(self.groups.index(g))
        self.dtype = next(iter(dtypes))
        self.device = next(iter(devices))

    @property
    def num_params(self) -> int:
        """P, the number of linearized scalar parameters."""
        return sum(self.numels)

    @property
    def num_groups(self) -> int:
        """G, the number of parameter groups (layers)."""
        return len(self.groups)

    def versions(self) -> tuple[int, ...]:
        """Version counters of θ* and the fixed tensors: any in-place change bumps one."""
        return tuple(t._version for t in self.theta.values()) + tuple(
            t._version for t in self.fixed.values()
        )

    def group_index(self) -> Tensor:
        """Group index of every flat parameter, shape ``(P,)``, on the parameters' device."""
        sizes = torch.tensor(self.numels, device=self.device)
        return torch.repeat_interleave(torch.tensor(self.group_of, device=self.device), sizes)

    def expand_group_values(self, values: Tensor) -> Tensor:
        """Map per-group values ``(G,)`` (or a scalar) to per-parameter values ``(P,)``."""
        if values.dim() == 0:
            return values.expand(self.num_params)
        return values[self.group_index()]

    def group_grams(self, A: Tensor) -> Tensor:
        r"""Per-group Gram matrices of the rows of ``A``: :math:`A_g^\top A_g`, shape ``(G, M, M)``.

        ``A`` is ``(P, M)`` in the flat layout (rows = parameters; pass ``J.T`` for the
        ``J_g J_gᵀ`` of a Jacobian). Each parameter's rows are a contiguous slice, so the
        blocks are views (no copies, unlike a boolean mask per group); a group's parameters
        are summed. Cost ``O(P·M²)``.
        """
        M = A.shape[1]
        out = A.new_zeros(self.num_groups, M, M)
        for g, block in zip(self.group_of, torch.split(A, self.numels, dim=0)):
            out[g].addmm_(block.T, block)
        return out

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``(P, *rest)`` into ``{name: (*shape, *rest)}``; views, no copies."""
        rest = flat.shape[1:]
        pieces = torch.split(flat, self.numels, dim=0)
        return {n: t.reshape(*s, *rest) for n, s, t in zip(self.names, self.shapes, pieces)}

    def unflatten_batched(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``(P, k)`` into ``{name: (k, *shape)}`` for ``vmap`` over columns."""
        pieces = torch.split(flat, self.numels, dim=0)
        return {n: t.T.reshape(-1, *s) for n, s, t in zip(self.names, self.shapes, pieces)}

    def flatten_batched(self, tree: dict[str, Tensor], lead: int = 1) -> Tensor:
        """Concatenate ``{name: (*lead_dims, *shape)}`` into ``(*lead_dims, P)``."""
        first = tree[self.names[0]]
        lead_shape = first.shape[:lead]
        return torch.cat([tree[n].reshape(*lead_shape, -1) for n in self.names], dim=-1)


def _select(named: list[tuple[str, nn.Parameter]], params: ParamSelector, where: str) -> list[str]:
    if params is None:
        return [n for n, p in named if p.requires_grad]
    if callable(params):
        return [n for n, p in named if params(n, p)]
    if isinstance(params, str):
        raise TypeError(
            f"{where}: params must be a list of names, not the single string {params!r}."
        )
    if not isinstance(params, Iterable):
        raise TypeError(
            f"{where}: params must be None, a list of parameter names or a predicate "
            f"(name, parameter) -> bool, got {type(params).__name__}."
        )
    wanted = list(params)
    not_names = sorted({type(n).__name__ for n in wanted if not isinstance(n, str)})
    if not_names:
        raise TypeError(
            f"{where}: params must list parameter names (str), got entries of type {not_names}; "
            f"to select parameters by object use a predicate, e.g. lambda name, p: p is w."
        )
    known = {n for n, _ in named}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(
            f"{where}: params names {unknown} are not parameters of the network {sorted(known)}."
        )
    return [n for n, _ in named if n in set(wanted)]
