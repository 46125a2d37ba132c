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
from pyro_ntk.demo.training import _progress, train_mse


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


def _fit_gp(model, steps: int, lr: float, desc: str, progress: bool) -> list[float]:
    """Fit a ``pyro.contrib.gp`` model's parameters by SVI (as ``gp.util.train``), with a bar."""
    from pyro.infer import TraceMeanField_ELBO

    loss_fn = TraceMeanField_ELBO().differentiable_loss
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    bar = _progress(range(steps), desc, progress)
    for step in bar:
        opt.zero_grad()
        loss = loss_fn(model.model, model.guide)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _source_only(net: nn.Module, data: Data, cfg: DemoConfig) -> Result:
    t0 = time.perf_counter()
    with torch.no_grad():
        mse = float((net(data.X_target).squeeze(-1) - data.y_target).square().mean())
    mean, var = _plug_in(net, data, mse)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("source network (no adaptation)", *scores, time.perf_counter() - t0, mean, var)


def _ntk_gp(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, object]:
    from pyro_ntk import NTKGPRegression

    t0 = time.perf_counter()
    gpr = NTKGPRegression(
        data.X_target,
        data.y_target,
        net,
        noise=torch.tensor(0.1, device=data.X_target.device),
        layer_variances=cfg.layer_variances,
    )
    losses = _fit_gp(gpr, cfg.svi_steps, 0.05, "NTK-GP: SVI on noise and variance", cfg.progress)
    with torch.no_grad():
        mean, var = gpr(data.X_test, noiseless=False)
    seconds = time.perf_counter() - t0
    variance = gpr.variance.detach().reshape(-1)
    shown = ", ".join(f"{v:.3g}" for v in variance.tolist())
    info = (
        f"NTK-GP fitted noise s2 = {float(gpr.noise.detach()):.3g}, variance(s) = {shown}; "
        f"SVI loss {losses[0]:.2f} -> {losses[-1]:.2f}"
        if losses
        else ""
    )
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("NTK-GP (pyro_ntk)", *scores, seconds, mean, var, info), gpr


def _fine_tune(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, nn.Module]:
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


def _last_layer(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, nn.Module]:
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


def _rbf_gp(net: nn.Module, data: Data, cfg: DemoConfig) -> tuple[Result, object]:
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
    _fit_gp(gpr, cfg.svi_steps, 0.05, "RBF GP: SVI on its hyperparameters", cfg.progress)
    with torch.no_grad():
        mean, var = gpr(data.X_test, full_cov=False, noiseless=False)
    scores = gaussian_scores(mean, var, data.y_test)
    return Result("RBF GP (pyro.contrib.gp)", *scores, time.perf_counter() - t0, mean, var), gpr


REGRESSION_METHODS = (_ntk_gp, _fine_tune, _last_layer, _rbf_gp)
