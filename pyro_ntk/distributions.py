r"""The linearized network as a Pyro distribution over its outputs at fixed inputs.

.. math::

    f(X) \sim \mathcal{N}\big(m(X),\; \sigma^2 K(X, X) + (s^2 + \epsilon)\, I\big),
    \qquad K(X, X) = J(X)\,\mathrm{diag}(\sigma_g^2)\,J(X)^\top,

the law of :math:`f_{\mathrm{lin}}(X; \theta) = f(X; \theta^*) + J(X)(\theta - \theta^*)` under
the prior :math:`\theta - \theta^* \sim \mathcal{N}(0, \mathrm{diag}(\sigma^2))`, plus an
optional observation noise :math:`s^2` and a jitter :math:`\epsilon`.

The density is evaluated by the kernel system of ``(θ*, X)``
(:class:`~pyro_ntk.gp.NTKSystem`, one cache shared with
:class:`~pyro_ntk.NTKGPRegression`): exact while ``N·O`` is small (one eigendecomposition
for one σ², else Cholesky), otherwise matrix-free preconditioned CG with stochastic Lanczos
quadrature (:func:`~pyro_ntk.solvers.choose_solver`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn

from pyro_ntk._checks import check_choice, check_finite, check_tensor
from pyro_ntk.gp import NTKSystem
from pyro_ntk.linearization import Linearization, as_linearization
from pyro_ntk.options import SolverOptions
from pyro_ntk.parameters import normalize_positive

__all__ = ["LinearizedNetwork"]


def check_jitter(where: str, jitter: object) -> float:
    """A finite float ``ε >= 0`` (the jitter added to the kernel's diagonal)."""
    if (
        not isinstance(jitter, (int, float))
        or isinstance(jitter, bool)
        or not 0 <= jitter < float("inf")
    ):
        raise ValueError(f"{where}: jitter must be a float >= 0, got {jitter!r}.")
    return float(jitter)


class LinearizedNetwork(TorchDistribution):
    r"""The linearized network's outputs at ``X`` as a Pyro distribution, event ``(N, O)``.

    .. math::

        f(X) = m(X) + J(X)\,(\sigma \odot z) + \sqrt{s^2 + \epsilon}\;\xi,\qquad
        z \sim \mathcal{N}(0, I_P),\ \xi \sim \mathcal{N}(0, I_{N \cdot O}),

    i.e. :math:`f(X) \sim \mathcal{N}(m(X), \sigma^2 K + (s^2 + \epsilon) I)` with
    :math:`K = J\,\mathrm{diag}(\sigma_g^2)\,J^\top` the empirical NTK and
    :math:`m(X) = f(X; \theta^*)` (``mean="network"``), zero, or a given tensor.

    * :meth:`rsample` is exact and reparameterized: one batched JVP for all draws, no
      ``N × N`` factorization. The ``√(s² + ε) ξ`` term makes the draws come from exactly
      the law whose density :meth:`log_prob` evaluates (σ²K alone is singular when
      ``N·O > P``); it costs ``N·O`` normal draws.
    * :meth:`log_prob` is exact on the dense route, while ``N·O <= options.max_cholesky_size``
      (``solver="auto"``): from one eigendecomposition of the kernel, made once, for one σ²
      (``O(N·O)`` per evaluation after it; :class:`~pyro_ntk.gp.KernelSpectrum`), by Cholesky
      for per-layer σ² or ``solver="cholesky"``. Otherwise preconditioned CG + stochastic
      Lanczos quadrature (``linear_operator.inv_quad_logdet`` on
      ``NTKLinearOperator + (s² + ε) I``). Gradients flow to ``variance`` and ``noise``
      tensors either way.

    Batch shape: broadcast of ``variance``'s batch dims (all of it for a scalar variance,
    all but the last ``G`` for per-layer variances), ``noise``'s shape and the mean's
    leading dims; so it works under vectorized ``Predictive`` and ``pyro.plate``. On the CG
    path, each distinct hyperparameter value in the batch costs one solve.

    The kernel variance is stored as :attr:`kernel_variance`; :attr:`variance` is the
    distribution's marginal variance, as for every torch distribution.

    Args:
        network: the trained ``nn.Module`` or a prebuilt :class:`~pyro_ntk.Linearization`.
        X: inputs ``(N, ...)``.
        variance: prior variance σ² of θ − θ*: a positive scalar, a tensor with batch dims,
            or per-layer ``(..., G)`` values (see ``layer_variances``).
        mean: ``"network"`` (f(X; θ*)), ``"zero"``, or a tensor ``(..., N, O)``.
        jitter: ε ≥ 0 added to the diagonal.
        params: which parameters to linearize (see :class:`~pyro_ntk.Linearization`).
        noise: optional observation noise variance s² > 0 (scalar or batch tensor).
        options: the solver choices, a :class:`~pyro_ntk.options.SolverOptions` (solver,
            preconditioner, thresholds, CG tolerance and iterations, SLQ probes,
            preconditioner rank; ``None``: the defaults).
        layer_variances: whether ``variance``'s last dim indexes parameter groups; ``None``
            infers it (a 1-D tensor of length G > 1).
        chunk_size: inputs per chunk for the Jacobian products.
        squeeze_output: event shape ``(N,)`` instead of ``(N, 1)`` for single-output networks.
        validate_args: torch's distribution argument / sample validation.
        system: an :class:`~pyro_ntk.gp.NTKSystem` for the same ``(θ*, X)`` to reuse its caches
            (its options then apply).

    Cost: construction one forward over X (for ``mean="network"``); :meth:`rsample` one JVP
    over X with ``prod(sample_shape + batch_shape)`` columns; :meth:`log_prob` see above.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> X = torch.randn(5, 2)
        >>> d = LinearizedNetwork(net, X, variance=0.5)
        >>> f = d.rsample((3,))
        >>> f.shape, d.log_prob(f).shape
        (torch.Size([3, 5, 1]), torch.Size([3]))
    """

    arg_constraints = {
        "kernel_variance": constraints.positive,
        "noise": constraints.nonnegative,
        "loc": constraints.real,
    }
    has_rsample = True

    def __init__(
        self,
        network: nn.Module | Linearization,
        X: Tensor,
        variance: Tensor | float = 1.0,
        mean: str | Tensor = "network",
        jitter: float = 1e-6,
        params=None,
        noise: Tensor | float | None = None,
        *,
        options: SolverOptions | None = None,
        layer_variances: bool | None = None,
        chunk_size: int | None = None,
        squeeze_output: bool = False,
        validate_args: bool | None = None,
        system: NTKSystem | None = None,
    ):
        where = "LinearizedNetwork"
        if system is not None:
            lin = system.lin
            if X is not system.X:
                raise ValueError(f"{where}: X must be the system's X when system is given.")
        else:
            lin = as_linearization(where, network, params, chunk_size)
            X = check_tensor(where, "X", X)
            system = NTKSystem(lin, X, options, where=where)
        self.system = system
        self.linearization = lin
        self.X = system.X
        N, O = system.N, system.O
        if layer_variances is None and isinstance(variance, Tensor) and variance.dim() > 1:
            layer_variances = False  # inferred per group only for a 1-D (G,) tensor
        self.kernel_variance, self.layer_variances = lin.space.normalize_variance(
            where, variance, layer_variances, positive=True, batched=True
        )
        self.jitter = check_jitter(where, jitter)
        if noise is None:
            self.noise = torch.zeros((), dtype=lin.dtype, device=lin.device)
        else:
            self.noise = normalize_positive(
                where, "noise", noise, lin.dtype, lin.device, scalar=False
            )
        if isinstance(mean, str):
            check_choice(where, "mean", mean, ("network", "zero"))
            if mean == "network":
                self.loc = lin(self.X)
            else:
                self.loc = torch.zeros(N, O, dtype=lin.dtype, device=lin.device)
        else:
            mean = check_finite(where, "mean", check_tensor(where, "mean", mean))
            if mean.dim() < 2 or tuple(mean.shape[-2:]) != (N, O):
                raise ValueError(
                    f"{where}: mean has shape {tuple(mean.shape)}; expected (..., {N}, {O}) "
                    f"for N = {N} inputs and O = {O} outputs."
                )
            self.loc = mean
        vbatch = (
            self.kernel_variance.shape[:-1] if self.layer_variances else self.kernel_variance.shape
        )
        batch_shape = torch.broadcast_shapes(vbatch, self.noise.shape, self.loc.shape[:-2])
        event_shape = (N,) if (squeeze_output and O == 1) else (N, O)
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args)

    @property
    def support(self):
        """Real values of the event shape."""
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def diagonal(self) -> Tensor:
        """The total diagonal ``s² + ε`` added to σ²K."""
        return self.noise + self.jitter

    @property
    def mean(self) -> Tensor:
        """m(X), shape ``batch_shape + event_shape``."""
        return self.loc.reshape(self.loc.shape[:-2] + self.event_shape).expand(
            self.batch_shape + self.event_shape
        )

    @property
    def variance(self) -> Tensor:
        r"""Marginal variances :math:`\sigma^2 K_{ii} + s^2 + \epsilon` (exact, not σ² itself)."""
        d = self.system.kernel_diag(self.kernel_variance, self.layer_variances)
        d = d + self.diagonal[..., None]
        return d.reshape(d.shape[:-1] + self.event_shape).expand(
            self.batch_shape + self.event_shape
        )

    @property
    def covariance_matrix(self) -> Tensor:
        """Dense ``(N·O, N·O)`` covariance (rows ``n·O + o``); for small problems."""
        K = self.system.kernel(self.kernel_variance, self.layer_variances)
        eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        return K + self.diagonal[..., None, None] * eye

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """Exact reparameterized draws, shape ``sample_shape + batch_shape + event_shape``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        lead = shape[: len(shape) - len(self.event_shape)]
        lin = self.linearization
        P, N, O = lin.num_params, self.system.N, self.system.O
        sd = self.kernel_variance.sqrt()
        if self.layer_variances:
            sd = sd[..., lin.space.group_index()]  # (..., P)
        else:
            sd = sd[..., None]
        z = torch.randn(lead + (P,), dtype=lin.dtype, device=lin.device)
        V = (z * sd).reshape(-1, P).T  # (P, k)
        JV = lin.jvp(self.X, V)  # (N, O, k)
        f = JV.permute(2, 0, 1).reshape(lead + (N, O))
        f = f + self.loc
        if self.jitter > 0 or bool((self.noise > 0).any()):
            f = f + self.diagonal.sqrt()[..., None, None] * torch.randn_like(f)
        return f.reshape(shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density, shape ``sample_shape + batch_shape``; exact or CG + SLQ (see class)."""
        N, O = self.system.N, self.system.O
        value = check_tensor("LinearizedNetwork.log_prob", "value", value)
        k = len(self.event_shape)
        if value.dim() < k or tuple(value.shape[value.dim() - k :]) != tuple(self.event_shape):
            raise ValueError(
                f"LinearizedNetwork.log_prob: value has shape {tuple(value.shape)}; expected "
                f"(..., {', '.join(map(str, self.event_shape))}), the event shape."
            )
        if self._validate_args:
            self._validate_sample(value)
        lead = value.shape[: value.dim() - len(self.event_shape)]
        diff = value.reshape(lead + (N, O)) - self.loc
        diff = diff.reshape(diff.shape[:-2] + (N * O,))
        diff = diff.expand(torch.broadcast_shapes(diff.shape[:-1], self.batch_shape) + (N * O,))
        return self.system.log_prob(diff, self.kernel_variance, self.layer_variances, self.diagonal)

    def __repr__(self) -> str:
        return (
            f"LinearizedNetwork(N={self.system.N}, O={self.system.O}, "
            f"P={self.linearization.num_params}, solver={self.system.method!r}, "
            f"batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)})"
        )
