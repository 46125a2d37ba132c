"""Input validation shared by every public entry point.

Each helper raises ``ValueError`` or ``TypeError`` with a message that names the entry
point (``where``), the argument, what was given and what was expected. Nothing is
silently cast or broadcast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(where: str, name: str, value: object) -> Tensor:
    """Require ``value`` to be a ``torch.Tensor``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}.")
    return value


def check_inputs(
    where: str, name: str, X: object, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Validate network inputs: a non-empty tensor on ``device`` with finite values.

    Floating inputs must have the network's ``dtype``; integer inputs (token ids) pass.
    """
    X = check_tensor(where, name, X)
    if X.dim() == 0:
        raise ValueError(f"{where}: {name} must have a leading batch dimension, got a scalar.")
    if X.shape[0] == 0:
        raise ValueError(
            f"{where}: {name} is empty (shape {tuple(X.shape)}); expected N >= 1 rows."
        )
    if X.device != device:
        raise ValueError(
            f"{where}: {name} is on device {X.device}, but the network's parameters are on {device}."
        )
    if X.is_floating_point() or X.is_complex():
        if X.dtype != dtype:
            raise TypeError(
                f"{where}: {name} has dtype {X.dtype}, but the network's parameters have dtype "
                f"{dtype}; convert one of them explicitly."
            )
        check_finite(where, name, X)
    return X


def check_finite(where: str, name: str, value: Tensor) -> Tensor:
    """Reject NaN and infinite entries, reporting how many there are."""
    # One reduction instead of five elementwise passes (this runs on every product): a finite
    # sum proves every entry finite, since NaN and ±inf propagate; a sum that overflows on
    # finite entries falls through to the exact test.
    if (
        value.is_floating_point()
        and not bool(torch.isfinite(value.detach().sum()))
        and not bool(torch.isfinite(value).all())
    ):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"{where}: {name} contains {bad} NaN or infinite value(s) (shape {tuple(value.shape)})."
        )
    return value


def check_vector(
    where: str,
    name: str,
    value: object,
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
    rows_desc: str,
) -> Tensor:
    """Validate a right-hand side of shape ``(rows,)`` or ``(rows, k)``."""
    value = check_tensor(where, name, value)
    if value.dim() not in (1, 2) or value.shape[0] != rows:
        raise ValueError(
            f"{where}: {name} has shape {tuple(value.shape)}; expected ({rows},) or ({rows}, k) "
            f"with {rows} = {rows_desc}."
        )
    if value.dtype != dtype:
        raise TypeError(f"{where}: {name} has dtype {value.dtype}, expected {dtype}.")
    if value.device != device:
        raise ValueError(f"{where}: {name} is on device {value.device}, expected {device}.")
    return check_finite(where, name, value)


def check_nonnegative_int(where: str, name: str, value: object) -> int:
    """Require an ``int >= 0`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {name} must be an int >= 0, got {value!r}.")
    return value


def check_positive_int(
    where: str, name: str, value: object, allow_none: bool = False
) -> int | None:
    """Require a positive ``int`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    expected = "a positive int or None" if allow_none else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where}: {name} must be {expected}, got {value!r} of type {type(value).__name__}."
        )
    if value < 1:
        raise ValueError(f"{where}: {name} must be {expected}, got {value!r}.")
    return value


def check_choice(where: str, name: str, value: object, choices) -> object:
    """Require ``value`` to be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{where}: {name} must be one of {list(choices)}, got {value!r}.")
    return value
