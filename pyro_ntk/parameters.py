"""The linearized parameter space: which parameters, their layout as one flat vector, groups.

A :class:`ParameterSpace` owns *detached copies* of the selected parameters θ* (and of the
remaining parameters and buffers, held fixed), so the user's network is never touched.
Flat vectors of length ``P`` concatenate the selected parameters in ``named_parameters()``
order; each parameter belongs to a *group*, the module that owns it (a layer), which is
what per-layer variances σ_g² attach to. :func:`normalize_variance` is the one check of a
prior variance σ² (a scalar or one per group), applied once at each public entry;
:func:`normalize_positive` is its sibling for a positive quantity that is not one (a noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from pyro_ntk._checks import check_finite

__all__ = ["ParamSelector", "ParameterSpace", "normalize_positive", "normalize_variance"]

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
        self._group_index = torch.repeat_interleave(
            torch.tensor(self.group_of, device=self.device),
            torch.tensor(self.numels, device=self.device),
        )

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
        return self._group_index

    def expand_group_values(self, values: Tensor) -> Tensor:
        """Map per-group values ``(G,)`` (or a scalar) to per-parameter values ``(P,)``.

        A gather with an index built once: no host synchronization (a K·v hot path).
        """
        if values.dim() == 0:
            return values.expand(self.num_params)
        index = self._group_index
        if index.device != values.device:
            index = index.to(values.device)
        return values[index]

    def normalize_variance(
        self, where: str, variance: object, layer_variances: bool | None = None, **options
    ) -> tuple[Tensor, bool]:
        """:func:`normalize_variance` for this space's groups, dtype and device."""
        return normalize_variance(
            where, variance, self.groups, self.dtype, self.device, layer_variances, **options
        )

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


