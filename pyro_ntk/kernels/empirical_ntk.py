r"""The empirical NTK as a dense :mod:`pyro.contrib.gp` kernel.

.. math::

    k(x, z) = \sum_g \sigma_g^2\, J_g(x)\, J_g(z)^\top,
    \qquad J_g(x) = \partial f(x; \theta) / \partial \theta_g \,\big|_{\theta^*}.

Pyro's GP models (``GPRegression``, ``SparseGPRegression``, ``VariationalGP``,
``VariationalSparseGP``) factorize dense Gram matrices, so this kernel is the small-N path
(N up to a few thousand); :class:`pyro_ntk.NTKGPRegression` is the matrix-free one.
"""

from __future__ import annotations

import torch
from pyro.contrib.gp.kernels import Kernel
from pyro.distributions import constraints
from pyro.nn.module import PyroParam
from torch import Tensor, nn

from pyro_ntk._checks import check_tensor
from pyro_ntk.kernels._output import LinearizedKernel, output_linearization
from pyro_ntk.linearization import Linearization
from pyro_ntk.parameters import ParamSelector


def infer_input_dim(network: nn.Module) -> int | None:
    """``in_features`` of the network's first parameterized module if it is ``nn.Linear``."""
    for module in network.modules():
        if any(True for _ in module.parameters(recurse=False)):
            return module.in_features if isinstance(module, nn.Linear) else None
    return None


