"""Factored ``nn.Embedding`` (gather / index_add / Gram by token equality) against ``jacrev``.

Token ids ``(N, T)`` with repeated tokens (within and across examples), single ids ``(N,)``;
each test asserts the Embedding *is* factored. Embeddings the engine
leaves generic (``max_norm``, a custom ``forward``) carry a reason, and a wrong sparse
product or Gram is caught by the proof and demoted, not used.
"""

from __future__ import annotations

import pytest
import torch
from product_checks import check, rel_err
from torch import nn
from zoo import ZOO, ZOO_IDS

import pyro_ntk._engines.structured.embedding as emb
from pyro_ntk import Linearization
from pyro_ntk._engines.structured.plan import make_plan
from pyro_ntk.parameters import ParameterSpace


def factored(lin: Linearization) -> set[str]:
    return {layer.module_name for layer in lin.engine.plan.layers if layer.kind == "embedding"}


class Tokens(nn.Module):
    """ids (N, T) → Embedding → tanh → flatten → Linear(T·d, 2)."""

    def __init__(self, vocab=5, d=3, T=4, padding_idx=None, **kw):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=padding_idx, **kw)
        self.head = nn.Linear(T * d, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).flatten(1))


def ids(n, T=4, vocab=5):
    return torch.randint(0, vocab, (n, T))  # a small vocabulary: tokens repeat


def test_token_sequences():
    net = Tokens()
    lin = check(net, ids(5), ids(4), chunk_size=3)
    assert factored(lin) == {"embed"}
    assert lin.engine.plan.generic == []
    # never a K-FAC layer: its A would be token ids
    assert {f.name for f in lin.layer_factors(ids(3))} == {"head"}


def test_single_ids_per_example():
    net = nn.Sequential(nn.Embedding(6, 4), nn.Tanh(), nn.Linear(4, 3))
    X1, X2 = torch.tensor([0, 3, 3, 5, 1]), torch.tensor([3, 2, 0])
    lin = check(net, X1, X2)
    assert factored(lin) == {"0"}


def test_padding_rows_get_no_gradient():
    # the preflight refuses padding_idx networks (torch's embedding jvp and backward differ
    # there), so the masking is checked against the backward of F.embedding directly
    W, x = torch.randn(5, 3, requires_grad=True), torch.tensor([[1, 2, 1], [0, 1, 4]])
    B = torch.randn(2, 1, 3, 3)
    (torch.nn.functional.embedding(x, W, padding_idx=1) * B[:, 0]).sum().backward()
    vjp = emb.embedding_vjp(x, B, torch.ones(2, 1, 1), rows=5, padding_idx=1)
    assert rel_err(vjp.reshape(5, 3), W.grad) <= 1e-12
    jac = emb.embedding_jacobian(x, B, 5, padding_idx=1).sum((0, 1)).reshape(5, 3)
    assert rel_err(jac, W.grad) <= 1e-12


def test_zoo_embedding_mean():
    case = ZOO[ZOO_IDS.index("embedding_mean")]
    net, X1 = case.build(n=4)
    lin = check(net, X1, case.make_inputs(3), chunk_size=3)
    assert factored(lin) == {n for n, m in net.named_modules() if isinstance(m, nn.Embedding)}


def test_max_norm_and_custom_forward_stay_generic_with_a_reason():
    net = Tokens(max_norm=1.0)  # the preflight refuses it (its forward writes W)
    plan = make_plan(net, ParameterSpace(net, where="test"))
    assert "embed.weight" in plan.generic
    assert "max_norm" in plan.reasons["embed"]

    class Doubled(nn.Embedding):
        def forward(self, x):
            return 2.0 * super().forward(x)

    net = nn.Sequential(Doubled(5, 3), nn.Flatten(), nn.Linear(12, 2))
    lin = check(net, ids(4), ids(3))
    assert factored(lin) == set()
    assert "not the stock" in lin.engine.plan.reasons["0"]


# ------------------------------------------------------------------ the proof catches errors
@pytest.mark.parametrize("which", ["embedding_jvp", "embedding_vjp"])
def test_a_wrong_sparse_product_is_demoted_not_used(monkeypatch, which):
    real = getattr(emb, which)
    monkeypatch.setattr(emb, which, lambda *a: real(*a) * 1.01)
    lin = check(Tokens(), ids(4), ids(3))
    assert factored(lin) == set()
    assert "disagree" in lin.engine.plan.reasons["embed"]


def test_a_wrong_index_gram_is_demoted_not_used(monkeypatch):
    real = emb.embedding_gram
    monkeypatch.setattr(emb, "embedding_gram", lambda *a: real(*a) * 1.01)
    lin = check(Tokens(), ids(4), ids(3))
    assert factored(lin) == set()
    assert "Gram off" in lin.engine.plan.reasons["embed"]
