"""The demo's transfer problems and the source architecture of each."""

from __future__ import annotations

import torch
from torch import nn

from pyro_ntk.demo.config import TASKS, Data, DemoConfig


def sine_data(cfg: DemoConfig) -> Data:
    """``sine``: source and target tasks of the sine family, ``cfg``'s numbers of points."""
    from pyro_ntk.datasets import sample_sine_tasks

    source, target = sample_sine_tasks(2, seed=cfg.seed)
    Xs, ys = source.sample(cfg.num_source, seed=cfg.seed + 1)
    Xa, ya = target.sample(cfg.num_target, seed=cfg.seed + 2)
    Xt, yt = target.sample(cfg.num_test, seed=cfg.seed + 3)
    desc = (
        f"sine: source y = {source.amplitude:.2f} sin(x + {source.phase:.2f}) "
        f"({cfg.num_source} points), target y = {target.amplitude:.2f} sin(x + "
        f"{target.phase:.2f}) from {cfg.num_target} points, {cfg.num_test} test points"
    )
    return Data("sine", Xs, ys, Xa, ya, Xt, yt, desc, truth=target)


def diabetes_data(cfg: DemoConfig) -> Data:
    """``diabetes``: trained on patients below the median age, adapted to the older ones.

    Standardized with the source rows' statistics; ``cfg.num_target`` older patients for
    adaptation (drawn with ``cfg.seed``), the other older patients for testing.
    """
    try:
        from sklearn.datasets import load_diabetes
    except ImportError as err:  # pragma: no cover - scikit-learn ships with the extras
        raise RuntimeError(
            "demo --task diabetes needs scikit-learn (pip install scikit-learn)."
        ) from err
    X, y = load_diabetes(return_X_y=True)  # shipped inside scikit-learn: no download
    X = torch.as_tensor(X, dtype=torch.get_default_dtype())
    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    age = X[:, 0]
    old = age > age.median()
    Xs, ys = X[~old], y[~old]
    Xo, yo = X[old], y[old]
    # standardize with the source statistics only (the target is a shifted domain)
    mu, sd = Xs.mean(0), Xs.std(0)
    ymu, ysd = ys.mean(), ys.std()
    Xs, Xo = (Xs - mu) / sd, (Xo - mu) / sd
    ys, yo = (ys - ymu) / ysd, (yo - ymu) / ysd
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(Xo.shape[0], generator=gen)
    if not 0 < cfg.num_target < Xo.shape[0]:
        raise ValueError(
            f"demo: --num-target must be between 1 and {Xo.shape[0] - 1} for the diabetes "
            f"task, got {cfg.num_target}."
        )
    ia, it = perm[: cfg.num_target], perm[cfg.num_target :]
    desc = (
        f"diabetes (scikit-learn, 10 features, standardized): source = {Xs.shape[0]} patients "
        f"aged below the median, target = older patients: {cfg.num_target} for adaptation, "
        f"{it.numel()} for testing"
    )
    return Data("diabetes", Xs, ys, Xo[ia], yo[ia], Xo[it], yo[it], desc)


def digits_data(cfg: DemoConfig) -> Data:
    """``digits``: :func:`~pyro_ntk.datasets.digits_transfer`, ``cfg.num_target`` images per class."""
    from pyro_ntk.datasets import digits_transfer

    try:
        d = digits_transfer(cfg.num_target, seed=cfg.seed)
    except ValueError as err:
        raise ValueError(f"demo: --num-target (images per class) for digits: {err}") from None
    desc = (
        f"digits (scikit-learn, 8x8 images): source = {d.X_source.shape[0]} images of 0-4, "
        f"target = digits 5-9 from {cfg.num_target} labelled images per class "
        f"({d.X_target.shape[0]} in all), {d.X_test.shape[0]} test images"
    )
    return Data(
        "digits", d.X_source, d.y_source, d.X_target, d.y_target, d.X_test, d.y_test, desc,
        num_classes=5,
    )  # fmt: skip


def load_task(cfg: DemoConfig) -> Data:
    """The transfer problem named by ``cfg.task``.

    Args:
        cfg: the demo configuration (task, seed, sizes).

    Returns:
        The :class:`~pyro_ntk.demo.Data`, in torch's default dtype, on the CPU.

    Raises:
        ValueError: an unknown task, a number of target points the task cannot supply, or
            a task that needs scikit-learn (``diabetes``, ``digits``) where it is missing.
    """
    import importlib.util

    loaders = {"sine": sine_data, "diabetes": diabetes_data, "digits": digits_data}
    if cfg.task not in loaders:
        raise ValueError(f"demo: --task must be one of {list(TASKS)}, got {cfg.task!r}.")
    if cfg.task != "sine" and importlib.util.find_spec("sklearn") is None:
        raise ValueError(
            f"demo: --task {cfg.task} needs scikit-learn, which is not installed (pip install "
            "scikit-learn); --task sine does not."
        )
    return loaders[cfg.task](cfg)


def make_network(task: str, input_dim: int, num_classes: int | None = None) -> nn.Module:
    """The source architecture of each task.

    Regression tasks: a small tanh MLP with one output. ``digits``: a small CNN
    (two 3×3 convolutions, 8 and 16 channels, the second with stride 2; a 32-unit ReLU layer;
    ``num_classes`` logits), about 9 600 parameters.

    Args:
        task: the task name.
        input_dim: number of input features (regression tasks; ignored for ``digits``).
        num_classes: number of logits (``digits``; default 5).

    Returns:
        A freshly initialized ``nn.Sequential``.

    Example:
        >>> make_network("sine", 1)(torch.zeros(3, 1)).shape
        torch.Size([3, 1])
    """
    if task == "digits":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 32),
            nn.ReLU(),
            nn.Linear(32, num_classes or 5),
        )
    width = 40 if task == "sine" else 50
    return nn.Sequential(
        nn.Linear(input_dim, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 1),
    )


def to_device(data: Data, device: torch.device) -> Data:
    """Move the data to ``device``, inputs and real targets in float64 (labels stay integer).

    Args:
        data: the transfer problem (modified in place).
        device: the target device.

    Returns:
        ``data``.
    """
    for name in ("X_source", "y_source", "X_target", "y_target", "X_test", "y_test"):
        value = getattr(data, name)
        if value.is_floating_point():
            value = value.to(dtype=torch.float64)
        setattr(data, name, value.to(device=device))
    return data
