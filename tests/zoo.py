"""The network zoo: one tiny seeded network per architecture feature the engines must handle.

Every case is a plain ``nn.Module`` that takes one tensor ``(N, ...)`` whose dim 0 indexes
the examples and returns ``(N, O)`` or ``(N,)``; each output row depends on its own example
only, so the empirical NTK is defined and ``pyro_ntk.testing``'s per-example references
apply. The zoo covers:

* inputs and sequences: integer token ids through ``nn.Embedding``; ``nn.RNN``,
  ``nn.LSTM`` and ``nn.GRU`` in both layouts (``batch_first=False`` networks transpose to
  sequence-first inside, so dim 1 of the tensors the layers see is the example);
  ``nn.LSTMCell`` and ``nn.GRUCell`` unrolled in a Python loop;
* attention: ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` in both
  layouts (the encoder's batch-first eval mode has a fused fast path), a bare
  ``nn.MultiheadAttention``, and Perceiver-style learned latents (an ``(L, d)`` parameter
  through an ``nn.Linear``: a layer whose leading dimension is *not* the example);
* convolutions: strided and dilated ``Conv1d``, ``Conv2d`` with stride, dilation, groups and
  padding, ``Conv3d``, ``ConvTranspose2d``, nearest and bilinear ``nn.Upsample``, max,
  average and adaptive pooling;
* normalization: ``BatchNorm1d``/``BatchNorm2d`` with non-trivial running statistics (so
  eval mode matters), ``GroupNorm``, ``LayerNorm``, affine ``InstanceNorm2d``, and a
  ResNet-style residual block (BatchNorm, in-place ReLU and an in-place residual add);
* in-place activations (``ReLU``, ``LeakyReLU``, ``ELU``, ``SiLU``), ``PReLU`` with one and
  with per-channel slopes (and a case whose output count equals the test batch size, where
  a batch/output mix-up is silent), weight tying (one layer called twice, two layers
  sharing one ``Parameter``), a frozen submodule and a buffer read in forward, a
  sequence-first ``nn.Linear`` applied to a ``(T, N, d)`` tensor, and a two-headed
  network with three outputs.

Sizes are tiny (widths ≤ 8, sequence length 3, images ≤ 6×6, at most about a thousand
parameters for the attention layers) so that the dense references stay cheap.
:attr:`ZooCase.inner` lists the inner dimensions (sequence length ``T``, latent count ``L``,
channels, output count) that a batch size or a chunk size could be confused with; the tests
choose ``N`` and ``chunk_size`` equal to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from networks import Case, set_running_stats
from torch import Tensor, nn

T = 3
"""Sequence length of every sequence case."""


@dataclass
class ZooCase(Case):
    inner: tuple[int, ...] = ()
    """Inner dimensions (T, L, channels, O) that tests use as ``N`` and as ``chunk_size``."""


# ---------------------------------------------------------------------- inputs
def _tokens(n: int) -> Tensor:
    return torch.randint(0, 10, (n, T))


def _seq(d: int):
    return lambda n: torch.randn(n, T, d)


def _tab(d: int = 3):
    return lambda n: torch.randn(n, d)


def _img(c: int, h: int, w: int | None = None):
    return lambda n: torch.randn(n, c, h, h if w is None else w)


# ---------------------------------------------------------------------- sequences
class EmbeddingMean(nn.Module):
    """Token ids ``(N, T)`` → embeddings → mean over T → linear head."""

    def __init__(self, vocab: int = 10, d: int = 4, d_out: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, d_out)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens).mean(1))


class Recurrent(nn.Module):
    """``(N, T, d)`` → RNN/LSTM/GRU → last time step → linear head.

    With ``batch_first=False`` the input is transposed to ``(T, N, d)`` first.
    """

    def __init__(self, kind: type[nn.RNNBase], batch_first: bool, d: int = 2, hidden: int = 4):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = kind(d, hidden, batch_first=batch_first)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


class UnrolledCell(nn.Module):
    """``(N, T, d)`` → an ``LSTMCell`` or ``GRUCell`` stepped over T in Python → head."""

    def __init__(self, kind: type[nn.Module], d: int = 2, hidden: int = 4):
        super().__init__()
        self.cell = kind(d, hidden)
        self.hidden = hidden
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        c = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.head(h)


# ---------------------------------------------------------------------- attention
D_MODEL = 8


def _layer_kwargs(batch_first: bool) -> dict:
    return dict(d_model=D_MODEL, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)


class Encoder(nn.Module):
    """``(N, T, 8)`` → ``TransformerEncoderLayer`` → mean over T → head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(**_layer_kwargs(batch_first))
        self.head = nn.Linear(D_MODEL, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_first:
            return self.head(self.layer(x).mean(1))
        return self.head(self.layer(x.transpose(0, 1)).mean(0))


class Decoder(nn.Module):
    """``(N, T, 8)`` → ``TransformerDecoderLayer`` → mean over T → head.

    Batch-first: the memory is the input itself. Sequence-first: the memory is a learned
    ``(2, 8)`` parameter shared by every example.
    """

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerDecoderLayer(**_layer_kwargs(batch_first))
        if not batch_first:
            self.memory = nn.Parameter(torch.randn(2, D_MODEL))
        self.head = nn.Linear(D_MODEL, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_first:
            return self.head(self.layer(x, x).mean(1))
        tgt = x.transpose(0, 1)  # (T, N, d)
        memory = self.memory.unsqueeze(1).expand(-1, x.shape[0], -1)  # (S, N, d)
        return self.head(self.layer(tgt, memory).mean(0))


class SelfAttention(nn.Module):
    """``(N, T, 8)`` → batch-first ``nn.MultiheadAttention`` (weights returned) → mean → head."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D_MODEL, 2, batch_first=True)
        self.head = nn.Linear(D_MODEL, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


class Latents(nn.Module):
    """Perceiver-style cross-attention from each example to ``L`` learned latents.

    The latents, an ``(L, d)`` parameter, pass through an ``nn.Linear`` whose leading
    dimension is the latent index, not the example; then ``softmax(q(x) latentsᵀ) latents``.
    """

    def __init__(self, num_latents: int = 4, d_in: int = 3, d: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, d))
        self.proj = nn.Linear(d, d)
        self.query = nn.Linear(d_in, d)
        self.head = nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        lat = torch.tanh(self.proj(self.latents))  # (L, d)
        scores = self.query(x) @ lat.T  # (N, L)
        return self.head(scores.softmax(-1) @ lat)


# ---------------------------------------------------------------------- convolutions
def _conv1d() -> nn.Module:
    # (N, 2, 9) → (N, 4, 3): stride 2, dilation 2
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1)
    )


def _conv2d_strided() -> nn.Module:
    # (N, 2, 6, 6) → (N, 4, 2, 2)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, dilation=2, groups=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 1),
    )


def _conv3d() -> nn.Module:
    # (N, 1, 4, 4, 4) → (N, 2, 2, 2, 2)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 1))


def _conv_transpose2d() -> nn.Module:
    # (N, 2, 3, 3) → (N, 3, 6, 6) → (N, 3, 2, 2)
    return nn.Sequential(
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 1),
    )


def _upsample(mode: str) -> nn.Module:
    # (N, 1, 4, 4) → (N, 2, 2, 2) → (N, 2, 4, 4) → (N, 2, 2, 2)
    extra = {} if mode == "nearest" else {"align_corners": False}
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Tanh(),
        nn.Upsample(scale_factor=2, mode=mode, **extra),
        nn.Conv2d(2, 2, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, 1),
    )


def _pools() -> nn.Module:
    # (N, 1, 6, 6) → max (3, 3, 3) → avg (3, 2, 2) → conv (4, 2, 2) → adaptive (4, 1, 2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.AvgPool2d(2, stride=1),
        nn.Conv2d(3, 4, 1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d((1, 2)),
        nn.Flatten(),
        nn.Linear(8, 1),
    )


# ---------------------------------------------------------------------- normalization
def _batchnorm1d() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    return set_running_stats(net)


def _conv_norm(norm: nn.Module) -> nn.Module:
    # (N, 1, 5, 5) → (N, 4, 3, 3)
    return nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(36, 1))


def _layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))


class BasicBlock(nn.Module):
    """A ResNet basic block (torchvision's layout: in-place ReLU, in-place residual add)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _resnet() -> nn.Module:
    # (N, 1, 6, 6) → stem (4, 6, 6) → block → global average → head
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        BasicBlock(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 1),
    )
    return set_running_stats(net)


# ---------------------------------------------------------------------- other
def _relu_inplace_linear() -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)
    )


