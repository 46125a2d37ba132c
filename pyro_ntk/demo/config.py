"""The demo's configuration and its records: options, run settings, a problem, a scored method."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

TASKS = ("sine", "diabetes", "digits")
SOURCE_STEPS = {"sine": 3000, "diabetes": 3000, "digits": 1000}  # default Adam steps per task
#: ``--quick``: a configuration for smoke checks, seconds on a CPU (figures not meaningful).
QUICK = {"num_source": 200, "num_test": 100, "source_steps": 300, "finetune_steps": 100,
         "fit_steps": 100}  # fmt: skip
Z95 = 1.959963984540054


@dataclass
class DemoConfig:
    """Sizes and steps of the demo (defaults: under 2 minutes on a 2-core CPU).

    Args:
        task: ``"sine"``, ``"diabetes"`` or ``"digits"``.
        num_target: labelled target points used for adaptation; for ``digits``, labelled
            images *per new class* (k-shot: ``5 k`` images in all).
        seed: seed of the tasks, the data split and every initialization.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ...
        out_dir: where the PNG is written.
        cache_dir: where trained source networks are cached; ``None`` uses
            ``$XDG_CACHE_HOME/pyro_ntk`` (or ``~/.cache/pyro_ntk``); ``""`` disables the cache.
        num_source: source training points (sine; the other tasks use all their source rows).
        num_test: target test points (sine; the other tasks use all remaining target rows).
        source_steps: Adam steps training the source network; ``None``: the task's default,
            :data:`SOURCE_STEPS` (digits: minibatches of 64 images).
        finetune_steps: Adam steps of fine-tuning and of last-layer retraining (digits: of
            fine-tuning; its new last layer is fitted by L-BFGS).
        fit_steps: the step cap of each GP's hyperparameter fit (:func:`pyro_ntk.infer.fit`,
            which stops earlier once converged and warns if it reaches the cap first);
            ``None``: ``fit``'s own cap.
        layer_variances: one NTK variance per layer instead of one in all (regression tasks;
            the digits task always fits one prior variance per layer).
        progress: show tqdm progress bars.
        plot: write the PNG (needs matplotlib).
    """

    task: str = "sine"
    num_target: int = 10
    seed: int = 0
    device: str = "auto"
    out_dir: str = "outputs"
    cache_dir: str | None = None
    num_source: int = 400
    num_test: int = 500
    source_steps: int | None = None
    finetune_steps: int = 500
    fit_steps: int | None = None
    layer_variances: bool = False
    progress: bool = True
    plot: bool = True

    @classmethod
    def quick(cls, **options) -> DemoConfig:
        """The ``--quick`` configuration: :data:`QUICK`'s sizes and caps, then ``options``.

        Fewer source points and steps, fewer test points, and step caps on fine-tuning and
        on each fit, for smoke checks (seconds on a CPU, the source network included); the
        figures it prints are not the documented ones. A fit that reaches its cap warns.

        Example:
            >>> DemoConfig.quick(task="sine", num_test=50).num_test
            50
        """
        return cls(**{**QUICK, **options})

    def resolved_source_steps(self) -> int:
        """``source_steps``, or the task's default when it is ``None``."""
        if self.source_steps is not None:
            return self.source_steps
        return SOURCE_STEPS.get(self.task, 3000)


@dataclass
class Data:
    """One transfer problem: source training data, target adaptation and test data.

    For classification (``num_classes`` set) the ``y_*`` are integer class labels and the
    target's classes are numbered ``0 .. num_classes - 1``.
    """

    name: str
    X_source: Tensor
    y_source: Tensor
    X_target: Tensor
    y_target: Tensor
    X_test: Tensor
    y_test: Tensor
    description: str
    truth: Callable[[Tensor], Tensor] | None = None  # noise-free target function (1-D tasks)
    num_classes: int | None = None  # classification tasks: classes of source and of target


@dataclass
class Result:
    """Scores of one regression method on the target task's test points."""

    method: str
    rmse: float
    nll: float
    coverage: float
    seconds: float
    mean: Tensor
    var: Tensor
    info: str = ""


@dataclass
class ClassificationResult:
    """Scores of one classification method on the target task's test points."""

    method: str
    accuracy: float
    nll: float
    ece: float
    seconds: float
    probs: Tensor  # (n_test, C) predictive class probabilities
    info: str = ""


def resolve_device(name: str) -> torch.device:
    """The torch device named by ``--device`` (``"auto"``: CUDA if available).

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

    Returns:
        The device.

    Raises:
        ValueError: not a device name, or CUDA requested where there is none.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"demo: --device {name!r} is not a torch device ({err}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"demo: --device {name!r} requested, but CUDA is not available here.")
    return device


@contextlib.contextmanager
def run_settings(
    num_threads: int | None = 1,
    *,
    dtype: torch.dtype | None = torch.float64,
    module_local_params: bool | None = True,
) -> Iterator[None]:
    """``num_threads`` intra-op threads, ``dtype`` by default and Pyro's module-local parameters.

    The settings of the demo, the examples and the transfer benchmark: tiny networks, where
    one thread avoids thread start-up and spin-wait costs on a shared CPU, float64 for the
    GP's solves, and several GP models in one process, which module-local parameters keep
    apart. Each setting given is restored on exit, also when the block raises; a setting
    given as ``None`` is left as it is.

    Args:
        num_threads: ``torch.set_num_threads`` for the run (``None``: leave it).
        dtype: ``torch.set_default_dtype`` for the run, a floating dtype (``None``: leave
            it, e.g. for a script whose tensors carry their own dtype).
        module_local_params: ``pyro.settings`` ``module_local_params`` for the run
            (``None``: leave it).

    Raises:
        ValueError: ``num_threads`` not a positive integer, or ``dtype`` not a floating
            torch dtype.

    Cost: O(1).

    Example:
        >>> with run_settings():
        ...     torch.zeros(1).dtype
        torch.float64
        >>> with run_settings(2, dtype=None):
        ...     torch.get_num_threads(), torch.zeros(1).dtype == torch.get_default_dtype()
        (2, True)
    """
    import pyro

    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ValueError(
            f"run_settings: num_threads must be a positive integer or None, got {num_threads!r}."
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"run_settings: dtype must be a floating torch dtype (torch.float32, "
            f"torch.float64) or None, got {dtype!r}."
        )
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if dtype is not None:
            torch.set_default_dtype(dtype)
        if module_local_params is None:
            yield
        else:
            with pyro.settings.context(module_local_params=module_local_params):
                yield
    finally:
        torch.set_default_dtype(old_dtype)
        torch.set_num_threads(old_threads)
