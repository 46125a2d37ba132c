"""The demo's entry point: load the task, train or load the source network, adapt, report."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from pyro_ntk.demo.classification import classification_methods
from pyro_ntk.demo.config import TASKS, Data, DemoConfig, resolve_device, run_settings
from pyro_ntk.demo.methods import REGRESSION_METHODS, source_only
from pyro_ntk.demo.report import format_table, plot_bands, plot_reliability
from pyro_ntk.demo.tasks import load_task, to_device
from pyro_ntk.demo.training import source_network

WARMUP_TEST_POINTS = 20


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo: train (or load) the source network, adapt it four ways, print, plot.

    Runs in float64 on one thread, with Pyro's module-local parameters (two GP models are
    fitted in one process, and Pyro's global param store would otherwise tie their
    parameters of the same name, such as ``noise``, together); all three settings are
    restored afterwards. The source network is never modified while adapting.

    Args:
        cfg: the configuration (see :class:`~pyro_ntk.demo.DemoConfig`).

    Returns:
        ``{"results": [Result | ClassificationResult, ...], "table": str,
        "figure": Path | None, "data": Data}``.

    Raises:
        ValueError: an unknown task, a bad device or a bad number of target points.
    """
    if cfg.task not in TASKS:
        raise ValueError(f"demo: --task must be one of {list(TASKS)}, got {cfg.task!r}.")
    if cfg.num_target < 1:
        raise ValueError(f"demo: --num-target must be >= 1, got {cfg.num_target}.")
    device = resolve_device(cfg.device)
    # The networks are tiny: one thread avoids thread start-up and spin-wait costs that, on
    # a busy machine, made each training step 10-100x slower than its arithmetic.
    with run_settings(num_threads=1):
        return _run(cfg, device)


def _run(cfg: DemoConfig, device: torch.device) -> dict:
    import pyro

    pyro.set_rng_seed(cfg.seed)
    data = to_device(load_task(cfg), device)
    print(f"task   : {data.description}")
    net, how = source_network(cfg, data, device)
    print(f"network: {how}")
    if data.num_classes is not None:
        return _classification(cfg, data, net)
    return _regression(cfg, data, net)


def _warm_up(cfg: DemoConfig, data: Data, methods) -> None:
    """Run every method for two steps on a few test points (one-time costs, not timed).

    The seconds in the table then measure the adaptation, not one-time costs such as the
    first calls into autograd, torch.func and linear_operator. Its results are discarded, and
    so are its warnings (two steps of a fit cannot converge); every warning the real run
    raises is still shown.
    """
    warm = dataclasses.replace(cfg, fit_steps=2, finetune_steps=2, progress=False)
    few = dataclasses.replace(
        data, X_test=data.X_test[:WARMUP_TEST_POINTS], y_test=data.y_test[:WARMUP_TEST_POINTS]
    )
    if data.num_classes is not None:  # one labelled image per class is enough to warm up
        first = torch.arange(0, data.y_target.numel(), cfg.num_target)
        few = dataclasses.replace(few, X_target=data.X_target[first], y_target=data.y_target[first])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in methods:
            method(few, warm)


def _regression(cfg: DemoConfig, data: Data, net) -> dict:
    _warm_up(cfg, data, [lambda d, c, m=m: m(net, d, c) for m in REGRESSION_METHODS])
    ntk_gp, fine_tune, last_layer, rbf_gp = REGRESSION_METHODS
    results = [source_only(net, data, cfg)]
    ntk, gpr = ntk_gp(net, data, cfg)
    ft, tuned = fine_tune(net, data, cfg)
    ll, last = last_layer(net, data, cfg)
    rbf, rbf_gp = rbf_gp(net, data, cfg)
    results += [ntk, ft, ll, rbf]
    table = format_table(results)
    print(ntk.info)
    print()
    print(table)
    print()
    print(
        "NLL: mean negative log-likelihood of a noisy test target. The network baselines "
        "predict N(f(x), s2),\nwith s2 their mean squared training error on the target points."
    )
    figure = None
    if cfg.plot:

        def network_band(model, var):
            def predict(Xg):
                with torch.no_grad():
                    m = model(Xg).squeeze(-1)
                return m, torch.full_like(m, var)

            return predict

        def gp_band(model):
            def predict(Xg):
                with torch.no_grad():
                    return model(Xg, noiseless=False)

            return predict

        methods = {
            ntk.method: gp_band(gpr),
            ft.method: network_band(tuned, float(ft.var[0])),
            ll.method: network_band(last, float(ll.var[0])),
            rbf.method: gp_band(rbf_gp),
        }
        path = Path(cfg.out_dir) / f"demo_{cfg.task}.png"
        figure = plot_bands(data, net, methods, results, path)
        _say_figure(figure)
    return {"results": results, "table": table, "figure": figure, "data": data}


def _classification(cfg: DemoConfig, data: Data, net) -> dict:
    _warm_up(cfg, data, [lambda d, c: classification_methods(net, d, c)])
    results = classification_methods(net, data, cfg)
    table = format_table(results)
    for r in results:
        if r.info:
            print(r.info)
    print()
    print(table)
    print()
    print(
        "NLL: mean negative log-likelihood of the true class; ECE: expected calibration error "
        "(15 equal-width\nconfidence bins). Every network method starts from the source body "
        "with a new last layer fitted\non the labelled target images; its seconds include "
        "that fit."
    )
    figure = None
    if cfg.plot:
        path = Path(cfg.out_dir) / f"demo_{cfg.task}.png"
        figure = plot_reliability(data, results, path)
        _say_figure(figure)
    return {"results": results, "table": table, "figure": figure, "data": data}


def _say_figure(figure: Path | None) -> None:
    print(
        "figure : skipped (matplotlib is not installed)" if figure is None else f"figure : {figure}"
    )