def _relu_inplace_conv() -> nn.Module:
    # (N, 1, 5, 5) → (N, 3, 3, 3)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(27, 1))


def _middle(act: nn.Module, d_out: int = 1) -> nn.Module:
    """Linear → Tanh → Linear → ``act`` → Linear: ``act`` in a middle layer."""
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), act, nn.Linear(8, d_out))


class TiedLinear(nn.Module):
    """One hidden ``nn.Linear`` called twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden(h))
        return self.head(h)


class SharedWeight(nn.Module):
    """Two ``nn.Linear`` layers holding one weight ``Parameter`` (own biases)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.a(h))
        h = torch.sin(self.b(h))
        return self.head(h)


class FrozenAndBuffer(nn.Module):
    """A frozen first layer (``requires_grad=False``) and a registered buffer read in forward."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 8).requires_grad_(False)
        self.register_buffer("offset", torch.randn(8))
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.frozen(x) + self.offset)
        return self.head(torch.tanh(self.mid(h)))


class SequenceFirstLinear(nn.Module):
    """``(N, T, d)`` → ``(T, N, d)`` → ``nn.Linear`` on the 3-D tensor → mean over T → head."""

    def __init__(self, d: int = 2, width: int = 4):
        super().__init__()
        self.proj = nn.Linear(d, width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.proj(x.transpose(0, 1)))  # (T, N, width)
        return self.head(h.mean(0))


class TwoHeads(nn.Module):
    """A shared trunk and two heads (2 and 1 outputs) concatenated: O = 3."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head_a = nn.Linear(8, 2)
        self.head_b = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return torch.cat([self.head_a(h), self.head_b(h)], dim=1)


