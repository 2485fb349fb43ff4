"""Numerics of passes that change no weight (sparsebert.precision): under bf16 the linears'
weights are cast once per pass (importance, evaluation) instead of by autocast on every batch.
The oracle is the same pass with autocast doing the casts (the copies disabled): the results
must be bitwise equal (on CUDA, equal to the last bits that group_dot's atomics vary)."""

from __future__ import annotations

import collections
import contextlib
import importlib

import numpy as np
import pytest
import torch
from torch import nn

from sparsebert import precision as numerics
from sparsebert.glue import batching
from sparsebert.hf import patch, set_masks
from sparsebert.hf.patching import sparse_blocks
from sparsebert.pruning.importance import importance
from sparsebert.train import predict

evaluate_module = importlib.import_module("sparsebert.train.evaluate")

NUM_LABELS = 3


def _linear_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.Linear)
            for p in (m.weight, m.bias) if p is not None]


@contextlib.contextmanager
def _autocast_casts_every_batch():
    """The pass without the once-per-pass copies: autocast casts the weights on each use."""
    original = numerics.weights_cast_once
    numerics.weights_cast_once = lambda *args: contextlib.nullcontext(0)
    try:
        yield
    finally:
        numerics.weights_cast_once = original


def _scores(imp):
    return [t for t in (imp.head, imp.mlp, imp.neuron) if t is not None]


def _assert_same_scores(got, want, device: str) -> None:
    """Bitwise on the CPU; on CUDA the MLP and neuron gate gradients come from group_dot, whose
    float atomics sum in a varying order (last bits), so there: equal to fp32 rounding."""
    for g, w in zip(_scores(got), _scores(want), strict=True):
        if device == "cpu":
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.all_devices
@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("mode", ["paper", "per_example", "fisher", "michel"])
def test_bf16_scores_are_bitwise_those_of_per_batch_autocast(family, mode, device, tiny_bert,
                                                             tiny_roberta, tiny_batches):
    make = tiny_bert if family == "bert" else tiny_roberta
    model = patch(make(num_labels=NUM_LABELS)).to(device)
    batches = tiny_batches(num_batches=3, num_labels=NUM_LABELS, seq=8)
    kw = dict(mode=mode, precision="bf16", neurons=True, progress=False)
    new = importance(model, batches, **kw)
    with _autocast_casts_every_batch():
        reference = importance(model, batches, **kw)
    _assert_same_scores(new, reference, device)


@pytest.mark.all_devices
def test_bf16_scores_with_masked_heads_and_a_pruned_mlp(device, tiny_bert, tiny_batches,
                                                        tiny_dims):
    """Live-head weight slices (masked heads) and a removed MLP, scored with masked heads' true
    gradients: still bitwise the per-batch-autocast scores."""
    model = patch(tiny_bert(num_labels=NUM_LABELS)).to(device)
    head_mask = torch.ones(tiny_dims.layers, tiny_dims.heads)
    head_mask[0, :2] = 0
    mlp_mask = torch.ones(tiny_dims.layers)
    mlp_mask[-1] = 0
    set_masks(model, head_mask=head_mask, mlp_mask=mlp_mask)
    batches = tiny_batches(num_batches=2, num_labels=NUM_LABELS)
    kw = dict(mode="paper", precision="bf16", score_masked_heads=True, progress=False)
    new = importance(model, batches, **kw)
    with _autocast_casts_every_batch():
        reference = importance(model, batches, **kw)
    _assert_same_scores(new, reference, device)


def _casts_per_batch(model, batches, **kw) -> int:
    """aten::_to_copy calls that one more batch adds to a pass."""
    def count(n):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            importance(model, batches[:n], progress=False, **kw)
        return collections.Counter(e.name for e in prof.events())["aten::_to_copy"]

    return count(2) - count(1)


def test_bf16_pass_casts_no_weight_per_batch(tiny_bert, tiny_batches):
    """Per batch, the pass casts every linear weight and bias fewer times than autocast alone."""
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = tiny_batches(num_batches=2, num_labels=NUM_LABELS)
    kw = dict(mode="paper", precision="bf16")
    new = _casts_per_batch(model, batches, **kw)
    with _autocast_casts_every_batch():
        before = _casts_per_batch(model, batches, **kw)
    assert before - new == len(_linear_params(model))


