r"""Function-space GP classification with the empirical NTK, for small N (a recipe).

.. math::

    f \sim \mathcal{GP}\big(f(\cdot;\theta^*),\; J\,\mathrm{diag}(\sigma^2)\,J^\top\big),
    \qquad y_n \mid f \sim \mathrm{Bernoulli}(\mathrm{sigmoid}\,f(x_n))
    \;\text{or}\; \mathrm{Categorical}(\mathrm{softmax}\,f(x_n)),

fitted with Pyro's own variational GP models (``VariationalGP``, or ``VariationalSparseGP``
with inducing inputs) and likelihoods (``Binary``, ``MultiClass``). The kernel is dense
(:class:`~pyro_ntk.EmpiricalNTK`), so this is the small-N path; for large N use the
parameter-space :class:`~pyro_ntk.LinearizedLaplace` or :class:`~pyro_ntk.LinearizedModel`.
With ``C > 1`` classes, Pyro's ``latent_shape=(C,)`` shares one kernel between the class
latents: the output-averaged NTK (cross-class covariances are dropped), while the mean is
each class's own logit.

Recipe::

    gpc = ntk_gp_classifier(net, X, y)                  # VariationalGP, site names "f", "y"
    pyro_ntk.fit(gpc)                                   # Adam on the ELBO, with a stopping rule
    probs = gp_class_probabilities(gpc, X_test)         # (N*, C), or (N*,) for binary
"""

from __future__ import annotations

import math

import pyro.contrib.gp as gp
import torch
from torch import Tensor, nn

from pyro_ntk.kernels import EmpiricalNTK
from pyro_ntk.likelihoods import check_targets
from pyro_ntk.linearization import Linearization
from pyro_ntk.means import NetworkMean

__all__ = ["gp_class_probabilities", "ntk_gp_classifier"]


def ntk_gp_classifier(
    network: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    Xu: Tensor | None = None,
    num_data: int | None = None,
    variance: float | Tensor = 1.0,
    layer_variances: bool = False,
    whiten: bool = True,
    jitter: float = 1e-5,
) -> gp.models.VariationalGP | gp.models.VariationalSparseGP:
    r"""A Pyro variational GP classifier with the network as mean and its NTK as kernel.

    One output (``O = 1``, logits) gives ``Binary``; ``O ≥ 2`` logits give
    ``MultiClass(num_classes=O)`` with ``latent_shape=(O,)``. With ``Xu`` (inducing inputs
    ``(M, ...)``) the model is ``VariationalSparseGP`` (minibatch with ``num_data`` and
    ``set_data``); otherwise ``VariationalGP``. Whitening is on by default (better
    conditioned for the NTK's large scale).

    Cost: the ``N × N`` (or ``M × M`` and ``M × N``) NTK Gram matrices and their Cholesky,
    ``O(N³)`` per ELBO step, plus ``O(N²)`` variational parameters per class for
    ``VariationalGP``.

    Args:
        network: the trained classifier (logits), never trained or mutated.
        X: training inputs ``(N, ...)``.
        y: labels: ``(N,)`` in {0, 1} for one output, integer classes in ``[0, O)`` else.
        Xu: inducing inputs ``(M, ...)`` for the sparse model (held fixed).
        num_data: total data size for minibatching (sparse model only).
        variance: σ² of the kernel (a ``PyroParam`` of the kernel, trained with the ELBO).
        layer_variances: one σ_g² per layer.
        whiten: whitened variational parameters.
        jitter: added to the Gram diagonal.

    Returns:
        The Pyro GP model; fit it with :func:`pyro_ntk.fit` (or
        ``pyro.contrib.gp.util.train``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X, y = torch.randn(12, 2), torch.randint(0, 3, (12,))
        >>> gpc = ntk_gp_classifier(net, X, y)
        >>> type(gpc).__name__, gpc.f_loc.shape
        ('VariationalGP', torch.Size([3, 12]))
    """
    where = "ntk_gp_classifier"
    lin = Linearization(network)
    X = lin.check_inputs(where, "X", X)
    O = lin.output_dim(X)
    likelihood_name = "bernoulli" if O == 1 else "categorical"
    y = check_targets(where, likelihood_name, y, X.shape[0], O, lin.dtype)
    if O == 1:
        y = y.reshape(-1)
        likelihood, latent_shape = gp.likelihoods.Binary(), torch.Size()
    else:
        likelihood, latent_shape = gp.likelihoods.MultiClass(num_classes=O), torch.Size([O])
    kernel = EmpiricalNTK(network, variance=variance, layer_variances=layer_variances)
    mean = NetworkMean(network)
    if Xu is None:
        if num_data is not None:
            raise ValueError(f"{where}: num_data applies to the sparse model (pass Xu) only.")
        return gp.models.VariationalGP(
            X, y, kernel, likelihood, mean_function=mean, latent_shape=latent_shape,
            whiten=whiten, jitter=jitter,
        )  # fmt: skip
    Xu = lin.check_inputs(where, "Xu", Xu)
    return gp.models.VariationalSparseGP(
        X, y, kernel, Xu.clone(), likelihood, mean_function=mean, latent_shape=latent_shape,
        num_data=num_data, whiten=whiten, jitter=jitter,
    )  # fmt: skip


def gp_class_probabilities(
    model: gp.models.VariationalGP | gp.models.VariationalSparseGP, X: Tensor
) -> Tensor:
    r"""Predictive class probabilities of a GP classifier by the probit approximation.

    .. math:: p(y=1) \approx \mathrm{sigmoid}\big(\mu / \sqrt{1 + \pi v / 8}\big),\qquad
        p(y=k) \approx \mathrm{softmax}_k\big(\mu_k / \sqrt{1 + \pi v_k / 8}\big)

    from the model's marginal ``(μ, v) = model(X)``. Returns ``(N,)`` for ``Binary`` and
    ``(N, C)`` for ``MultiClass``. Cost: one call of the model's conditional.
    """
    with torch.no_grad():
        f_loc, f_var = model(X)
        z = f_loc / (1 + math.pi / 8 * f_var).sqrt()
    if isinstance(model.likelihood, gp.likelihoods.MultiClass):
        return torch.softmax(z.transpose(-1, -2), -1)  # (C, N) → (N, C)
    return torch.sigmoid(z)
