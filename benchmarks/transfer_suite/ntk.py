r"""The pyro_ntk adaptations: the source network as a GP with its empirical NTK.

All start from θ* (the source network, never modified) and its linearization
``f_lin(x) = f(x; θ*) + J(x) δ``, ``δ ~ N(0, diag σ_g²)``.

* ``ntk_gp`` / ``ntk_gp_layers`` (regression): :class:`pyro_ntk.NTKGPRegression` with one σ²
  / one σ_g² per layer (3 for the 3-layer MLP), noise and variances by
  :func:`pyro_ntk.fit` (L-BFGS on the exact marginal likelihood, from the model's data-aware
  initial values). Predictive ``N(μ*, Σ* + s²)``.
* ``ntk_gp_floor`` (regression): ``ntk_gp`` with the few-shot noise recipe,
  ``noise_floor = 1e-2 × var(y)`` of the shots (the fitted s² may not claim that more than
  99 % of the targets' variance is signal). Added after the suite's first full run, where the
  default floor ``1e-4 × var(y)`` let s² collapse on 4 of 35 ten-label regression draws.
* ``ntk_gp_bayes`` (regression): the same model with σ² and s² **integrated out** instead
  of fitted (:func:`pyro_ntk.integrate_hyperparameters`: log-normal priors, standard deviation
  3 in log space (the default), centred where either part alone explains the residuals' mean square;
  predictive: the exact Gaussian mixture over the grid, scored as a mixture).
* ``ntk_gp_layers_bayes`` (regression): ``ntk_gp_layers`` with every σ_g² and s² integrated
  out (the same function: one log-normal prior per layer, centred as for σ², 4096 importance
  samples; predictive: the exact mixture over the samples). Added after the suite showed the
  type-II maximum likelihood of ``G + 1`` hyperparameters over-fitting ten labels.
* ``lin_laplace`` (classification, counts): :class:`pyro_ntk.LinearizedLaplace`
  (categorical / Poisson likelihood, ``kernel`` route, prior centred at θ*), per-layer σ_g²
  by the Laplace evidence (``optimize_prior``, one round of 50 L-BFGS steps with δ*
  refitted), extended-probit predictive (classification) or the Poisson mixture over
  200 draws of the log-rate from its Gaussian marginal (counts).
* ``lin_laplace_t`` (classification): the same Laplace **tempered**, ``T`` among 4⁻ʲ
  (j = 0 … 10) by stratified K-fold CV on the shots alone
  (:func:`pyro_ntk.cross_validate_temperature`, K = min(5, shots per class), the evidence's
  σ_g² refitted in every fold), then :func:`pyro_ntk.adaptation.tempered_laplace`.
* ``lin_svi`` (counts): :class:`pyro_ntk.LinearizedModel` with a Poisson likelihood on the
  log-rate, the Laplace evidence's σ_g², ``AutoNormal`` (means started at the Laplace's MAP δ*,
  scales at 10⁻³) by
  :func:`pyro_ntk.fit` (Adam lr 0.02, at most 300 steps, a budget fixed in
  advance as in ``examples/digits_transfer.py``), Monte Carlo predictive (200 draws).

Example:
    >>> sorted(METHODS)
    ['lin_laplace', 'lin_laplace_t', 'lin_svi', 'ntk_gp', 'ntk_gp_bayes', 'ntk_gp_floor', 'ntk_gp_layers', 'ntk_gp_layers_bayes']
"""

from __future__ import annotations

import pyro
import torch
from pyro import distributions as dist

from transfer_suite.baselines import Context, cv_folds

EVIDENCE_STEPS = 50
SVI_STEPS = 300
NUM_DRAWS = 200


FEW_SHOT_FLOOR = 1e-2  # noise_floor of ntk_gp_floor, a fraction of var(y)


def _ntk_gp(ctx: Context, layer_variances: bool, floor: float | None = None) -> dict:
    from pyro_ntk import NTKGPRegression, fit

    ya = ctx.draw.ya
    noise_floor = None if floor is None else floor * float(ya.var())
    gpr = NTKGPRegression(ctx.draw.Xa, ya, ctx.net, layer_variances=layer_variances,
                          noise_floor=noise_floor)  # fmt: skip
    result = fit(gpr, progress=False)
    with torch.no_grad():
        mean, var = gpr(ctx.draw.Xt, noiseless=False)
    v = ", ".join(f"{x:.2g}" for x in gpr.variance.detach().reshape(-1).tolist())
    return {"mean": mean, "var": var,
            "info": f"noise {float(gpr.noise.detach()):.3g}, var [{v}], {result.steps} steps"}  # fmt: skip


def ntk_gp(ctx: Context) -> dict:
    return _ntk_gp(ctx, False)


def ntk_gp_floor(ctx: Context) -> dict:
    return _ntk_gp(ctx, False, FEW_SHOT_FLOOR)


def ntk_gp_layers(ctx: Context) -> dict:
    return _ntk_gp(ctx, True)


