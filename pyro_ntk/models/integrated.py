r"""An NTK-GP regression with its kernel variance and noise integrated out, not fitted.

.. math::

    p(y_* \mid y) = \sum_g w_g\, \mathcal N\big(y_*;\ m(x_*) + \mu_g,\ v_g + s_g^2\big),
    \qquad w_g \propto p(y \mid \sigma_g^2, s_g^2)\, p(\sigma_g^2)\, p(s_g^2)

over a grid of ``(σ², s²)`` with log-normal priors centred where either part alone explains
the residuals' mean square ``v = mean (y − m(X))²``: ``s²`` at ``v``, ``σ²`` at
``v / mean diag K`` (both medians can be given), standard deviation ``width`` in log space
(default 3; :mod:`pyro_ntk.gp.hyperposterior`). With ten or so noisy labels the marginal
likelihood's optimum is a poor summary: on the transfer suite's ten-label regression cells
the fitted s² collapses on several draws, while the integrated predictive keeps its coverage
(``docs/transfer_benchmark.rst``). On nearly noise-free targets the fitted point estimate is
better (the demo's sine task, 10 points: test NLL 0.44 fitted with its floor, 0.95
integrated). With hundreds of labels the posterior concentrates and the mixture agrees with
:func:`pyro_ntk.fit`'s point estimate.

Needs the dense kernel (``N·O`` up to a few thousand; one eigendecomposition, shared with the
model's spectral route). With ``layer_variances=True`` every layer's σ_g² is integrated too,
by importance sampling (:mod:`pyro_ntk.gp.importance`; ``N·O`` up to a few hundred): on the
suite's ten-label cells the fitted per-layer variances over-fit where the integrated ones
keep their coverage.

Example:
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> net = net.double()
    >>> X = torch.linspace(-1, 1, 10, dtype=torch.float64).unsqueeze(-1)
    >>> y = torch.sin(3 * X).squeeze(-1) + 0.1 * torch.randn(10, dtype=torch.float64)
    >>> gp = NTKGPRegression(X, y, net)
    >>> bayes = integrate_hyperparameters(gp)
    >>> mean, var = bayes(torch.zeros(3, 1, dtype=torch.float64))
    >>> mean.shape, bool((var > 0).all())
    (torch.Size([3]), True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyro_ntk.gp.hyperposterior import GridPosterior, grid_posterior, mixture_moments
from pyro_ntk.gp.importance import SamplePosterior, sample_moments, sample_posterior
from pyro_ntk.models.regression import NTKGPRegression

__all__ = ["HyperparameterMixture", "integrate_hyperparameters"]


class HyperparameterMixture:
    r"""The predictive of an :class:`~pyro_ntk.NTKGPRegression` with σ² (or σ_g²) and s² integrated out.

    Build it with :func:`integrate_hyperparameters`. Calling it gives the mixture's mean and
    variance; :meth:`log_prob` and :meth:`cdf` are the mixture's exact per-point density and
    distribution function (per output: marginals), :meth:`components` the mixture itself.

    Attributes:
        posterior: the grid posterior (:class:`~pyro_ntk.gp.hyperposterior.GridPosterior`),
            or with layer variances the importance samples
            (:class:`~pyro_ntk.gp.importance.SamplePosterior`, ``variance`` ``(S, G)``, ``ess``):
            kept ``variance``, ``noise``, ``weights``, ``log_evidence``.
    """

    def __init__(self, model: NTKGPRegression, posterior: GridPosterior | SamplePosterior):
        self.model, self.posterior = model, posterior
        self._data = (model.X, model.y)  # the data the weights were computed from
        self._last: tuple | None = None  # (Xnew, its version, noiseless, components): latest call

    @property
    def variance(self) -> Tensor:
        """The posterior mean of σ² (``(G,)``, one per layer, with layer variances)."""
        w = self.posterior.weights
        return (
            w.reshape(-1, *([1] * (self.posterior.variance.dim() - 1))) * self.posterior.variance
        ).sum(0)

    @property
    def noise(self) -> Tensor:
        """The posterior mean of s², ``Σ_g w_g s_g²``."""
        return (self.posterior.weights * self.posterior.noise).sum()

    @property
    def log_evidence(self) -> Tensor:
        """``log p(y)`` with the hyperparameters integrated over their prior."""
        return self.posterior.log_evidence

    def components(self, Xnew: Tensor, noiseless: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The mixture at ``Xnew``: ``(weights (g,), means (g, M, ...), variances (g, M, ...))``.

        Means and variances have the shape of the model's predictions (``(M,)`` or
        ``(M, O)``) after the node dimension. Cost: one dense cross-kernel ``(M·O, N·O)``
        (one per layer with layer variances), ``diag K(Xnew)`` and
        :func:`~pyro_ntk.gp.hyperposterior.mixture_moments` (or
        :func:`~pyro_ntk.gp.importance.sample_moments`); the latest ``Xnew`` (the same
        tensor object, not modified in place since) is answered from a cache, so that ``__call__``, :meth:`log_prob` and
        :meth:`cdf` on one test set cost one evaluation.
        """
        model = self.model
        if model.X is not self._data[0] or model.y is not self._data[1]:
            raise ValueError(
                "HyperparameterMixture: the model's data changed (set_data) after "
                "integrate_hyperparameters; integrate again for the new data."
            )
        last = self._last
        if (
            last is not None
            and last[0] is Xnew
            and last[1] == Xnew._version
            and last[2] == noiseless
        ):
            return last[3]
        lin = model.linearization
        Xnew = lin.check_inputs("HyperparameterMixture", "Xnew", Xnew)
        model._check_Xnew_shape(Xnew)
        sysm = model._system
        M, O = Xnew.shape[0], sysm.O
        with torch.no_grad():
            residual = (model.y.reshape(sysm.N, O) - model._mean_X).reshape(-1)
            if isinstance(self.posterior, SamplePosterior):
                scales = sysm.group_scales()
                shift, var = sample_moments(
                    sysm.group_kernels(),
                    residual,
                    torch.stack([lin.ntk_dense(Xnew, model.X, variance=s) for s in scales]),
                    torch.stack([lin.ntk_diag(Xnew, variance=s) for s in scales]),
                    self.posterior, noiseless=noiseless, jitter=model.jitter,
                )  # fmt: skip
            else:
                shift, var = mixture_moments(
                    sysm.spectrum(), residual, lin.ntk_dense(Xnew, model.X),
                    lin.ntk_diag(Xnew), self.posterior, noiseless=noiseless, jitter=model.jitter,
                )  # fmt: skip
            mean = model._mean(Xnew).reshape(1, M * O) + shift
        shape = (-1, M) if model._squeeze else (-1, M, O)
        out = self.posterior.weights, mean.reshape(shape), var.reshape(shape)
        self._last = (Xnew, Xnew._version, noiseless, out)
        return out

    def __call__(self, Xnew: Tensor, noiseless: bool = False) -> tuple[Tensor, Tensor]:
        r"""The mixture's mean and variance at ``Xnew`` (law of total variance).

        ``noiseless=False`` (default) is the predictive of new observations, ``True`` that of
        ``f``. Shapes as :meth:`NTKGPRegression.forward <pyro_ntk.NTKGPRegression.forward>`.
        """
        w, means, var = self.components(Xnew, noiseless)
        w = w.reshape(-1, *([1] * (means.dim() - 1)))
        mean = (w * means).sum(0)
        return mean, (w * (var + (means - mean).square())).sum(0)

    def log_prob(self, Xnew: Tensor, ynew: Tensor) -> Tensor:
        r"""``log Σ_g w_g N(y; μ_g, v_g + s_g²)`` per point (and output), shape of ``ynew``."""
        w, means, var = self.components(Xnew, noiseless=False)
        ynew = self._check_y(ynew, means.shape[1:])
        log_n = -0.5 * (math.log(2 * math.pi) + var.log() + (ynew - means).square() / var)
        w = w.reshape(-1, *([1] * (means.dim() - 1)))
        return torch.logsumexp(log_n + w.log(), 0)

    def cdf(self, Xnew: Tensor, ynew: Tensor) -> Tensor:
        r"""``Σ_g w_g Φ((y − μ_g)/√(v_g + s_g²))`` per point: the probability integral transform.

        ``y`` lies in the central 95 % interval of the predictive iff ``0.025 ≤ cdf ≤ 0.975``.
        """
        w, means, var = self.components(Xnew, noiseless=False)
        ynew = self._check_y(ynew, means.shape[1:])
        z = (ynew - means) / var.sqrt()
        w = w.reshape(-1, *([1] * (means.dim() - 1)))
        return (w * torch.special.ndtr(z)).sum(0)

    def _check_y(self, ynew: Tensor, shape: torch.Size) -> Tensor:
        if not isinstance(ynew, Tensor) or ynew.shape != shape:
            got = tuple(ynew.shape) if isinstance(ynew, Tensor) else type(ynew).__name__
            raise ValueError(
                f"HyperparameterMixture: ynew has shape {got}; expected {tuple(shape)}."
            )
        return ynew.to(self.posterior.weights.dtype)


