r"""Parameter-space inference with the linearized network, under any Pyro likelihood.

.. math::

    f_{\mathrm{lin}}(x; \delta) = f(x; \theta^*) + J(x)\,\delta,
    \qquad \delta \sim \mathcal N\big(0, \mathrm{diag}(\sigma^2)\big),

with ``δ = θ − θ*`` of length ``P`` a ``pyro.sample`` site. Marginalising δ gives the NTK
Gaussian process ``GP(f(·; θ*), J diag(σ²) Jᵀ)``; keeping δ explicit lets Pyro's inference
(SVI with autoguides, minibatches, MCMC) handle *any* likelihood on top of the outputs:
Bernoulli / Categorical logits, Poisson log-rates, Student-t locations, ...
"""

from __future__ import annotations

import pyro
import torch
from pyro import distributions as dist
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.plate_messenger import PlateMessenger
from torch import Tensor, nn

from pyro_ntk._checks import check_tensor
from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.parameters import ParamSelector

# Plates that Pyro itself opens to vectorise over particles or predictive samples: δ
# *should* carry their batch dimension.
_VECTORISING_PLATES = frozenset({"num_particles_vectorized", "_num_predictive_samples"})


def _open_data_plates() -> list[str]:
    """Names of the user plates enclosing the current Pyro call (vectorising plates excluded)."""
    return [
        m.name
        for m in poutine.runtime._PYRO_STACK
        if isinstance(m, PlateMessenger) and m.name not in _VECTORISING_PLATES
    ]


