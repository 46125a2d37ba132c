r"""laplace-torch baselines (optional: skipped with a note when ``laplace`` is not installed).

The Laplace approximation is taken where it belongs, at a MAP for the target: the
**fine-tuned network** of :func:`~transfer_suite.baselines.fine_tune` (CV-chosen lr and
steps, L2 pull toward θ*), with the prior mean at θ* (``prior_mean``), fitted on the shots.
Their seconds include the fine-tuning (and its CV).

* ``la_last_layer``: ``Laplace(net, lik, subset_of_weights="last_layer",
  hessian_structure="full")``;
* ``la_kfac``: ``Laplace(net, lik, subset_of_weights="all", hessian_structure="kron")``.

Backend: BackPack's GGN (``backend=BackPackGGN``): with the default curvlinops backend the
GLM predictive of 949 test points took 41 s (per-example Jacobians), with BackPack 1 s.
Hyperparameters as laplace-torch's examples: regression — the prior precision and
``sigma_noise`` jointly by Adam (lr 0.1, 100 steps, from log-values 0) on
``la.log_marginal_likelihood``; GLM predictive (``pred_type="glm"``) plus ``sigma_noise²``.
Classification — ``optimize_prior_precision(method="marglik")``, GLM predictive with the
probit link. laplace-torch has no Poisson likelihood: no count rows.

Example:
    >>> available() in (True, False)
    True
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch.nn.utils import parameters_to_vector

from transfer_suite.baselines import Context, fine_tune

HYPER_STEPS = 100


def available() -> bool:
    try:
        return importlib.util.find_spec("laplace") is not None
    except (ImportError, ValueError):
        return False


def _laplace(ctx: Context, subset: str, structure: str) -> dict:
    from laplace import Laplace
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    if "ft_net" not in ctx.cache:
        fine_tune(ctx)
    net = ctx.cache["ft_net"]
    X, y = ctx.draw.Xa, ctx.draw.ya
    regression = ctx.kind == "regression"
    lik = "regression" if regression else "classification"
    ys = y.unsqueeze(-1) if regression else y
    loader = DataLoader(TensorDataset(X, ys), batch_size=len(X))
    if subset == "last_layer":
        prior_mean = parameters_to_vector(ctx.net[-1].parameters()).detach().clone()
    else:
        prior_mean = parameters_to_vector(ctx.net.parameters()).detach().clone()
    la = Laplace(net, lik, subset_of_weights=subset, hessian_structure=structure,
                 prior_mean=prior_mean, backend=BackPackGGN)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader)
        if regression:
            log_prior = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            log_sigma = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
            for _ in range(HYPER_STEPS):
                opt.zero_grad()
                (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
                opt.step()
            f_mu, f_var = la(ctx.draw.Xt, pred_type="glm")
            s2 = float(la.sigma_noise.detach()) ** 2
            mean = f_mu.detach().reshape(-1)
            var = f_var.detach().reshape(-1) + s2
            info = f"prior prec {float(la.prior_precision.detach().reshape(-1)[0]):.3g}, noise {s2:.3g}"
            return {"mean": mean, "var": var, "info": info}
        la.optimize_prior_precision(method="marglik")
        probs = la(ctx.draw.Xt, pred_type="glm", link_approx="probit")
    info = f"prior prec {float(la.prior_precision.detach().reshape(-1)[0]):.3g}"
    return {"probs": probs.detach(), "info": info}


def la_last_layer(ctx: Context) -> dict:
    return _laplace(ctx, "last_layer", "full")


def la_kfac(ctx: Context) -> dict:
    return _laplace(ctx, "all", "kron")


METHODS = {"la_last_layer": la_last_layer, "la_kfac": la_kfac}