def integrate_hyperparameters(
    model: NTKGPRegression,
    *,
    width: float = 3.0,
    span: float = 4.0,
    points: int = 61,
    prior_variance: float | None = None,
    prior_noise: float | None = None,
    samples: int = 4096,
    seed: int = 0,
) -> HyperparameterMixture:
    r"""Integrate σ² (or every layer's σ_g²) and s² of ``model`` out, under log-normal priors.

    The model's own ``noise`` and ``variance`` (fitted or not) play no part: the priors are
    centred at ``prior_variance`` and ``prior_noise`` (defaults: ``v / mean diag K`` and
    ``v``, with ``v`` the mean square of ``y − m(X)``). With one σ² the posterior is laid on
    a product grid (:func:`~pyro_ntk.gp.hyperposterior.grid_posterior`); with
    ``layer_variances=True`` every ``log σ_g²`` has the same prior (the kernel's prior median
    is then the one-σ² model's) and the ``G + 1`` log-hyperparameters are importance-sampled
    (:func:`~pyro_ntk.gp.importance.sample_posterior`: a Student-t about the posterior mode
    mixed with the prior; the effective sample size is in ``posterior.ess`` and warns when
    small).

    Args:
        model: an :class:`~pyro_ntk.NTKGPRegression` with targets (one σ², or one per layer).
        width: the prior standard deviation of ``log σ²`` and ``log s²`` (default 3: a
            factor ``e³ ≈ 20`` per standard deviation; the grid then spans a factor of
            ``e¹² ≈ 1.6·10⁵`` either side of the medians).
        span: the grid reaches ``± span · width`` about the prior medians.
        points: grid nodes per axis (≥ 3; ``points²`` in all).
        prior_variance: the prior median of σ² (> 0), e.g. from a related task.
        prior_noise: the prior median of s² (> 0), e.g. the source network's validation
            residual variance.
        samples: importance samples with layer variances (≥ 100; ignored otherwise).
        seed: seed of the importance sampling (deterministic; ignored without layer variances).

    Returns:
        :class:`HyperparameterMixture`. Cost: the dense kernel and its eigendecomposition
        (``O((N·O)³)``, made once per model) and ``O(points²·N·O)``; with layer variances the
        ``G`` per-layer kernels and ``O(samples·(N·O)³)``.

    Raises:
        TypeError, ValueError: naming the argument, for a model without targets, or a bad
        width, span, points, samples or prior median.
    """
    where = "integrate_hyperparameters"
    if not isinstance(model, NTKGPRegression):
        raise TypeError(f"{where}: model must be an NTKGPRegression, got {type(model).__name__}.")
    if model.y is None:
        raise ValueError(f"{where}: model has no targets; call model.set_data(X, y) first.")
    for name, value, low in (("width", width, 0.0), ("span", span, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
            raise ValueError(f"{where}: {name} must be a float > 0, got {value!r}.")
    for name, value, low in (("points", points, 3), ("samples", samples, 100)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}.")
    sysm = model._system
    layers = model.layer_variances
    spectrum = None if layers else sysm.spectrum()
    if not layers and spectrum is None:
        raise ValueError(
            f"{where}: the kernel of the model's data is not positive semi-definite (see the "
            "warning above); the grid needs its eigendecomposition."
        )
    with torch.no_grad():
        residual = (model.y.reshape(sysm.N, sysm.O) - model._mean_X).reshape(-1)
        v = float(residual.square().mean())
        if layers:  # mean diag K = trace / n
            k = float(sysm.group_kernels().diagonal(dim1=-2, dim2=-1).sum()) / residual.numel()
        else:
            k = float(spectrum.lam.sum()) / spectrum.n
    centers = {}
    for name, given, default in (
        ("prior_variance", prior_variance, v / k if k > 0 else 0.0),
        ("prior_noise", prior_noise, v),
    ):
        value = default if given is None else given
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: {name} must be a float > 0, got {value!r}.")
        if not (0.0 < value < math.inf):
            why = "" if given is not None else " (the targets equal the network's outputs: give it)"
            raise ValueError(f"{where}: {name} must be a float > 0, got {value!r}{why}.")
        centers[name] = float(value)
    if layers:
        post = sample_posterior(
            sysm.group_kernels(), residual,
            center_variance=centers["prior_variance"], center_noise=centers["prior_noise"],
            width=float(width), samples=samples, seed=int(seed), jitter=model.jitter, where=where,
        )  # fmt: skip
        return HyperparameterMixture(model, post)
    post = grid_posterior(
        spectrum, residual,
        center_variance=centers["prior_variance"], center_noise=centers["prior_noise"],
        width=float(width), span=float(span), points=points, jitter=model.jitter, where=where,
    )  # fmt: skip
    return HyperparameterMixture(model, post)