class LinearizedModel(PyroModule):
    r"""The linearized network as a Pyro model of its outputs, in parameter space.

    .. math::

        \delta \sim \mathcal N\big(0, \mathrm{diag}(\sigma_{g(p)}^2)\big) \in \mathbb R^P,
        \qquad f_{\mathrm{lin}}(X) = f(X; \theta^*) + J(X)\,\delta.

    ``forward(X)`` samples δ (site ``name``, a single ``Normal(0, σ).to_event(1)`` of
    length ``P``) unless it is given, and returns the linearized outputs: shape
    ``(*batch, N, O)``, or ``(*batch, N)`` when the network has one output (``O = 1``), so
    that they can be passed straight to ``Bernoulli(logits=...)`` or
    ``Categorical(logits=...)``; ``batch`` are δ's leading dimensions (vectorised particles
    or predictive samples). Cost: one forward pass (cached for a repeated ``X``) and one
    JVP with as many columns as δ has batch elements; gradients flow to δ through the JVP's
    tangents. The network's weights are *not* module parameters: Pyro's param store holds
    only what the guide (or a user-declared ``PyroParam`` variance) creates.

    **Data subsampling.** δ is global: sample it *outside* ``pyro.plate`` and pass it in,

    .. code-block:: python

        def model(X, y):
            delta = lin.sample_delta()
            with pyro.plate("data", len(X), subsample_size=64) as idx:
                logits = lin(X[idx], delta)
                pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])

    Calling ``lin(X)`` (which samples δ) inside a data plate raises a ``ValueError``.

    **Learning σ².** ``variance`` is a buffer (fixed). To fit it by type-II maximum
    likelihood or give it a hyperprior, replace it: ``lin.variance =
    PyroParam(torch.tensor(1.0), constraints.positive)`` or ``PyroSample(dist.LogNormal(0,
    1))`` (shape ``(G,)`` with ``layer_variances=True``).

    **SVI or Laplace.** For a non-Gaussian likelihood on a few hundred points or fewer, the
    :class:`~pyro_ntk.LinearizedLaplace` of the same model is cheaper and was better on the
    transfer benchmark's count task (``docs/transfer_benchmark.rst``: a mean-field
    ``AutoNormal`` after 300 Adam steps was unconverged and too wide at 50 labels, NLL 2.94
    against the Laplace's 1.96); use SVI for what the Laplace cannot do (hierarchical or
    latent-variable models around the network, minibatches, guides with structure).

    Args:
        network: the trained ``nn.Module`` (never mutated, never trained), or a
            :class:`~pyro_ntk.Linearization` to share its θ* copy.
        variance: prior variance σ² of every linearized parameter (a positive float or
            tensor; with ``layer_variances=True`` a scalar or one value per layer ``(G,)``).
        layer_variances: one σ_g² per parameter group (layer) instead of a single σ².
        params: which parameters to linearize (see :class:`~pyro_ntk.Linearization`).
        name: the name of δ's sample site.
        chunk_size: inputs per chunk for the Jacobian products.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = LinearizedModel(net, variance=0.5)
        >>> X = torch.randn(6, 2)
        >>> def model(X, y=None):
        ...     logits = lin(X)                                  # samples δ, shape (6,)
        ...     with pyro.plate("data", X.shape[0]):
        ...         return pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)
        >>> tr = pyro.poutine.trace(model).get_trace(X)
        >>> tr.nodes["delta"]["value"].shape, tr.nodes["y"]["value"].shape
        (torch.Size([33]), torch.Size([6]))
    """

    def __init__(
        self,
        network: nn.Module | Linearization,
        variance: float | Tensor = 1.0,
        layer_variances: bool = False,
        params: ParamSelector = None,
        *,
        name: str = "delta",
        chunk_size: int | None = None,
    ):
        super().__init__()
        where = "LinearizedModel"
        linearization = as_linearization(where, network, params, chunk_size)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: name must be a non-empty string, got {name!r}.")
        # A plain attribute, not a submodule: the network's weights stay out of parameters().
        self.linearization = linearization
        self.site_name = name
        self.layer_variances = bool(layer_variances)
        variance, _ = linearization.space.normalize_variance(
            where, variance, self.layer_variances, positive=True, convert=True
        )
        self.register_buffer("variance", variance.detach().clone())
        self._cache: tuple[Tensor, int, Tensor] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def num_params(self) -> int:
        """P, the length of δ."""
        return self.linearization.num_params

    def prior_scale(self) -> Tensor:
        """σ per linearized parameter, shape ``(*batch, P)`` (batch only under a hyperprior)."""
        var = self.variance
        if self.layer_variances and var.dim() >= 1:
            var = var[..., self.linearization.space.group_index()]
        else:
            var = var.unsqueeze(-1).expand(*var.shape, self.num_params)
        return var.sqrt()

    def prior(self) -> dist.TorchDistribution:
        """The prior of δ: ``Normal(0, σ).to_event(1)``, event shape ``(P,)``."""
        scale = self.prior_scale()
        return dist.Normal(torch.zeros_like(scale), scale).to_event(1)

    # ------------------------------------------------------------------ Pyro
    def sample_delta(self) -> Tensor:
        """Sample δ at site ``name`` (call it outside any data plate)."""
        plates = _open_data_plates()
        if plates:
            raise ValueError(
                f"LinearizedModel: δ (site {self.site_name!r}) would be sampled inside "
                f"pyro.plate {plates}, giving one δ per data point. Sample it once outside "
                "the plate with `delta = model.sample_delta()` and call `model(X[idx], delta)`."
            )
        return pyro.sample(self.site_name, self.prior())

    def forward(self, X: Tensor, delta: Tensor | None = None) -> Tensor:
        """f(X; θ*) + J(X) δ, shape ``(*batch, N, O)`` or ``(*batch, N)`` if ``O = 1``.

        Args:
            X: inputs ``(N, ...)`` in the network's dtype and device.
            delta: δ of shape ``(*batch, P)``; ``None`` samples it (site ``name``).
        """
        if delta is None:
            delta = self.sample_delta()
        out = self.linearized_output(X, delta)
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    def linearized_output(self, X: Tensor, delta: Tensor) -> Tensor:
        """f(X; θ*) + J(X) δ without sampling, shape ``(*batch, N, O)`` (``O`` kept)."""
        lin = self.linearization
        delta = check_tensor("LinearizedModel", "delta", delta)
        if delta.dim() == 0 or delta.shape[-1] != self.num_params:
            raise ValueError(
                f"LinearizedModel: delta has shape {tuple(delta.shape)}; expected (*batch, "
                f"{self.num_params}) with P = {self.num_params} linearized parameters."
            )
        f0 = self._mean(X)
        batch = delta.shape[:-1]
        # δ (*batch, P) → columns (P, k) → J δ (N, O, k) → (*batch, N, O)
        V = delta.reshape(-1, self.num_params).T
        JV = lin.jvp(X, V).permute(2, 0, 1).reshape(*batch, *f0.shape)
        return f0 + JV

    def _mean(self, X: Tensor) -> Tensor:
        """f(X; θ*), cached for the last ``X`` seen (full-batch SVI repeats it)."""
        c = self._cache
        if c is not None and c[0] is X and c[1] == X._version:
            return c[2]
        f0 = self.linearization(X)
        self._cache = (X, X._version, f0)
        return f0

    def extra_repr(self) -> str:
        """Short description for ``print(model)``."""
        return (
            f"P={self.num_params}, site={self.site_name!r}, layer_variances={self.layer_variances}"
        )
