r"""Synthetic task families for transfer experiments (no downloads, deterministic given a seed).

The sine family of few-shot regression (Finn et al. 2017; Maddox et al. 2021):

.. math::

    y = A \sin(x + \varphi) + \varepsilon,\qquad A \sim U[0.1, 5],\;
    \varphi \sim U[0, \pi],\; x \sim U[-5, 5],\; \varepsilon \sim \mathcal N(0, (\rho A)^2),

with relative noise level ``ρ`` (default 0.01, as in the reference experiments).

And a few-shot classification transfer on scikit-learn's bundled 8×8 digits
(:func:`digits_transfer`): source = digits 0–4, target = digits 5–9 from ``k`` labelled
images per class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_ntk._checks import check_positive_int

__all__ = ["DigitsTransfer", "SineTask", "digits_transfer", "k_shot_split", "sample_sine_tasks"]

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


def k_shot_split(
    labels: Tensor, k: int, seed: int = 0, num_classes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Indices of ``k`` labelled examples per class and of all the others.

    For each class ``c = 0, 1, …, C − 1`` in turn, the first ``k`` of a random permutation
    of that class's indices (one ``torch.Generator`` seeded with ``seed`` for all classes,
    so a class with fewer than ``k`` examples gives all of them); every other index is a
    test index. Cost: ``O(C · n)``.

    Args:
        labels: integer class labels ``(n,)``.
        k: examples per class, ``>= 1``.
        seed: seed of the draw.
        num_classes: ``C`` (default: ``labels.max() + 1``).

    Returns:
        ``(train, test)``: ``train`` ``(C k,)`` class by class, ``test`` the remaining
        indices in increasing order.

    Example:
        >>> train, test = k_shot_split(torch.tensor([0, 1, 0, 1, 0, 1]), k=1, seed=0)
        >>> train.shape, test.shape
        (torch.Size([2]), torch.Size([4]))
    """
    where = "k_shot_split"
    check_positive_int(where, "k", k)
    gen = _generator(seed)
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise TypeError(f"{where}: labels must be a 1-D integer tensor, got {labels!r:.80}.")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    chosen = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(-1)
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    train = torch.cat(chosen) if chosen else labels.new_zeros(0)
    test = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
    test[train] = False
    return train, test.nonzero().squeeze(-1)


@dataclass(frozen=True)
class DigitsTransfer:
    """The digits transfer problem: a source task and a k-shot target task (see :func:`digits_transfer`).

    Images are ``(n, 1, 8, 8)`` with pixel values in ``[0, 1]``; labels are ``int64``. The
    target's labels are the digits 5–9 renumbered ``0 .. 4``.

    Attributes:
        X_source: the images of digits 0–4 ``(n_s, 1, 8, 8)``.
        y_source: their labels ``(n_s,)`` in ``0 .. 4``.
        X_target: ``k`` images of each digit 5–9, ``(5 k, 1, 8, 8)``, class by class.
        y_target: their labels ``(5 k,)`` (digit − 5).
        X_test: every other image of digits 5–9.
        y_test: their labels (digit − 5).
    """

    X_source: Tensor
    y_source: Tensor
    X_target: Tensor
    y_target: Tensor
    X_test: Tensor
    y_test: Tensor


def digits_transfer(k: int, seed: int = 0, dtype: torch.dtype | None = None) -> DigitsTransfer:
    r"""Split scikit-learn's digits (1 797 images, 8×8) into a source and a k-shot target task.

    Source: all images of the digits 0–4 (901). Target: the digits 5–9 (896 images),
    relabelled 0–4; for each class ``c`` the ``k`` adaptation images are the first ``k`` of a
    random permutation of that class's images (one ``torch.Generator`` seeded with ``seed``,
    drawn class by class from ``c = 0`` to ``4``), and every other target image is a test
    image. Pixels are divided by 16 (the data's maximum), so they lie in :math:`[0, 1]`.
    The data ship inside scikit-learn: nothing is downloaded.

    Args:
        k: labelled images per target class, ``1 <= k`` and fewer than the smallest class
            (174 images).
        seed: seed of the k-shot draw.
        dtype: floating dtype of the images (default: torch's default).

    Returns:
        A :class:`DigitsTransfer`.

    Raises:
        ValueError: ``k`` out of range.
        RuntimeError: scikit-learn is not installed.

    Example:
        >>> data = digits_transfer(k=2, seed=0)
        >>> data.X_target.shape, data.y_target.tolist()
        (torch.Size([10, 1, 8, 8]), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
        >>> data.X_source.shape[0] + data.X_target.shape[0] + data.X_test.shape[0]
        1797
    """
    where = "digits_transfer"
    check_positive_int(where, "k", k)
    _generator(seed)  # checks the seed before the data are loaded
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn ships with the extras
        raise RuntimeError(f"{where}: needs scikit-learn (pip install scikit-learn).") from err
    images, labels = load_digits(return_X_y=True)  # bundled with scikit-learn
    X = torch.as_tensor(images, dtype=dtype or torch.get_default_dtype()).reshape(-1, 1, 8, 8)
    X = X / 16.0
    y = torch.as_tensor(labels, dtype=torch.int64)
    source = y < 5
    Xt, yt = X[~source], y[~source] - 5
    smallest = int(torch.bincount(yt).min())
    if k >= smallest:
        raise ValueError(
            f"{where}: k must be below {smallest} (the smallest target class), got {k}."
        )
    train, test = k_shot_split(yt, k, seed, num_classes=5)
    return DigitsTransfer(X[source], y[source], Xt[train], yt[train], Xt[test], yt[test])