class ScalarOutput(nn.Module):
    """A network returning ``(N,)`` instead of ``(N, 1)``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).squeeze(-1)


# ---------------------------------------------------------------------- the zoo
PRELU_OUTPUTS = 4
"""Outputs of the ``prelu_outputs_eq_batch`` case; its tests use a batch of this size."""

ZOO: list[ZooCase] = [
    # inputs and sequences
    ZooCase("embedding_mean", EmbeddingMean, _tokens, inner=(T,)),
    ZooCase("rnn_batch_first", lambda: Recurrent(nn.RNN, True), _seq(2), inner=(T,)),
    ZooCase("rnn_seq_first", lambda: Recurrent(nn.RNN, False), _seq(2), inner=(T,)),
    ZooCase("lstm_batch_first", lambda: Recurrent(nn.LSTM, True), _seq(2), inner=(T,)),
    ZooCase("lstm_seq_first", lambda: Recurrent(nn.LSTM, False), _seq(2), inner=(T,)),
    ZooCase("gru_batch_first", lambda: Recurrent(nn.GRU, True), _seq(2), inner=(T,)),
    ZooCase("gru_seq_first", lambda: Recurrent(nn.GRU, False), _seq(2), inner=(T,)),
    ZooCase("lstm_cell_loop", lambda: UnrolledCell(nn.LSTMCell), _seq(2), inner=(T,)),
    ZooCase("gru_cell_loop", lambda: UnrolledCell(nn.GRUCell), _seq(2), inner=(T,)),
    # attention
    ZooCase("encoder_batch_first", lambda: Encoder(True), _seq(D_MODEL), inner=(T,)),
    ZooCase("encoder_seq_first", lambda: Encoder(False), _seq(D_MODEL), inner=(T,)),
    ZooCase("decoder_batch_first", lambda: Decoder(True), _seq(D_MODEL), inner=(T,)),
    ZooCase("decoder_seq_first", lambda: Decoder(False), _seq(D_MODEL), inner=(T,)),
    ZooCase("multihead_attention", SelfAttention, _seq(D_MODEL), inner=(T,)),
    ZooCase("perceiver_latents", Latents, _tab(3), inner=(4,)),
    # convolutions
    ZooCase("conv1d_stride_dilation", _conv1d, lambda n: torch.randn(n, 2, 9), inner=(4, 2, 3)),
    ZooCase("conv2d_groups_dilation", _conv2d_strided, _img(2, 6), inner=(2, 4)),
    ZooCase("conv3d", _conv3d, lambda n: torch.randn(n, 1, 4, 4, 4), inner=(2,)),
    ZooCase("conv_transpose2d", _conv_transpose2d, _img(2, 3), inner=(3, 2)),
    ZooCase("upsample_nearest", lambda: _upsample("nearest"), _img(1, 4), inner=(2,)),
    ZooCase("upsample_bilinear", lambda: _upsample("bilinear"), _img(1, 4), inner=(2,)),
    ZooCase("pools", _pools, _img(1, 6), inner=(3, 4)),
    # normalization
    ZooCase("batchnorm1d", _batchnorm1d, _tab(3), inner=(8,)),
    ZooCase(
        "batchnorm2d",
        lambda: set_running_stats(_conv_norm(nn.BatchNorm2d(4))),
        _img(1, 5),
        inner=(4,),
    ),
    ZooCase("groupnorm", lambda: _conv_norm(nn.GroupNorm(2, 4)), _img(1, 5), inner=(4, 2)),
    ZooCase("layernorm", _layernorm, _tab(3), inner=(8,)),
    ZooCase(
        "instancenorm2d",
        lambda: _conv_norm(nn.InstanceNorm2d(4, affine=True)),
        _img(1, 5),
        inner=(4,),
    ),
    ZooCase("resnet_block", _resnet, _img(1, 6), inner=(4,)),
    # in-place and parametric activations
    ZooCase("relu_inplace_linear", _relu_inplace_linear, _tab(3), inner=(8,)),
    ZooCase("relu_inplace_conv", _relu_inplace_conv, _img(1, 5), inner=(3,)),
    ZooCase("leaky_relu_inplace", lambda: _middle(nn.LeakyReLU(0.1, inplace=True)), _tab(3)),
    ZooCase("elu_inplace", lambda: _middle(nn.ELU(inplace=True)), _tab(3)),
    ZooCase("silu_inplace", lambda: _middle(nn.SiLU(inplace=True)), _tab(3)),
    ZooCase("prelu_shared", lambda: _middle(nn.PReLU()), _tab(3)),
    ZooCase("prelu_per_channel", lambda: _middle(nn.PReLU(num_parameters=8)), _tab(3)),
    ZooCase(
        "prelu_outputs_eq_batch",
        lambda: _middle(nn.PReLU(num_parameters=8), d_out=PRELU_OUTPUTS),
        _tab(3),
        inner=(PRELU_OUTPUTS,),
    ),
    # weight sharing, frozen parts, layouts, outputs
    ZooCase("tied_linear", TiedLinear, _tab(3)),
    ZooCase("shared_weight", SharedWeight, _tab(3)),
    ZooCase("frozen_and_buffer", FrozenAndBuffer, _tab(3)),
    ZooCase("sequence_first_linear", SequenceFirstLinear, _seq(2), inner=(T,)),
    ZooCase("two_heads", TwoHeads, _tab(3), inner=(3,)),
    ZooCase("scalar_output", ScalarOutput, _tab(3)),
]
ZOO_IDS = [c.name for c in ZOO]

assert len(set(ZOO_IDS)) == len(ZOO_IDS), "zoo case names must be unique"