def _ntk_gp_bayes(ctx: Context, layer_variances: bool) -> dict:
    from pyro_ntk import NTKGPRegression, integrate_hyperparameters

    gpr = NTKGPRegression(ctx.draw.Xa, ctx.draw.ya, ctx.net, layer_variances=layer_variances)
    mix = integrate_hyperparameters(gpr)
    weights, means, var = mix.components(ctx.draw.Xt)
    v = ", ".join(f"{x:.2g}" for x in mix.variance.reshape(-1).tolist())
    ess = f", ESS {mix.posterior.ess:.0f}" if layer_variances else ""
    return {"mixture": (weights, means, var),
            "info": f"E noise {float(mix.noise):.3g}, E var [{v}], {weights.numel()} nodes{ess}"}  # fmt: skip


def ntk_gp_bayes(ctx: Context) -> dict:
    return _ntk_gp_bayes(ctx, False)


def ntk_gp_layers_bayes(ctx: Context) -> dict:
    return _ntk_gp_bayes(ctx, True)


def _likelihood(ctx: Context) -> str:
    return "categorical" if ctx.kind == "classification" else "poisson"


def evidence_laplace(ctx, X, y):
    """Per-layer σ_g² by the Laplace evidence, prior centred at θ* (kernel route)."""
    from pyro_ntk import LinearizedLaplace

    la = LinearizedLaplace(
        ctx.net, _likelihood(ctx), variance=0.1, layer_variances=True, method="kernel"
    )
    la.fit(X, y)
    la.optimize_prior(X, y, rounds=1, num_steps=EVIDENCE_STEPS)
    return la


def _laplace_prediction(ctx: Context, la) -> dict:
    if ctx.kind == "classification":
        return {"probs": la.predict(ctx.draw.Xt)}
    mu, var = la.predictive_f(ctx.draw.Xt)  # (n, 1) log-rate moments
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(NUM_DRAWS, mu.shape[0], generator=gen, dtype=mu.dtype)
    return {"rates": (mu[:, 0] + var[:, 0].clamp_min(0).sqrt() * z).exp()}


def lin_laplace(ctx: Context) -> dict:
    if "laplace" not in ctx.cache:
        ctx.cache["laplace"] = evidence_laplace(ctx, ctx.draw.Xa, ctx.draw.ya)
    la = ctx.cache["laplace"]
    v = ", ".join(f"{x:.2g}" for x in la.variance.reshape(-1).tolist())
    return {**_laplace_prediction(ctx, la), "info": f"var [{v}]"}


def lin_laplace_t(ctx: Context) -> dict:
    from pyro_ntk import cross_validate_temperature
    from pyro_ntk.adaptation import tempered_laplace

    X, y = ctx.draw.Xa, ctx.draw.ya
    _, K = cv_folds(ctx)
    if K < 2:
        T = 1.0
    else:
        cv = cross_validate_temperature(lambda Xk, yk: evidence_laplace(ctx, Xk, yk), X, y, folds=K)
        T = cv.temperature
    la = ctx.cache.get("laplace") or evidence_laplace(ctx, X, y)
    tempered = tempered_laplace(la, X, y, T)
    return {**_laplace_prediction(ctx, tempered), "info": f"T {T:.2g}"}


def lin_svi(ctx: Context) -> dict:
    from pyro.infer.autoguide import AutoNormal, init_to_value

    from pyro_ntk import LinearizedModel, fit

    if "laplace" not in ctx.cache:
        ctx.cache["laplace"] = evidence_laplace(ctx, ctx.draw.Xa, ctx.draw.ya)
    la = ctx.cache["laplace"]
    variance = la.variance
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = LinearizedModel(ctx.net, variance=variance, layer_variances=True)

    def pyro_model(X, y=None):
        delta = model.sample_delta()
        log_rate = model(X, delta)
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Poisson(log_rate.exp()), obs=y)

    start = init_to_value(values={"delta": la.delta.detach().clone()})
    guide = AutoNormal(pyro_model, init_loc_fn=start, init_scale=1e-3)
    result = fit(pyro_model, ctx.draw.Xa, ctx.draw.ya, guide=guide, lr=0.02,
                 max_steps=SVI_STEPS, progress=False)  # fmt: skip
    with torch.no_grad():
        draws = torch.stack([guide()["delta"] for _ in range(NUM_DRAWS)])
        rates = model.linearized_output(ctx.draw.Xt, draws).squeeze(-1).exp()
    return {"rates": rates, "info": f"{result.steps} steps"}


METHODS = {
    "ntk_gp": ntk_gp,
    "ntk_gp_bayes": ntk_gp_bayes,
    "ntk_gp_floor": ntk_gp_floor,
    "ntk_gp_layers": ntk_gp_layers,
    "ntk_gp_layers_bayes": ntk_gp_layers_bayes,
    "lin_laplace": lin_laplace,
    "lin_laplace_t": lin_laplace_t,
    "lin_svi": lin_svi,
}