def _as_tensor(
    where: str, name: str, value: object, dtype: torch.dtype, device, convert: bool, what: str
) -> Tensor:
    """``value`` as a tensor in ``dtype`` on ``device`` (numbers always cast; see ``convert``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        if not (convert and isinstance(value, (list, tuple))):
            raise TypeError(f"{where}: {name} must be {what}, got {type(value).__name__}.")
    if not isinstance(value, Tensor) or convert:
        try:
            value = torch.as_tensor(value, dtype=dtype, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{where}: {name} must be {what}, got {value!r}.") from exc
    if value.dtype != dtype:
        raise TypeError(f"{where}: {name} has dtype {value.dtype}, expected {dtype}.")
    if value.device != torch.device(device):
        raise ValueError(f"{where}: {name} is on device {value.device}, expected {device}.")
    return value


def normalize_positive(
    where: str,
    name: str,
    value: object,
    dtype: torch.dtype,
    device: torch.device,
    *,
    scalar: bool = True,
    convert: bool = False,
) -> Tensor:
    r"""The check of a positive quantity that is not a per-group variance (a noise :math:`s^2`).

    .. math:: s^2 \in (0, \infty), \qquad \text{shape } () \text{ or, unless } \texttt{scalar},
              (*\text{batch}).

    Run once at a public entry (it synchronizes with the device to test the values).

    Args:
        where: the public entry point, first in every message.
        name: the argument's name in messages.
        value: a number or a tensor (or, with ``convert``, a sequence).
        dtype: the network's dtype; a tensor must match it unless ``convert``.
        device: the network's device; likewise.
        scalar: require shape ``()`` (else any batch shape).
        convert: cast numbers, sequences and tensors to ``dtype``/``device`` instead of
            refusing another dtype or device.

    Returns:
        The tensor (the given one when nothing was converted, so gradients reach it).

    Example:
        >>> normalize_positive("f", "noise", 0.5, torch.float64, torch.device("cpu")).tolist()
        0.5
    """
    value = _as_tensor(where, name, value, dtype, device, convert, "a positive number or tensor")
    if scalar and value.dim() != 0:
        raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}; expected a scalar.")
    values = value.detach()
    if not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
        raise ValueError(
            f"{where}: {name} must be positive and finite, got {values.cpu().tolist()}."
        )
    return value


def normalize_variance(
    where: str,
    variance: object,
    groups: list[str],
    dtype: torch.dtype,
    device: torch.device,
    layer_variances: bool | None = None,
    *,
    name: str = "variance",
    positive: bool = False,
    batched: bool = False,
    convert: bool = False,
) -> tuple[Tensor, bool]:
    r"""The one check of a prior variance σ²: a scalar, or one value per parameter group.

    .. math:: \sigma^2 \in [0, \infty) \ (\text{or } (0, \infty)), \qquad
              \text{shape } (*\text{batch}) \text{ or } (*\text{batch}, G).

    Run once at a public entry (it synchronizes with the device to test the values); the
    products downstream take its result unchecked.

    Args:
        where: the public entry point, first in every message.
        variance: ``None`` (ones), a number, a tensor (or, with ``convert``, a sequence).
        groups: the parameter groups (their number ``G`` and names for messages).
        dtype: the network's dtype; a tensor must match it unless ``convert``.
        device: the network's device; likewise.
        layer_variances: ``True``: one value per group (a scalar is broadcast to ``(G,)``
            unless ``batched``); ``False``: one shared value; ``None``: per group when the
            last dimension is ``G`` (and, if ``batched``, ``G > 1``).
        name: the argument's name in messages.
        positive: require ``σ² > 0`` (else ``σ² ≥ 0``).
        batched: allow leading batch dimensions.
        convert: cast numbers, sequences and tensors to ``dtype``/``device`` instead of
            refusing another dtype or device.

    Returns:
        ``(σ², per_group)``: the tensor (the given one when nothing was converted, so
        gradients reach it) and whether its last dimension runs over the groups.

    Example:
        >>> v, per_group = normalize_variance("f", 2.0, ["0", "2"], torch.float64, torch.device("cpu"))
        >>> v.tolist(), per_group
        (2.0, False)
        >>> v, per_group = normalize_variance("f", None, ["0", "2"], torch.float64, "cpu", True)
        >>> v.tolist(), per_group
        ([1.0, 1.0], True)
    """
    if layer_variances is not None and not isinstance(layer_variances, bool):
        raise TypeError(
            f"{where}: layer_variances must be a bool or None, got "
            f"{type(layer_variances).__name__}."
        )
    G = len(groups)
    if variance is None:
        return torch.ones(G if layer_variances else (), dtype=dtype, device=device), bool(
            layer_variances
        )
    variance = _as_tensor(
        where, name, variance, dtype, device, convert, "None, a number or a tensor"
    )
    shape = tuple(variance.shape)
    last_is_g = variance.dim() >= 1 and shape[-1] == G
    if layer_variances is None:
        per_group = last_is_g and (G > 1 or not batched)
        ok = batched or variance.dim() == 0 or (variance.dim() == 1 and last_is_g)
        expected = f"a scalar or ({G},), one per parameter group {groups}"
    elif layer_variances:
        if variance.dim() == 0 and not batched:
            variance = variance.expand(G)
        per_group, ok = True, variance.dim() >= 1 and variance.shape[-1] == G
        ok = ok and (batched or variance.dim() == 1)
        dims = f"(*batch, {G})" if batched else f"({G},)"
        expected = f"{dims}, one per layer {groups} (layer_variances=True)"
    else:
        per_group, ok = False, batched or variance.dim() == 0
        expected = "a scalar (layer_variances=False)"
    if not ok:
        raise ValueError(f"{where}: {name} has shape {shape}; expected {expected}.")
    values = variance.detach()
    if positive:
        if not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
            raise ValueError(
                f"{where}: {name} must be positive and finite (σ² > 0), got "
                f"{values.cpu().tolist()}."
            )
    else:
        check_finite(where, name, values)
        if bool((values < 0).any()):
            raise ValueError(
                f"{where}: {name} must be non-negative (σ² ≥ 0), got minimum "
                f"{float(values.min()):.3g}."
            )
    return variance, per_group
