r"""The regression adaptations the demo compares, and their Gaussian scores.

Each method takes the source network, the :class:`~pyro_ntk.demo.Data` and the
configuration, never modifies the network, and returns a :class:`~pyro_ntk.demo.Result`
(and, for plotting, what it fitted). The network baselines have no uncertainty of their own:
they predict :math:`\mathcal{N}(f(x), \hat s^2)` with :math:`\hat s^2` their mean squared
training residual on the target points (floored at 1e-6), the usual plug-in.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import Tensor, nn

from pyro_ntk.demo.config import Z95, Data, DemoConfig, Result
from pyro_ntk.demo.training import train_mse
from pyro_ntk.infer import fit


def gaussian_scores(mean: Tensor, var: Tensor, y: Tensor) -> tuple[float, float, float]:
    r"""RMSE, mean negative log-likelihood and 95 % coverage of :math:`\mathcal{N}(\mu, v)`.

    .. math::

        \mathrm{NLL} = \frac1n \sum_i \tfrac12 \log(2\pi v_i) + \frac{(y_i - \mu_i)^2}{2 v_i}

    Args:
        mean: predictive means ``(n,)``.
        var: predictive variances ``(n,)`` (of a noisy observation).
        y: targets ``(n,)``.

    Returns:
        ``(rmse, nll, coverage)`` as floats.

    Example:
        >>> rmse, nll, cov = gaussian_scores(torch.zeros(4), torch.ones(4), torch.zeros(4))
        >>> round(rmse, 3), round(nll, 3), cov
        (0.0, 0.919, 1.0)
    """
    mean, var, y = mean.detach(), var.detach(), y.detach()
    rmse = float((mean - y).square().mean().sqrt())
    nll = float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean).square() / var).mean())
    half = Z95 * var.sqrt()
    coverage = float(((y - mean).abs() <= half).to(torch.float64).mean())
    return rmse, nll, coverage


def _plug_in(net: nn.Module, data: Data, train_mse: float) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        mean = net(data.X_test).squeeze(-1)
    return mean, torch.full_like(mean, max(train_mse, 1e-6))


def source_only(net: nn.Module, data: Data, cfg: DemoConfig) -> Result:
    """**source network**: the network as it is, with the plug-in noise (the reference)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        mse = float((net(data.X_target).squeeze(-1) - data.y_target).square().mean())
    mean, var = _plug_in(net, data, mse)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("source network (no adaptation)", *scores, time.perf_counter() - t0, mean, var)


def ntk_gp(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, object]:
    """**NTK-GP**: :class:`~pyro_ntk.NTKGPRegression`, noise and variance(s) fitted by ``fit``.

    No initial value is given: the model scales them to the data (residuals of the targets
    about the network, diagonal of the kernel), and :func:`~pyro_ntk.infer.fit` maximises the
    exact marginal likelihood from there, at most ``cfg.fit_steps`` steps.

    Returns:
        The result and the fitted model.
    """
    from pyro_ntk import NTKGPRegression

    t0 = time.perf_counter()
    # A synthetic 1-D task (``truth`` known) has 1 % noise, nearly noise-free: its floor of s²
    # is the default's value, chosen on purpose (fit warns when s² ends on a default floor).
    floor = None if data.truth is None else 1e-4 * float(data.y_target.var())
    gpr = NTKGPRegression(
        data.X_target, data.y_target, net, layer_variances=cfg.layer_variances, noise_floor=floor
    )
    fitted = fit(
        gpr,
        max_steps=cfg.fit_steps,
        progress=cfg.progress,
        desc="NTK-GP: fitting noise and variance",
    )
    with torch.no_grad():
        mean, var = gpr(data.X_test, noiseless=False)
    seconds = time.perf_counter() - t0
    variance = gpr.variance.detach().reshape(-1)
    shown = ", ".join(f"{v:.3g}" for v in variance.tolist())
    info = (
        f"NTK-GP fitted noise s2 = {float(gpr.noise.detach()):.3g}, variance(s) = {shown}; "
        f"loss {fitted.losses[0]:.2f} -> {fitted.losses[-1]:.2f} in {fitted.steps} "
        f"{fitted.method} steps"
    )
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("NTK-GP (pyro_ntk)", *scores, seconds, mean, var, info), gpr


def fine_tune(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, nn.Module]:
    """**fine-tuning**: a copy of the network trained on the target points (Adam); and the copy."""
    t0 = time.perf_counter()
    tuned = copy.deepcopy(net)
    mse = train_mse(
        tuned,
        tuned.parameters(),
        data.X_target,
        data.y_target,
        cfg.finetune_steps,
        1e-2,
        "fine-tuning a copy",
        cfg.progress,
    )
    mean, var = _plug_in(tuned, data, mse)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("fine-tuning", *scores, time.perf_counter() - t0, mean, var), tuned


def last_layer(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, nn.Module]:
    """**last layer retrained**: a copy whose last ``nn.Linear`` alone is trained; and the copy."""
    t0 = time.perf_counter()
    tuned = copy.deepcopy(net)
    last = [m for m in tuned.modules() if isinstance(m, nn.Linear)][-1]
    for p in tuned.parameters():
        p.requires_grad_(False)
    for p in last.parameters():
        p.requires_grad_(True)
    mse = train_mse(
        tuned,
        last.parameters(),
        data.X_target,
        data.y_target,
        cfg.finetune_steps,
        1e-2,
        "retraining the last layer",
        cfg.progress,
    )
    mean, var = _plug_in(tuned, data, mse)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("last layer retrained", *scores, time.perf_counter() - t0, mean, var), tuned


def rbf_gp(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, object]:
    """**RBF GP**: ``pyro.contrib.gp``'s ``GPRegression`` (ARD ``RBF``), fitted by ``fit``; and it."""
    import pyro.contrib.gp as gp

    t0 = time.perf_counter()
    D = data.X_target.shape[1]
    device = data.X_target.device
    kernel = gp.kernels.RBF(
        input_dim=D,
        variance=torch.tensor(1.0, device=device),
        lengthscale=torch.ones(D, device=device),
    )
    gpr = gp.models.GPRegression(
        data.X_target, data.y_target, kernel, noise=torch.tensor(0.1, device=device)
    )
    fit(
        gpr,
        max_steps=cfg.fit_steps,
        progress=cfg.progress,
        desc="RBF GP: fitting its hyperparameters",
    )
    with torch.no_grad():
        mean, var = gpr(data.X_test, full_cov=False, noiseless=False)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("RBF GP (pyro.contrib.gp)", *scores, time.perf_counter() - t0, mean, var), gpr


REGRESSION_METHODS = (ntk_gp, fine_tune, last_layer, rbf_gp)
"""The adaptations, in the table's order (after :func:`source_only`)."""