def test_model_is_restored_after_a_bf16_pass(tiny_bert, tiny_batches):
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    params = dict(model.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    importance(model, tiny_batches(num_labels=NUM_LABELS), precision="bf16", progress=False)
    after = dict(model.named_parameters())
    assert after.keys() == params.keys()
    for name, p in after.items():
        assert p is params[name], name
        assert p.dtype == torch.float32 and p.requires_grad == flags[name], name


def test_bf16_linears_swaps_and_restores(tiny_bert):
    model = tiny_bert()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    originals = [(m.weight, m.bias) for m in linears]
    norm = model.bert.embeddings.LayerNorm.weight
    embedding = model.bert.embeddings.word_embeddings.weight
    with numerics.bf16_linears(model) as replaced:
        assert replaced == len(_linear_params(model))
        for m, (w, b) in zip(linears, originals, strict=True):
            assert m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad
            assert torch.equal(m.weight, w.to(torch.bfloat16))
            assert torch.equal(m.bias, b.to(torch.bfloat16))
        assert model.bert.embeddings.LayerNorm.weight is norm  # not a linear: untouched
        assert model.bert.embeddings.word_embeddings.weight is embedding
    for m, (w, b) in zip(linears, originals, strict=True):
        assert m.weight is w and m.bias is b


def test_bf16_linears_restores_after_an_error_and_shares_one_copy():
    shared = nn.Linear(4, 4)
    tied = nn.Linear(4, 4, bias=False)
    tied.weight = shared.weight  # one Parameter, two modules
    half = nn.Linear(4, 4).to(torch.float16)
    model = nn.Sequential(shared, tied, half)
    with pytest.raises(RuntimeError, match="inside"):
        with numerics.bf16_linears(model) as replaced:
            assert replaced == 3  # shared weight twice (one copy), shared bias; not the fp16 one
            assert tied.weight is shared.weight and tied.weight.dtype == torch.bfloat16
            assert half.weight.dtype == torch.float16
            raise RuntimeError("inside")
    assert tied.weight is shared.weight and shared.weight.dtype == torch.float32
    assert half.weight.dtype == torch.float16


def test_weights_cast_once_resolves_auto_by_device():
    model = nn.Sequential(nn.Linear(2, 2))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert numerics.resolve("auto", cpu) == "fp32" and numerics.resolve("auto", cuda) == "bf16"
    with numerics.weights_cast_once(model, "auto", cpu) as replaced:  # fp32 on the CPU
        assert replaced == 0 and model[0].weight.dtype == torch.float32
    with numerics.weights_cast_once(model, "bf16", cpu) as replaced:
        assert replaced == 2 and model[0].weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        numerics.resolve("fp16", cpu)


# --------------------------------------------------------------------------------------------
# Evaluation (sparsebert.train.predict)
# --------------------------------------------------------------------------------------------
def _encoded(vocab: int, rows: int = 11, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, vocab, (int(n),), generator=gen).tolist()
           for n in torch.randint(3, 20, (rows,), generator=gen)]
    return batching.Encoded(input_ids=ids, token_type_ids=None,
                            labels=np.zeros(len(ids), dtype=np.int64),
                            lengths=np.array([len(r) for r in ids]), pad_token_id=0,
                            max_length=32)


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_predictions_are_bitwise_those_of_per_batch_autocast(masked, tiny_bert, tiny_dims,
                                                                  monkeypatch):
    """Regression scores (the logits themselves) under bf16, weights cast once per call vs by
    autocast per batch; with masked heads the live heads' weight slices are kept per call."""
    model = patch(tiny_bert(num_labels=1))
    if masked:
        head_mask = torch.ones(tiny_dims.layers, tiny_dims.heads)
        head_mask[:, 1] = 0
        set_masks(model, head_mask=head_mask)
    params = dict(model.named_parameters())
    encoded = _encoded(model.config.vocab_size)
    got = predict(model, encoded, regression=True, batch_size=4, precision="bf16")
    assert all(p is params[name] and p.dtype == torch.float32
               for name, p in model.named_parameters())  # the model's own parameters again
    monkeypatch.setattr(evaluate_module, "weights_cast_once",
                        lambda *args: contextlib.nullcontext(0))
    want = predict(model, encoded, regression=True, batch_size=4, precision="bf16")
    np.testing.assert_array_equal(got, want)
    fp32 = predict(model, encoded, regression=True, batch_size=4, precision="fp32")
    assert not np.array_equal(got, fp32)  # bf16 did change the numerics


def test_predictions_after_a_weight_change_between_calls(tiny_bert, tiny_dims):
    """Each call's bf16 copies are new tensors (possibly where the last call's were): a weight
    changed between two calls is seen, masked heads' kept slices included."""
    model = patch(tiny_bert(num_labels=1))
    head_mask = torch.ones(tiny_dims.layers, tiny_dims.heads)
    head_mask[:, 0] = 0
    set_masks(model, head_mask=head_mask)
    encoded = _encoded(model.config.vocab_size)
    predict(model, encoded, regression=True, batch_size=4, precision="bf16")
    with torch.no_grad():
        for block, _ in sparse_blocks(model):
            block.query_linear().weight.mul_(-2.0)
    got = predict(model, encoded, regression=True, batch_size=4, precision="bf16")
    fresh = patch(tiny_bert(num_labels=1))
    fresh.load_state_dict(model.state_dict())
    set_masks(fresh, head_mask=head_mask)
    want = predict(fresh, encoded, regression=True, batch_size=4, precision="bf16")
    np.testing.assert_array_equal(got, want)


def test_bf16_predictions_under_inference_mode(tiny_bert, tiny_dims):
    """Under torch.inference_mode the copies are ordinary tensors (masked heads' weight slices
    are kept by version counter) and the predictions are those outside it."""
    model = patch(tiny_bert(num_labels=1))
    head_mask = torch.ones(tiny_dims.layers, tiny_dims.heads)
    head_mask[:, 0] = 0
    set_masks(model, head_mask=head_mask)
    encoded = _encoded(model.config.vocab_size)
    want = predict(model, encoded, regression=True, batch_size=4, precision="bf16")
    with torch.inference_mode():
        got = predict(model, encoded, regression=True, batch_size=4, precision="bf16")
        with numerics.bf16_linears(model):
            assert not any(p.is_inference() for p in model.parameters())
    np.testing.assert_array_equal(got, want)
