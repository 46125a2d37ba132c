r"""The empirical NTK as a lazy GPyTorch kernel.

.. math::

    k(x, x') = \sum_g \sigma_g^2\, J_g(x)\, J_g(x')^\top .

:class:`NTKKernel` returns a :class:`pyro_ntk.NTKLinearOperator`, so GPyTorch's
Cholesky-free machinery (CG / mBCG solves, stochastic Lanczos log-determinants, LOVE,
pivoted-Cholesky preconditioning) runs on Jacobian-vector products and never forms ``K``.
"""

from __future__ import annotations

import math

import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.kernels import Kernel
from gpytorch.priors import Prior
from torch import Tensor, nn

from pyro_ntk.kernels._output import LinearizedKernel, output_linearization
from pyro_ntk.linearization import Linearization
from pyro_ntk.operators import NTKLinearOperator
from pyro_ntk.parameters import ParamSelector


class NTKKernel(LinearizedKernel, Kernel):
    r"""The empirical neural tangent kernel of a trained network, for GPyTorch.

    .. math::

        k(x, x') = \sum_{g=1}^{G} \sigma_g^2\, J_g(x)\, J_g(x')^\top,
        \qquad J_g(x) = \partial f(x;\theta)/\partial\theta_g \,\big|_{\theta^*},

    with one σ² (``layer_variances=False``) or one σ_g² per parameter group (layer,
    :attr:`groups`). ``forward`` returns the lazy
    :class:`~pyro_ntk.NTKLinearOperator` ``K(x1, x2)``: products cost one VJP and one JVP
    (never ``N × P`` memory), the diagonal is exact from per-example gradients, and
    gradients reach σ² through every solve and log-determinant.

    **Multi-output networks** (``O > 1``): with ``output=None`` the kernel is the full
    cross-output NTK of size ``(N·O) × (M·O)`` in GPyTorch's interleaved layout (row
    ``n·O + o``) and :meth:`num_outputs_per_input` is ``O`` (use a
    ``MultitaskGaussianLikelihood``); ``output=k`` gives the single-output kernel of
    output ``k``. (Pyro's :class:`~pyro_ntk.EmpiricalNTK` averages outputs instead, as
    Pyro's ``latent_shape`` needs one shared kernel.)

    **Inputs**: GPyTorch hands kernels ``... × N × D`` tensors; for networks that take
    other shapes (images) pass ``input_shape`` (e.g. ``(1, 28, 28)``) and feed the
    model flattened inputs: each ``x`` is viewed as ``(N, *input_shape)``. Inputs are data:
    no gradient flows to them (inducing points stay fixed). Inputs with batch dimensions
    (or a kernel with a ``batch_shape``) are evaluated densely, one batch element at a time
    (small problems only).

    **Parameters**: ``raw_variance`` (shape ``(*batch_shape,)``, or
    ``(*batch_shape, G)``) with a :class:`gpytorch.constraints.Positive` constraint, read
    and set through :attr:`variance`. The network's weights are copied (θ*) and never
    appear in ``parameters()``; ``.double()``/``.to(...)`` convert that copy, never the
    network.

    Args:
        network: the trained ``nn.Module``, or a :class:`~pyro_ntk.Linearization` to share
            its θ* copy (with ``output=None``).
        params: which parameters to linearize (names, a predicate ``(name, p) -> bool`` or
            ``None`` for all with ``requires_grad``).
        variance: initial σ² > 0 (``None``: 1, and :attr:`variance_given` is ``False``): a
            scalar, or ``(G,)`` with ``layer_variances=True``.
        variance_constraint: constraint on σ² (default ``Positive()``).
        variance_prior: optional prior on σ² (registered as ``variance_prior``).
        layer_variances: one σ_g² per parameter group (layer).
        output: ``None`` (all outputs) or one output index.
        input_shape: per-example shape the network takes, when it is not ``(D,)``.
        chunk_size: inputs per chunk in the Jacobian products (``None``: all at once).
        **kwargs: passed to :class:`gpytorch.kernels.Kernel` (``batch_shape``,
            ``active_dims``).

    Attributes:
        variance_given: ``True`` when ``variance`` was passed, ``False`` when it defaulted
            (a caller may then start σ² at a data-aware value and set it to ``True``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> kernel = NTKKernel(net, layer_variances=True)
        >>> X = torch.randn(10, 2)
        >>> K = kernel(X).evaluate_kernel()
        >>> type(K).__name__, K.shape, kernel.variance.shape
        ('NTKLinearOperator', torch.Size([10, 10]), torch.Size([2]))
        >>> [name for name, _ in kernel.named_parameters()]
        ['raw_variance']
    """

    has_lengthscale = False

    def __init__(
        self,
        network: nn.Module | Linearization,
        params: ParamSelector = None,
        variance: Tensor | float | None = None,
        variance_constraint: Interval | None = None,
        variance_prior: Prior | None = None,
        layer_variances: bool = False,
        output: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        chunk_size: int | None = None,
        **kwargs,
    ):
        where = "NTKKernel"
        lin = output_linearization(network, params, output, chunk_size, where)
        super().__init__(**kwargs)
        if input_shape is not None:
            input_shape = tuple(input_shape)
            if not input_shape or not all(isinstance(s, int) and s > 0 for s in input_shape):
                raise ValueError(
                    f"{where}: input_shape must be a non-empty tuple of positive ints, got "
                    f"{input_shape!r}."
                )
        self.input_shape = input_shape
        init = self._keep_linearization(where, lin, output, variance, layer_variances)
        if variance_constraint is None:
            variance_constraint = Positive()
        shape = (*self.batch_shape, *init.shape)
        self.register_parameter(
            "raw_variance",
            nn.Parameter(torch.zeros(shape, dtype=self._lin.dtype, device=self._lin.device)),
        )
        self.register_constraint("raw_variance", variance_constraint)
        if variance_prior is not None:
            if not isinstance(variance_prior, Prior):
                raise TypeError(
                    f"{where}: variance_prior must be a gpytorch Prior, got "
                    f"{type(variance_prior).__name__}."
                )
            self.register_prior(
                "variance_prior", variance_prior, _variance_param, _variance_closure
            )
        self.variance = init.expand(shape)

    # ------------------------------------------------------------------ parameters
    @property
    def variance(self) -> Tensor:
        """σ² (``(*batch_shape,)``) or σ_g² (``(*batch_shape, G)``), constrained."""
        return self.raw_variance_constraint.transform(self.raw_variance)

    @variance.setter
    def variance(self, value: Tensor | float) -> None:
        self._set_variance(value)

    def _set_variance(self, value: Tensor | float) -> None:
        if not torch.is_tensor(value):
            value = torch.as_tensor(value).to(self.raw_variance)
        self.initialize(raw_variance=self.raw_variance_constraint.inverse_transform(value))

    def _apply(self, fn, *args, **kwargs):
        # .to / .double / .float / .cuda: convert the θ* copy along with raw_variance.
        out = super()._apply(fn, *args, **kwargs)
        p = self.raw_variance
        if p.dtype != self._lin.dtype or p.device != self._lin.device:
            self._lin = self._lin.to(p.dtype, p.device)
        return out

    # ------------------------------------------------------------------ the kernel
    def _network_input(self, name: str, x: Tensor) -> Tensor:
        """``(N, D)`` → ``(N, *input_shape)``, validated against the network."""
        if self.input_shape is not None:
            D = math.prod(self.input_shape)
            if x.shape[-1] != D:
                raise ValueError(
                    f"NTKKernel: {name} has {x.shape[-1]} features per example; input_shape "
                    f"{self.input_shape} needs {D}."
                )
            x = x.reshape(*x.shape[:-1], *self.input_shape)
        return self._lin.check_inputs("NTKKernel", name, x.detach())

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        """``O`` for a multi-output network with ``output=None``, else 1."""
        if self.output is not None:
            return 1
        x = x1.reshape(-1, x1.shape[-1])[:1]
        return self._lin.output_dim(self._network_input("x1", x))

    def forward(
        self,
        x1: Tensor,
        x2: Tensor,
        diag: bool = False,
        last_dim_is_batch: bool = False,
        **params,
    ) -> Tensor | NTKLinearOperator:
        r"""``K(x1, x2)``: ``... × (N·O) × (M·O)``, or its diagonal ``... × N·O``.

        Without batch dimensions the result is a lazy
        :class:`~pyro_ntk.NTKLinearOperator`; with them, a dense tensor.
        """
        if last_dim_is_batch:
            raise ValueError("NTKKernel: last_dim_is_batch=True is not supported.")
        variance = self.variance
        var_batch = variance.shape[: variance.dim() - (1 if self.layer_variances else 0)]
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], var_batch)
        if len(batch) == 0:
            X1 = self._network_input("x1", x1)
            X2 = X1 if x2 is x1 else self._network_input("x2", x2)
            K = NTKLinearOperator(X1, X2, variance, network=self._lin)
            return K.diagonal() if diag else K
        # Batched inputs or kernel: dense, one batch element at a time.
        G = (variance.shape[-1],) if self.layer_variances else ()
        x1 = x1.expand(*batch, *x1.shape[-2:]).reshape(-1, *x1.shape[-2:])
        x2 = x2.expand(*batch, *x2.shape[-2:]).reshape(-1, *x2.shape[-2:])
        variance = variance.expand(*batch, *G).reshape(-1, *G)
        out = []
        for a, b, v in zip(x1, x2, variance):
            X1 = self._network_input("x1", a)
            X2 = self._network_input("x2", b)
            K = NTKLinearOperator(X1, X2, v, network=self._lin)
            out.append(K.diagonal() if diag else K.to_dense())
        out = torch.stack(out)
        return out.reshape(*batch, *out.shape[1:])


def _variance_param(module: NTKKernel) -> Tensor:
    return module.variance


def _variance_closure(module: NTKKernel, value: Tensor) -> None:
    module._set_variance(value)
