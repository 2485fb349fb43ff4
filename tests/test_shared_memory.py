"""A patched model in shared memory (`model.share_memory()`, torch.multiprocessing): writes by
another process (a Hogwild worker's training steps) move no version counter in this one, so the
weight slices and gate readings sparsebert keeps between calls must not outlive them."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import sparsebert
from sparsebert.hf.patching import sparse_blocks
from tests.processes import write_shared_tensors


def test_writes_by_another_process_are_seen(tiny_bert, tiny_batch):
    """Evaluated once (slices and gate summaries kept), then written by a spawned process:
    the model and its accelerated fast path compute with the new weights and gates, as a fresh
    copy does (before, they kept the old slices and skipped the head the worker unmasked)."""
    model = sparsebert.patch(tiny_bert())
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    head_mask = torch.ones(layers, heads)
    head_mask[:, 1] = 0
    sparsebert.set_masks(model, head_mask=head_mask)
    model.eval()
    model.share_memory()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = sparsebert.accelerate(model)
        ids, mask = tiny_batch()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            fast(input_ids=ids, attention_mask=mask)
    encoder = model.base_model.encoder
    weights = [p for p in encoder.parameters()]
    gates = [attention.head_gate for attention, _ in sparse_blocks(model)]
    worker = mp.get_context("spawn").Process(target=write_shared_tensors, args=(weights, gates))
    worker.start()
    worker.join(120)
    assert worker.exitcode == 0
    assert bool((sparsebert.get_masks(model)["head_mask"] == 1).all())
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        want = fresh(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        got_fast = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_fast, want, rtol=1e-5, atol=1e-5)
    assert any("shared memory" in str(w.message) for w in caught), [str(w.message)
                                                                    for w in caught]


@pytest.fixture(autouse=True)
def _one_warning_per_process(monkeypatch):
    from sparsebert.speed import watch  # noqa: PLC0415

    monkeypatch.setattr(watch, "_warned_shared", [])