class EmpiricalNTK(LinearizedKernel, Kernel):
    r"""The empirical neural tangent kernel of a trained network, for ``pyro.contrib.gp``.

    .. math::

        k(x, z) = \sum_{g=1}^{G} \sigma_g^2\, J_g(x)\, J_g(z)^\top,

    where :math:`J_g(x) = \partial f(x;\theta)/\partial\theta_g` at the trained weights
    θ* and ``g`` runs over the parameter groups (layers, :attr:`groups`). With
    ``layer_variances=False`` a single σ² scales every layer. It is the covariance of the
    linearized network :math:`f(x;\theta^*) + J(x)(\theta-\theta^*)` under
    :math:`\theta_g-\theta_g^* \sim \mathcal N(0, \sigma_g^2 I)`; pair it with
    :class:`pyro_ntk.NetworkMean` for the mean.

    **Multi-output networks** (``O > 1`` outputs per example): ``output=None`` gives the
    output-averaged kernel :math:`\frac1O\sum_o J_o(x)\,\mathrm{diag}(\sigma^2)J_o(z)^\top`,
    the one shared kernel that Pyro's ``latent_shape=(O,)`` expects; ``output=k`` gives
    output ``k``'s kernel and linearizes only that output (one backward pass per example
    instead of ``O``).

    **Which layers matter:** with ``layer_variances=True``, :attr:`variance` has shape
    ``(G,)`` in the order of :attr:`groups`; :meth:`variances_by_layer` pairs them. Because
    Jacobian blocks differ in scale, compare layers by :meth:`layer_contributions`, the
    share :math:`\sigma_g^2 \operatorname{tr} K_g(X) / \operatorname{tr} K(X)` of each layer
    in the fitted kernel, rather than by raw σ_g².

    Inputs: 2-D tabular ``X`` (``N × D``; ``active_dims`` applies, as in Pyro's kernels),
    1-D ``X`` (read as ``N × 1``) or any shape the network accepts, e.g. images
    ``N × C × H × W`` (passed to the network unchanged). Inputs are treated as constants
    (no gradient reaches them, so ``SparseGPRegression``'s inducing points ``Xu`` stay
    fixed under training). The network is linearized once,
    at construction: θ* is a detached copy, so it never appears in this kernel's (or a GP
    model's) ``parameters()`` and fitting the GP never trains it.

    Cost: a Gram matrix ``K(X, Z)`` is :meth:`pyro_ntk.Linearization.ntk_dense` (the
    per-example Jacobians of X and Z, ``(N + M)·O`` backward passes, and ``N·M·O²·P``
    multiply-adds at most); the output average keeps its ``O`` diagonal blocks (memory
    ``chunk·O·M·O``). ``output=k`` costs ``1/O`` of the Jacobian work and ``1/O²`` of the
    products. ``diag=True`` is exact from per-example gradients, ``O(N·O·P)``.
    Every call returns a fresh contiguous tensor, which Pyro's models modify in place.

    Args:
        network: the trained ``nn.Module`` (any input shape, output ``(N, O)`` or ``(N,)``),
            or a :class:`~pyro_ntk.Linearization` to share its θ* copy (with ``output=None``).
        input_dim: number of input features of 2-D ``X``, as in Pyro's kernels; ``None``:
            ``len(active_dims)``, or inferred from a leading ``nn.Linear`` (then no input
            slicing happens), or ``None`` for other networks (images).
        variance: initial σ² > 0 (``None``: 1, and :attr:`variance_given` is ``False``): a
            scalar, or with ``layer_variances=True`` a scalar or one value per layer
            ``(G,)``. A ``PyroParam`` constrained positive; assign
            ``kernel.variance = PyroSample(prior)`` for a prior.
        layer_variances: one σ_g² per parameter group (layer) instead of one σ².
        output: ``None`` (the only output, or the average over outputs) or an output index.
        params: which parameters to linearize (names, a predicate ``(name, p) -> bool`` or
            ``None`` for all with ``requires_grad``), as :class:`pyro_ntk.Linearization`.
        active_dims: columns of 2-D ``X`` that the network reads (default: all).
        chunk_size: inputs per chunk in the Jacobian computations (``None``: all at once).

    Attributes:
        variance_given: ``True`` when ``variance`` was passed, ``False`` when it defaulted;
            :func:`pyro_ntk.fit` starts a defaulted σ² at the data-aware value
            (:func:`pyro_ntk.gp.initial_hyperparameters`) and then sets it to ``True``.

    Example:
        >>> import pyro.contrib.gp as gp
        >>> from pyro_ntk import NetworkMean
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> X, y = torch.randn(20, 2), torch.randn(20)
        >>> kernel = EmpiricalNTK(net)
        >>> kernel(X).shape, kernel(X, diag=True).shape
        (torch.Size([20, 20]), torch.Size([20]))
        >>> gpr = gp.models.GPRegression(X, y, kernel, mean_function=NetworkMean(net))
        >>> sorted(name for name, _ in gpr.named_parameters())
        ['kernel.variance_unconstrained', 'noise_unconstrained']
    """

    def __init__(
        self,
        network: nn.Module | Linearization,
        input_dim: int | None = None,
        variance: Tensor | float | None = None,
        layer_variances: bool = False,
        output: int | None = None,
        params: ParamSelector = None,
        active_dims: list[int] | None = None,
        chunk_size: int | None = None,
    ):
        where = "EmpiricalNTK"
        slicing = input_dim is not None or active_dims is not None
        if input_dim is None and active_dims is not None:
            input_dim = len(active_dims)
        lin = output_linearization(network, params, output, chunk_size, where)
        inferred = input_dim if input_dim is not None else infer_input_dim(lin.network)
        super().__init__(inferred if inferred is not None else 0, active_dims)
        if inferred is None:
            self.input_dim, self.active_dims = None, None
        self._slicing = slicing
        init = self._keep_linearization(where, lin, output, variance, layer_variances)
        self.variance = PyroParam(init, constraints.positive)

    # ------------------------------------------------------------------ introspection
    def _fitted_variance(self) -> Tensor:
        """:attr:`variance` in guide mode (the fitted value, also under a ``PyroSample``)."""
        mode = self.mode
        self.set_mode("guide")
        try:
            return self.variance.detach()
        finally:
            self.set_mode(mode)

    def variances_by_layer(self) -> dict[str, float]:
        """``{layer: σ_g²}`` at the fitted (guide) value of :attr:`variance`."""
        v = self._fitted_variance()
        v = v.expand(len(self.groups)) if v.dim() == 0 else v
        return {g: float(s) for g, s in zip(self.groups, v)}

    def layer_contributions(self, X: Tensor) -> dict[str, float]:
        r"""Each layer's share of the kernel's trace on ``X``.

        .. math:: c_g = \frac{\sigma_g^2 \operatorname{tr} J_g(X) J_g(X)^\top}
            {\sum_h \sigma_h^2 \operatorname{tr} J_h(X) J_h(X)^\top}, \qquad \sum_g c_g = 1.

        Cost: one dense Jacobian of ``X`` (``N·O·P`` memory).
        """
        X = self._prepare("X", X)
        sq = self._lin.jacobian(X).square().sum((0, 1))  # (P,)
        per_group = torch.zeros(len(self.groups), dtype=sq.dtype, device=sq.device)
        per_group.index_add_(0, self._lin.space.group_index(), sq)
        weighted = per_group * self._fitted_variance()
        shares = weighted / weighted.sum()
        return {g: float(s) for g, s in zip(self.groups, shares)}

    # ------------------------------------------------------------------ the kernel
    def _prepare(self, name: str, X: object) -> Tensor:
        # Inputs are constants: the NTK is a function of θ*, and its Jacobian engines do
        # not differentiate through the inputs (inducing points stay where they are).
        X = check_tensor("EmpiricalNTK", name, X)
        if X.requires_grad:  # otherwise the very tensor, so the engine's chunk cache hits
            X = X.detach()
        if X.dim() == 1:
            X = X.unsqueeze(1)
        elif X.dim() == 2 and self._slicing:
            X = self._slice_input(X)
        return self._lin.check_inputs("EmpiricalNTK", name, X)

    def forward(self, X: Tensor, Z: Tensor | None = None, diag: bool = False) -> Tensor:
        r"""The Gram matrix ``K(X, Z)`` (``N × M``), or its diagonal ``K(X, X)`` (``N``).

        Args:
            X: inputs ``(N, ...)``.
            Z: inputs ``(M, ...)`` with X's feature shape; ``None`` means ``X``.
            diag: return only the diagonal of ``K(X, X)`` (``Z`` is ignored, as in Pyro).

        Returns:
            A fresh, contiguous, dense tensor, differentiable in :attr:`variance`.
        """
        X = self._prepare("X", X)
        variance = self.variance
        if diag:
            return self._diag(X, variance)
        Zp = None if Z is None else self._prepare("Z", Z)
        return self._gram(X, Zp, variance).contiguous()

    def _diag(self, X: Tensor, variance: Tensor) -> Tensor:
        d = self._lin.ntk_diag(X, variance=variance)
        O = d.shape[0] // X.shape[0]
        return d if O == 1 else d.reshape(X.shape[0], O).mean(-1)

    def _gram(self, X: Tensor, Z: Tensor | None, variance: Tensor) -> Tensor:
        lin = self._lin
        if lin.output_dim(X) == 1:
            return lin.ntk_dense(X, Z, variance=variance)
        # Output average (1/O) Σ_o J_o diag(σ²) J_oᵀ: the diagonal (o, o) blocks of the
        # cross-output Gram matrix, one chunk of rows at a time (memory chunk·O·M·O). The
        # engines form these blocks faster than a contraction of per-example Jacobians.
        O = lin.output_dim(X)
        N, M = X.shape[0], (X if Z is None else Z).shape[0]
        step = lin.chunk_size or N
        if step >= N:
            return _output_average(lin.ntk_dense(X, Z, variance=variance), N, M, O)
        Z = X if Z is None else Z
        return torch.cat(
            [
                _output_average(lin.ntk_dense(X[s : s + step], Z, variance=variance), -1, M, O)
                for s in range(0, N, step)
            ]
        )


def _output_average(K: Tensor, N: int, M: int, O: int) -> Tensor:
    """``(N·O, M·O)`` → ``(N, M)``: the mean of the output-diagonal blocks ``K[n·O+o, m·O+o]``."""
    return K.reshape(N, O, M, O).diagonal(dim1=1, dim2=3).mean(-1)
