"""A copy of a linearized network in another dtype or device, loaded with θ* (internal).

The user's network is never touched: a deep copy is loaded with θ* and the fixed tensors
of the parameter space, then converted. Cost: one deep copy of the network.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pyro_ntk.parameters import ParameterSpace


def resolve_target(
    where: str,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    current: tuple[torch.dtype, torch.device],
) -> tuple[torch.dtype, torch.device]:
    """The ``(dtype, device)`` asked for, ``None`` keeping the current one (checked)."""
    dtype = current[0] if dtype is None else dtype
    device = current[1] if device is None else torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a floating-point torch.dtype, got {dtype!r}.")
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device  # resolve "cuda" to "cuda:k"
    return dtype, device


def converted_network(
    where: str,
    network: nn.Module,
    space: ParameterSpace,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """A deep copy of ``network`` holding θ* and the fixed tensors, in ``dtype`` on ``device``."""
    try:
        copied = copy.deepcopy(network)
    except Exception as exc:  # any failure of deepcopy is reported the same way
        raise TypeError(
            f"{where}: cannot convert to dtype {dtype} / device {device} because the network "
            f"{type(network).__name__} cannot be deep-copied ({exc}); build a "
            f"Linearization of a converted network instead."
        ) from exc
    owned = dict(copied.named_parameters())
    owned.update(dict(copied.named_buffers()))
    with torch.no_grad():
        for name, value in {**space.theta, **space.fixed}.items():
            owned[name].copy_(value)
    return copied.to(device=device, dtype=dtype)
