r"""Synthetic task families for transfer experiments (no downloads, deterministic given a seed).

The sine family of few-shot regression (Finn et al. 2017; Maddox et al. 2021):

.. math::

    y = A \sin(x + \varphi) + \varepsilon,\qquad A \sim U[0.1, 5],\;
    \varphi \sim U[0, \pi],\; x \sim U[-5, 5],\; \varepsilon \sim \mathcal N(0, (\rho A)^2),

with relative noise level ``ρ`` (default 0.01, as in the reference experiments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_ntk._checks import check_positive_int

__all__ = ["SineTask", "sample_sine_tasks"]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"pyro_ntk.datasets: seed must be an int, got {seed!r}.")
    return torch.Generator().manual_seed(seed)


def _uniform(gen: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)


@dataclass(frozen=True)
class SineTask:
    r"""One task :math:`x \mapsto A \sin(x + \varphi)` of the sine family.

    Args:
        amplitude: A > 0.
        phase: φ.
        noise: relative observation noise ρ (standard deviation ``ρ·A``).

    Example:
        >>> task = SineTask(amplitude=2.0, phase=0.0)
        >>> X, y = task.sample(4, seed=0)
        >>> X.shape, y.shape
        (torch.Size([4, 1]), torch.Size([4]))
    """

    amplitude: float
    phase: float
    noise: float = 0.01

    def __post_init__(self):
        if not (self.amplitude > 0 and math.isfinite(self.amplitude)):
            raise ValueError(f"SineTask: amplitude must be > 0, got {self.amplitude!r}.")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ValueError(f"SineTask: noise must be >= 0, got {self.noise!r}.")

    @property
    def noise_std(self) -> float:
        """The observation noise standard deviation ``ρ·A``."""
        return self.noise * self.amplitude

    def __call__(self, X: Tensor) -> Tensor:
        """Noise-free values ``A sin(x + φ)`` for ``X`` of shape ``(n, 1)`` → ``(n,)``."""
        return self.amplitude * torch.sin(X[..., 0] + self.phase)

    def sample(
        self,
        n: int,
        seed: int,
        x_range: tuple[float, float] = X_RANGE,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``n`` noisy observations at ``x ~ U[x_range]``: ``X (n, 1)``, ``y (n,)``.

        Deterministic given ``seed``; returned in ``dtype`` (default: torch's default).
        """
        check_positive_int("SineTask.sample", "n", n)
        gen = _generator(seed)
        X = _uniform(gen, x_range[0], x_range[1], n, 1)
        y = self(X) + self.noise_std * torch.randn(n, generator=gen, dtype=torch.float64)
        dtype = dtype or torch.get_default_dtype()
        return X.to(dtype), y.to(dtype)


def sample_sine_tasks(num_tasks: int, seed: int, noise: float = 0.01) -> list[SineTask]:
    """``num_tasks`` tasks with ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``, deterministic given ``seed``.

    Example:
        >>> tasks = sample_sine_tasks(3, seed=0)
        >>> len(tasks), all(0.1 <= t.amplitude <= 5 for t in tasks)
        (3, True)
    """
    check_positive_int("sample_sine_tasks", "num_tasks", num_tasks)
    gen = _generator(seed)
    A = _uniform(gen, *AMPLITUDE_RANGE, num_tasks)
    phi = _uniform(gen, *PHASE_RANGE, num_tasks)
    return [SineTask(float(a), float(p), noise) for a, p in zip(A, phi)]
