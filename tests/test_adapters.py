"""A LoRA adapter's life on a patched model, as peft runs it: wrap a projection (the wrapper
holds the nn.Linear as `base_layer`), train, then merge (the delta added to the base weight
through `.data`, which moves no version counter) and unwrap. What a patched model and its
accelerated fast path kept from before the adapter must not outlive the merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsebert
from sparsebert.speed.compact import FastPathError


class _LoRA(nn.Module):
    """peft's LoRA layer in miniature: base_layer(x) + x A^T B^T, merged through .data."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = base
        gen = torch.Generator().manual_seed(5)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=gen))
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank, generator=gen))

    @property
    def weight(self) -> torch.Tensor:  # peft's layers answer with the base weight
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + x @ self.lora_a.T @ self.lora_b.T

    def merge_and_unload(self) -> nn.Linear:
        self.base_layer.weight.data += self.lora_b @ self.lora_a
        return self.base_layer


def test_merged_adapter_is_seen_by_the_model_and_its_fast_path(tiny_bert, tiny_batch):
    """Evaluated (head slices kept; the fast path's compact weights built), then a LoRA adapter
    on a masked layer's query, one forward with it, merged and unwrapped: the model and the fast
    path compute with the merged weight, as a fresh copy does (they kept the pre-merge slices)."""
    model = sparsebert.patch(tiny_bert()).eval()
    head_mask = torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads)
    head_mask[:, 1] = 0
    sparsebert.set_masks(model, head_mask=head_mask)
    ids, mask = tiny_batch()
    fast = sparsebert.accelerate(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        fast(input_ids=ids, attention_mask=mask)
        attention = model.bert.encoder.layer[0].attention.self
        attention.query = _LoRA(attention.query)
        with_adapter = model(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(FastPathError, match="not a plain"):
            fast(input_ids=ids, attention_mask=mask)
        attention.query = attention.query.merge_and_unload()
        want = copy.deepcopy(model)(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        got_fast = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(want, with_adapter, rtol=1e-5, atol=1e-6)  # merging changes none
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_fast, want, rtol=1e-5, atol=1e-5)
