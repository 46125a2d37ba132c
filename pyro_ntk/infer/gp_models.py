r"""What :func:`~pyro_ntk.infer.fit` does to a ``pyro.contrib.gp`` model with an NTK kernel first.

**Data-aware σ².** When the kernel is an :class:`~pyro_ntk.EmpiricalNTK` built without a
variance (``variance_given`` false) and the model has data, its variance starts at

.. math:: \sigma^2_0 = \overline{r^2} / \overline{\operatorname{diag} K_1(X, X)},
    \qquad r = y - m(X),

(:func:`pyro_ntk.gp.initial_hyperparameters`, ``K_1`` the kernel at ``σ² = 1``): the prior
variance of ``f`` then matches the residuals' mean square. The kernel is then marked as given
(``variance_given = True``), so a second ``fit`` continues from the fitted value. The noise
of Pyro's ``GPRegression`` is *not* changed: its default (1) cannot be told apart from a
value the user chose. Cost: one kernel diagonal, ``O(N·P)``.

**Noise on its floor.** An :class:`~pyro_ntk.NTKGPRegression` whose noise was left to
the data has the default lower bound ``s² > 1e-4 × var(y)``. When the fit ends with
``s² < 1.1 ×`` that bound, the marginal likelihood kept falling as ``s² → 0``: the targets
are explained without noise, which few points cannot tell from noisy targets.
:func:`warn_noise_on_floor` then warns with the figures and the remedy (a ``noise_floor``
at the noise level expected). A floor the user gave is their choice: no warning.

**Inducing points.** The NTK is a function of the trained weights and does not differentiate
through its inputs, so a ``SparseGPRegression`` or ``VariationalSparseGP`` with an NTK kernel
cannot move its inducing points ``Xu``. ``fit`` warns once per model and leaves ``Xu`` out of
the optimised parameters (its ``requires_grad`` is off during the fit, then restored); the
kernel's variance, the noise and the variational parameters are fitted as usual.

Example:
    >>> import pyro.contrib.gp as gp, torch
    >>> from pyro_ntk import EmpiricalNTK
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> X = torch.linspace(-1, 1, 6).unsqueeze(-1)
    >>> sgpr = gp.models.SparseGPRegression(X, X.squeeze(-1), EmpiricalNTK(net), X[:2].clone())
    >>> fixed_inducing_points(sgpr) is sgpr.Xu
    True
"""

from __future__ import annotations

import warnings
import weakref

import torch
from pyro.contrib.gp.models import SparseGPRegression, VariationalSparseGP
from pyro.contrib.gp.models.model import GPModel
from pyro.nn.module import PyroParam
from torch import Tensor

from pyro_ntk.gp import initial_hyperparameters
from pyro_ntk.kernels import EmpiricalNTK

__all__ = [
    "fixed_inducing_points",
    "set_initial_variance",
    "warn_fixed_inducing_points",
    "warn_noise_on_floor",
]

#: s² within this factor of the default floor counts as "on the floor".
FLOOR_FACTOR = 1.1

_WARNED: weakref.WeakSet = weakref.WeakSet()


def _ntk_kernels(model: GPModel) -> list[EmpiricalNTK]:
    kernel = getattr(model, "kernel", None)
    if not isinstance(kernel, torch.nn.Module):
        return []
    return [k for k in kernel.modules() if isinstance(k, EmpiricalNTK)]


def fixed_inducing_points(model: object) -> Tensor | None:
    """``model.Xu`` for a sparse Pyro GP model whose kernel contains an NTK, else ``None``."""
    if isinstance(model, SparseGPRegression | VariationalSparseGP) and _ntk_kernels(model):
        return model.Xu
    return None


def warn_fixed_inducing_points(model: GPModel, name: str) -> None:
    """Warn (once per model) that the inducing points stay where they are."""
    if model in _WARNED:
        return
    _WARNED.add(model)
    warnings.warn(
        f"fit: {name} has an NTK kernel, which does not differentiate through its inputs: "
        f"its inducing points Xu (shape {tuple(model.Xu.shape)}) stay fixed, and fit leaves them "
        "out of the optimised parameters. Choose them before fitting (e.g. a subset of X or "
        "k-means centres); the kernel variance, noise and variational parameters are fitted.",
        UserWarning,
        stacklevel=3,
    )


def set_initial_variance(model: GPModel) -> float | None:
    """Set the NTK kernel's σ² from the data when none was given (module docstring).

    Returns:
        The σ² set, or ``None`` when nothing was changed (a variance given, a kernel that is
        not one :class:`~pyro_ntk.EmpiricalNTK`, no data, or a ``PyroSample`` prior).
    """
    kernel = getattr(model, "kernel", None)
    if not isinstance(kernel, EmpiricalNTK) or getattr(kernel, "variance_given", True):
        return None
    X, y = getattr(model, "X", None), getattr(model, "y", None)
    if X is None or y is None or "variance" not in kernel._pyro_params:
        return None
    constraint, event_dim = kernel._pyro_params["variance"]
    with torch.no_grad():
        variance = kernel.variance.detach()
        if variance.dim() > 0 and not bool((variance == variance.reshape(-1)[0]).all()):
            return None  # per-layer values that differ: chosen by someone, keep them
        scale = variance.reshape(-1)[0]
        kernel_diag = kernel(X, diag=True) / scale
        mean_function = getattr(model, "mean_function", None)
        mean = mean_function(X) if callable(mean_function) else torch.zeros((), dtype=y.dtype)
        _, sigma2 = initial_hyperparameters(y - mean, kernel_diag)
    kernel.variance = PyroParam(torch.full_like(variance, sigma2), constraint, event_dim)
    kernel.variance_given = True
    return sigma2


def warn_noise_on_floor(model: GPModel, name: str) -> float | None:
    """Warn when a fitted noise ended on its default floor (module docstring).

    Args:
        model: the fitted model; only an :class:`~pyro_ntk.NTKGPRegression` whose
            ``noise_floor`` was chosen by default (``noise_floor_by_default``) is checked.
        name: the model's name in the message.

    Returns:
        The fitted s² when it warned, else ``None``.
    """
    if not getattr(model, "noise_floor_by_default", False):
        return None
    floor = float(model.noise_floor)
    noise = float(model.noise.detach().max())
    if noise >= FLOOR_FACTOR * floor:
        return None
    N = model.X.shape[0]
    warnings.warn(
        f"fit: {name}'s fitted noise s² = {noise:.3g} ended on its default floor "
        f"{floor:.3g} (1e-4 × var(y)) with N = {N} targets: the marginal likelihood explains "
        "them without noise, which few points cannot tell from noisy targets, and on noisy "
        "targets the predictive variances are then too small. If the targets are noisy, give "
        "NTKGPRegression the noise level you expect as noise_floor (e.g. 1e-2 × var(y)); "
        "if they are noise-free, give noise_floor explicitly to silence this warning.",
        UserWarning,
        stacklevel=3,
    )
    return noise
