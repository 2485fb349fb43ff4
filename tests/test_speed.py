"""The fast inference path (sparsebert.speed): same outputs as the masked model for every
variant (unpadded, padded, graph buckets), cache invalidation, reversibility, bad use."""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

import sparsebert
from sparsebert.speed import FastPathError, accelerate
from sparsebert.speed.graphs import GraphCache
from sparsebert.speed.tokens import Packing

CUDA = torch.cuda.is_available()


def _masks(dims, pattern: str):
    """(head_mask (L, H), mlp_mask (L,), neuron_mask (L, F)) for a named pattern."""
    heads = torch.ones(dims.layers, dims.heads)
    mlps = torch.ones(dims.layers)
    neurons = torch.ones(dims.layers, dims.intermediate)
    if pattern == "some":
        heads[0, 1] = 0
        heads[2, ::2] = 0
        neurons[:, ::3] = 0
    elif pattern == "layer_heads_off":  # every head of layer 1 pruned
        heads[1] = 0
        mlps[0] = 0
    elif pattern == "all_mlps_off":
        mlps[:] = 0
        heads[0, 0] = 0
    elif pattern == "all_off":
        heads[:] = 0
        mlps[:] = 0
    elif pattern == "soft":  # soft gates are folded into the compact weights
        heads[0] = torch.tensor([0.5, 0.0, 1.0, 0.25])[: dims.heads]
        mlps[1] = 0.5
        neurons[2, :5] = 0.3
    return heads, mlps, neurons


def _batch(batch, seq, vocab, lengths=None, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    if lengths is None:
        return ids, None
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def _hidden(model, ids, mask):
    return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


PATTERNS = ["none", "some", "layer_heads_off", "all_mlps_off", "all_off", "soft"]
SHAPES = {  # name: (batch, seq, lengths or None)
    "odd-lengths": (3, 9, [9, 6, 2]),
    "no-padding": (2, 7, None),
    "batch-of-1": (1, 5, [5]),
    "single-token": (2, 1, None),
    "one-token-rows": (3, 6, [6, 1, 1]),
}


@pytest.fixture(scope="module")
def shared_bert(tiny_bert):
    """One patched tiny BERT for the tests that only set masks (model building is slow)."""
    return sparsebert.patch(tiny_bert())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fast_path_equals_masked_model(shared_bert, tiny_dims, pattern):
    """Every shape (odd lengths, no padding, batch of 1, a single token, one-token rows), with
    and without unpadding: logits and the real positions' hidden states equal the masked model's."""
    model = shared_bert
    heads, mlps, neurons = _masks(tiny_dims, pattern)
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    for unpad in (True, False):
        fast = accelerate(model, unpad=unpad)
        for shape, (batch, seq, lengths) in SHAPES.items():
            ids, mask = _batch(batch, seq, tiny_dims.vocab, lengths)
            with torch.no_grad():
                expected = model(input_ids=ids, attention_mask=mask).logits
                hidden = _hidden(model, ids, mask)
            got = fast(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"{shape} {unpad}")
            real = torch.ones(batch, seq, dtype=torch.bool) if mask is None else mask.bool()
            got_hidden = fast._runner.base_model(input_ids=ids,
                                                 attention_mask=mask).last_hidden_state
            torch.testing.assert_close(got_hidden[real], hidden[real], rtol=0, atol=1e-5,
                                       msg=f"{shape} {unpad}")


def test_roberta_and_sdpa_masks(tiny_roberta, tiny_dims):
    """Another family, and the SDPA attention implementation's mask format."""
    model = sparsebert.patch(tiny_roberta(attn="sdpa"))
    heads, mlps, neurons = _masks(tiny_dims, "some")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    ids, mask = _batch(3, 8, tiny_dims.vocab, [8, 5, 3])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    got = accelerate(model)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_pruned_model_runs_on_the_fast_path(tiny_bert, tiny_dims):
    model = sparsebert.patch(tiny_bert())
    heads, mlps, neurons = _masks(tiny_dims, "layer_heads_off")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 4, 7])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    sparsebert.prune(model)
    got = accelerate(model)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_pytorch(tiny_bert, tiny_dims, dtype):
    """Error vs an fp64 reference at most 2x that of the masked model at the same precision."""
    model = sparsebert.patch(tiny_bert())
    heads, mlps, neurons = _masks(tiny_dims, "some")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    with torch.no_grad():
        reference = model.double()(input_ids=ids, attention_mask=mask).logits
        plain = model.to(dtype)(input_ids=ids, attention_mask=mask).logits.double()
    got = accelerate(model)(input_ids=ids, attention_mask=mask).logits.double()
    plain_error = (plain - reference).abs().max().item()
    fast_error = (got - reference).abs().max().item()
    assert fast_error <= 2 * plain_error + 1e-6, (fast_error, plain_error)


def test_cache_follows_masks_and_weights(tiny_bert, tiny_dims):
    model = sparsebert.patch(tiny_bert())
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    fast = accelerate(model)

    def check():
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits, expected,
                                   rtol=0, atol=1e-5)

    check()
    built = fast.encoder.builds
    assert built == tiny_dims.layers
    check()  # nothing changed: nothing rebuilt
    assert fast.encoder.builds == built
    # New masks (set_masks writes the gate buffers in place).
    heads, mlps, neurons = _masks(tiny_dims, "some")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    check()
    assert fast.encoder.builds > built
    # An in-place weight update of one layer rebuilds that layer only.
    built = fast.encoder.builds
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.weight.add_(0.5)
    check()
    assert fast.encoder.builds == built + 1
    # A replaced parameter (new tensor) is noticed too.
    with torch.no_grad():
        dense = model.bert.encoder.layer[2].output.dense
        dense.weight = torch.nn.Parameter(dense.weight * 2)
    check()
    # Writes through .data bypass version counters: invalidate() rebuilds.
    model.bert.encoder.layer[0].intermediate.dense.weight.data.mul_(3)
    fast.invalidate()
    check()
    # Physical pruning replaces the Linear modules; a replaced LayerNorm is noticed as well.
    sparsebert.prune(model)
    check()
    model.bert.encoder.layer[2].output.LayerNorm = torch.nn.LayerNorm(tiny_dims.hidden, eps=1e-3)
    check()
    # A LayerNorm's replaced Parameter (a captured CUDA graph would read its old storage).
    built = fast.encoder.builds
    norm = model.bert.encoder.layer[0].output.LayerNorm
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 2)
    check()
    assert fast.encoder.builds == built + 1
    # A fused optimizer step (sparsebert.train's AdamW) writes without moving version counters.
    model.train()
    loss = model(input_ids=ids, attention_mask=mask).logits.square().sum()
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    optimizer.step()
    model.eval()
    check()
    # Replaced modules outside the encoder's blocks, and a deleted layer.
    model.classifier = torch.nn.Linear(tiny_dims.hidden, model.config.num_labels)
    check()
    model.bert.pooler.dense = torch.nn.Linear(tiny_dims.hidden, tiny_dims.hidden)
    check()
    del model.bert.encoder.layer[tiny_dims.layers - 1]
    check()


def test_models_made_under_inference_mode(tiny_bert, tiny_dims, monkeypatch):
    """accelerate (which patches) inside torch.inference_mode makes ordinary gate buffers, so
    the compact weights are kept between calls; a model converted inside inference_mode (its
    parameters inference tensors, without version counters) is rebuilt on every call, with a
    warning once, and stays correct when masks change there."""
    import sparsebert.speed.watch as watch  # noqa: PLC0415

    monkeypatch.setattr(watch, "_warned_inference", [])
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    heads, mlps, neurons = _masks(tiny_dims, "some")
    model = tiny_bert()
    with torch.inference_mode():
        fast = accelerate(model)
        for _ in range(2):
            got = fast(input_ids=ids, attention_mask=mask).logits
        assert fast.encoder.builds == tiny_dims.layers  # kept: the gates are ordinary tensors
        torch.testing.assert_close(got, model(input_ids=ids, attention_mask=mask).logits,
                                   rtol=0, atol=1e-5)
    converted = sparsebert.patch(tiny_bert())
    with torch.inference_mode():
        converted.double()
    fast = accelerate(converted)
    with pytest.warns(UserWarning, match="inference tensors .* rebuilt on every call"):
        fast(input_ids=ids, attention_mask=mask)
    with torch.inference_mode():
        sparsebert.set_masks(converted, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
        got = fast(input_ids=ids, attention_mask=mask).logits
        want = converted(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert fast.encoder.builds == 2 * tiny_dims.layers  # both calls rebuilt every layer


def test_masks_stay_reversible(tiny_bert, tiny_dims):
    model = sparsebert.patch(tiny_bert())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
    fast = accelerate(model)
    heads, mlps, neurons = _masks(tiny_dims, "layer_heads_off")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    masked = fast(input_ids=ids, attention_mask=mask).logits
    assert (masked - dense).abs().max() > 1e-4
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    ones = torch.ones_like
    sparsebert.set_masks(model, head_mask=ones(heads), mlp_mask=ones(mlps),
                         neuron_mask=ones(neurons))
    torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits, dense,
                               rtol=0, atol=1e-5)


def test_state_dict_and_to_reach_the_shared_model(tiny_bert):
    model = sparsebert.patch(tiny_bert())
    fast = accelerate(model)
    names = set(fast.state_dict())
    assert names == {f"model.{name}" for name in model.state_dict()}
    fast.to(torch.float64)
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.float64


def test_whole_accelerated_model_saves_and_loads(tiny_bert, tiny_dims, tmp_path):
    """torch.save of a used AcceleratedModel (compact weights built, buffers in use) and
    torch.load give a working model: the same logits, its encoder still sharing the loaded
    model's modules, so new masks on the loaded model reach it."""
    model = sparsebert.patch(tiny_bert())
    heads, mlps, neurons = _masks(tiny_dims, "some")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    fast = accelerate(model)
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    expected = fast(input_ids=ids, attention_mask=mask).logits
    torch.save(fast, tmp_path / "fast.pt")
    loaded = torch.load(tmp_path / "fast.pt", weights_only=False)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    sparsebert.set_masks(loaded.model, head_mask=torch.ones_like(heads),
                         mlp_mask=torch.ones_like(mlps), neuron_mask=torch.ones_like(neurons))
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                               loaded.model(input_ids=ids, attention_mask=mask).logits)
    assert not torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_bad_use_is_refused(tiny_bert, tiny_dims):
    model = sparsebert.patch(tiny_bert())
    fast = accelerate(model)
    ids, mask = _batch(2, 5, tiny_dims.vocab, [5, 3])
    with pytest.raises(FastPathError, match="output_hidden_states"):
        fast(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    model.config.output_attentions = True  # the config asks for them when the call does not
    with pytest.raises(FastPathError, match="config.output_attentions"):
        fast(input_ids=ids, attention_mask=mask)
    fast(input_ids=ids, attention_mask=mask, output_attentions=False)  # the call wins
    model.config.output_attentions = False
    with pytest.raises(FastPathError, match="inference"):
        fast.train()
    model.train()
    with pytest.raises(FastPathError, match="training mode"):
        fast(input_ids=ids, attention_mask=mask)
    model.eval()
    with pytest.raises(FastPathError, match=r"\(B, S\) = \(2, 0\); expected B >= 1 and S >= 1"):
        fast(input_ids=ids[:, :0], attention_mask=mask[:, :0])
    with pytest.raises(FastPathError, match="head_mask argument is not applied"):
        fast(input_ids=ids, attention_mask=mask,
             head_mask=torch.zeros(tiny_dims.layers, tiny_dims.heads))
    attn = model.bert.encoder.layer[0].attention
    with attn.override_head_gate(torch.ones(2, tiny_dims.heads)):
        with pytest.raises(FastPathError, match="layer 0 has a gate override"):
            fast(input_ids=ids, attention_mask=mask)


# ---- unpadding and graph buckets ----------------------------------------------------------
def test_packing_round_trip_and_grid():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    x = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    packing = Packing.from_mask(mask, bucket=4)
    assert packing.tokens == 6 and packing.padded_tokens == 8 and packing.max_len == 3
    assert packing.cu_seqlens.tolist() == [0, 3, 4, 6]
    packed = packing.pack(x)
    torch.testing.assert_close(packed[:6], x[mask])
    assert packed[6:].abs().sum() == 0  # dummy slots read zeros
    back = packing.unpack(packed)
    torch.testing.assert_close(back[mask], x[mask])
    assert back[~mask].abs().sum() == 0
    # (B, L) grid, L = max_len 3 rounded up to 16; dummies at B*L / (0, 0)
    assert packing.grid_len == 16
    index, rows, rank, keys = packing.grid()
    assert index.tolist() == [0, 1, 2, 16, 32, 33, 48, 48]
    assert rows.tolist() == [0, 0, 0, 1, 2, 2, 0, 0] and rank.tolist() == [0, 1, 2, 0, 0, 1, 0, 0]
    pad = [False] * 13
    assert keys.tolist() == [[True] * 3 + pad, [True, False, False] + pad,
                             [True, True, False] + pad]
    assert packing.grid_buffer(5, x).shape == (3 * 16 + 1, 5)  # + the dummy slots' spare row
    assert [Packing.from_mask(torch.arange(40)[None] < n).grid_len for n in (1, 16, 17, 32, 33)] \
        == [16, 16, 32, 32, 48]
    full = Packing.from_mask(torch.ones(2, 3, dtype=torch.bool))
    assert full.every_position and full.pack(x[:2, :3]).shape == (6, 2)


@pytest.mark.parametrize("lengths", [[9, 6, 2], [9, 9, 9], [3, 4, 5]])
def test_graph_buckets_without_capture(tiny_bert, tiny_dims, lengths):
    """The graph path's static buffers and token buckets, run eagerly (no CUDA needed)."""
    model = sparsebert.patch(tiny_bert())
    heads, mlps, neurons = _masks(tiny_dims, "some")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    fast = accelerate(model)
    encoder = fast.encoder
    encoder.refresh()
    cache = GraphCache(encoder, capture=False)
    for seed, lens in enumerate([lengths, [min(n + 1, 9) for n in lengths]]):
        ids, mask = _batch(3, 9, tiny_dims.vocab, lens, seed=seed)
        with torch.no_grad():
            embeddings = model.bert.embeddings(input_ids=ids)
            expected = _hidden(model, ids, mask)
            packing = Packing.from_mask(mask.bool(), bucket=8)
            got = cache.run(embeddings, packing)
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    assert len(cache.graphs) <= 2


def test_graph_buckets_follow_the_autocast_state():
    """A graph computes in the autocast dtype it was captured under: the same shapes under
    another autocast state (or none) are another bucket."""
    hidden = torch.zeros(2, 5, 8)
    packing = Packing.from_mask(torch.ones(2, 5, dtype=torch.bool))
    plain = GraphCache.key(hidden, packing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = GraphCache.key(hidden, packing)
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = GraphCache.key(hidden, packing)
    assert len({plain, bf16, fp16}) == 3 and plain == GraphCache.key(hidden, packing)


def test_left_padding_runs_padded(shared_bert, tiny_dims):
    """A left-padded batch: position 0 (the pooler's) is padding in some rows, so the batch runs
    padded and every output equals the masked model's, logits and padded positions included."""
    heads, mlps, neurons = _masks(tiny_dims, "some")
    sparsebert.set_masks(shared_bert, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    ids, mask = ids.flip(1), mask.flip(1)
    fast = accelerate(shared_bert)
    with torch.no_grad():
        expected = shared_bert(input_ids=ids, attention_mask=mask)
        got = fast(input_ids=ids, attention_mask=mask)
        hidden = fast.encoder.packing_for(mask, 3, 9, torch.device("cpu"))
    assert hidden.every_position and hidden.key_mask is not None
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)


def test_run_packed_called_directly(shared_bert, tiny_dims):
    """FastEncoder.run_packed called on its own, with gradients on and before any forward:
    it brings the compact weights up to date and runs without gradients, as the forward does."""
    heads, mlps, neurons = _masks(tiny_dims, "some")
    sparsebert.set_masks(shared_bert, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    fast = accelerate(shared_bert)
    hidden = shared_bert.bert.embeddings(input_ids=ids).detach().requires_grad_(True)
    packing = fast.encoder.packing_for(mask, 3, 9, torch.device("cpu"))
    out = fast.encoder.run_packed(hidden, packing)  # (3, 9, hidden)
    assert not out.requires_grad
    want = fast.encoder(hidden, mask).last_hidden_state
    torch.testing.assert_close(out[mask], want[mask], rtol=0, atol=0)


def test_wrapper_exposes_the_models_attributes(shared_bert, tmp_path):
    fast = accelerate(shared_bert)
    assert fast.device == shared_bert.device and fast.dtype == shared_bert.dtype
    assert fast.num_labels == shared_bert.num_labels and fast.config is shared_bert.config
    assert fast.save_pretrained.__self__ is shared_bert
    with pytest.raises(AttributeError):
        fast.no_such_attribute  # noqa: B018


def test_default_model(default_model_dir):
    """The real model: a layer without heads, MLPs off, half the heads and neurons masked; then
    every MLP off; unpadded and padded execution."""
    from sparsebert.hf.loading import load_model  # noqa: PLC0415

    model, _ = load_model(default_model_dir, num_labels=3, seed=0)
    sparsebert.patch(model.eval())
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    head_mask = (torch.rand(layers, heads, generator=gen) > 0.5).float()
    head_mask[0] = 0
    mlp_mask = torch.ones(layers)
    mlp_mask[[1, layers - 1]] = 0
    neuron_mask = (torch.rand(layers, config.intermediate_size, generator=gen) > 0.5).float()
    sparsebert.set_masks(model, head_mask=head_mask, mlp_mask=mlp_mask, neuron_mask=neuron_mask)
    variants = [accelerate(model), accelerate(model, unpad=False)]
    for all_mlps_off in (False, True):
        if all_mlps_off:
            sparsebert.set_masks(model, head_mask=head_mask, mlp_mask=torch.zeros(layers))
        for batch, seq, lengths in [(3, 13, [13, 7, 1]), (1, 1, None), (2, 11, None)]:
            ids, mask = _batch(batch, seq, 1000, lengths)
            ids[:, 0] = 101
            with torch.no_grad():
                expected = model(input_ids=ids, attention_mask=mask).logits
            for fast in variants:
                torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits,
                                           expected, rtol=0, atol=1e-5)


# ---- CUDA graphs (skipped without a GPU) ---------------------------------------------------
def _fp64_on_cpu(model, ids, mask):
    """The model's float64 logits (on the CPU: the CUDA attention kernels take no float64),
    back on the inputs' device."""
    cpu = copy.deepcopy(model).double().cpu()
    logits = cpu(input_ids=ids.cpu(), attention_mask=None if mask is None else mask.cpu()).logits
    return logits.to(ids.device)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_graphs_equal_masked_model(tiny_bert, tiny_dims, dtype):
    model = sparsebert.patch(tiny_bert()).to("cuda")
    heads, mlps, neurons = _masks(tiny_dims, "some")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    fast = accelerate(model.to(dtype), bucket=8)
    for seed, lengths in enumerate([[9, 6, 2], [9, 5, 3], None, [9, 9, 1]]):
        ids, mask = _batch(3, 9, tiny_dims.vocab, lengths, seed=seed)
        ids = ids.cuda()
        mask = None if mask is None else mask.cuda()
        with torch.no_grad():
            reference = _fp64_on_cpu(model, ids, mask)
            plain = model.to(dtype)(input_ids=ids, attention_mask=mask).logits.double()
        got = fast(input_ids=ids, attention_mask=mask).logits.double()
        tolerance = 1e-5 if dtype == torch.float32 else 2 * (plain - reference).abs().max() + 1e-6
        assert (got - reference).abs().max() <= tolerance
    assert fast.encoder._graph_cache is not None and fast.encoder._graph_cache.graphs
    # New masks: the graphs are dropped and captured again with the new compact weights.
    sparsebert.set_masks(model, head_mask=torch.ones_like(heads))
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.float()
    got = fast(input_ids=ids, attention_mask=mask).logits.float()
    atol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_cuda_unpadded_fp16_within_twice_pytorch(tiny_bert, tiny_dims, graphs):
    """Unpadded execution on the GPU (varlen attention where torch has it), eager and graphed:
    fp16 error vs fp64 at most 2x the masked model's own fp16 error."""
    model = sparsebert.patch(tiny_bert()).to("cuda")
    heads, mlps, neurons = _masks(tiny_dims, "layer_heads_off")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    ids, mask = _batch(4, 16, tiny_dims.vocab, [16, 9, 1, 12])
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        reference = _fp64_on_cpu(model, ids, mask)
        plain = model.half()(input_ids=ids, attention_mask=mask).logits.double()
    fast = accelerate(model, graphs=graphs, bucket=16)
    for _ in range(2):  # capture, then replay
        got = fast(input_ids=ids, attention_mask=mask).logits.double()
        assert (got - reference).abs().max() <= 2 * (plain - reference).abs().max() + 1e-6


# Timing statistics, warm-up and derived columns; the fast path with real biases
# --------------------------------------------------------------------------------------------
def test_summary_is_median_and_percentiles():
    from sparsebert.speed.timing import summary  # noqa: PLC0415

    ms = [1.0, 2.0, 3.0, 4.0, 100.0]
    q = statistics.quantiles(ms, n=5, method="inclusive")  # 20/40/60/80th, linear
    got = summary(ms)
    assert got["median_ms"] == statistics.median(ms) == 3.0  # not the mean (22)
    assert got["p20_ms"] == pytest.approx(q[0]) and got["p80_ms"] == pytest.approx(q[3])


def test_paired_ratio_percentiles_are_in_order():
    from sparsebert.speed.timing import paired_ratio  # noqa: PLC0415

    reference, variant = [10.0, 20.0, 30.0, 40.0, 50.0], [5.0] * 5
    ratios = [r / v for r, v in zip(reference, variant)]
    q = statistics.quantiles(ratios, n=5, method="inclusive")
    got = paired_ratio(reference, variant)
    assert got["median"] == statistics.median(ratios)
    assert got["p20"] == pytest.approx(q[0]) and got["p80"] == pytest.approx(q[3])
    assert got["p20"] < got["median"] < got["p80"]


def test_warmup_calls_run_first_and_are_not_timed():
    from sparsebert.speed.timing import time_interleaved  # noqa: PLC0415

    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
            if calls[name] <= 2:  # the first (cold) calls are slow
                time.sleep(0.05)
        return fn

    samples = time_interleaved({"a": make("a"), "b": make("b")}, repeats=3, warmup=2,
                               device=torch.device("cpu"), progress=False)
    assert calls == {"a": 5, "b": 5}
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    assert max(max(v) for v in samples.values()) < 25.0  # ms: no warm-up call timed


def test_speed_rows_derive_from_their_samples(tiny_model_dir, tmp_path):
    import json  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from sparsebert.cli import main  # noqa: PLC0415

    out = tmp_path / "speed.json"
    batch = 3
    assert main(["speed", "--model", tiny_model_dir, "--batch", str(batch), "--seq", "12",
                 "--repeats", "4", "--warmup", "0", "--threads", "1", "--quiet",
                 "--json", str(out)]) == 0
    for row in json.loads(out.read_text())["rows"]:
        samples = row["samples_ms"]
        assert len(samples) == 4
        assert row["median_ms"] == pytest.approx(float(np.median(samples)), rel=1e-3)
        assert row["examples_per_s"] == pytest.approx(batch / (row["median_ms"] / 1e3),
                                                      rel=1e-6)


def _randomize(model, seed=0):
    """Non-zero biases and non-identity LayerNorms (HF's init leaves them 0 and 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def test_fast_path_with_soft_gates_and_real_biases(tiny_bert, tiny_dims):
    model = sparsebert.patch(_randomize(tiny_bert()))
    heads = torch.ones(tiny_dims.layers, tiny_dims.heads)
    heads[0, 0] = 0.5
    mlps = torch.ones(tiny_dims.layers)
    mlps[1] = 0.5
    neurons = torch.ones(tiny_dims.layers, tiny_dims.intermediate)
    neurons[0, ::2] = 0  # compact FFN rows: the kept neurons' biases must follow them
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    ids = torch.randint(0, tiny_dims.vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for unpad in (True, False):
        got = accelerate(model, unpad=unpad)(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("missing", [("query",), ("key",), ("value", "key")])
def test_projections_with_some_biases_missing(tiny_bert, tiny_dims, missing):
    """q, k and v are stacked into one projection: a missing bias adds zeros to its part, as
    in the model (it used to drop the others' biases, or fail)."""
    model = sparsebert.patch(_randomize(tiny_bert()))
    heads = torch.ones(tiny_dims.layers, tiny_dims.heads)
    heads[0, 1] = 0
    sparsebert.set_masks(model, head_mask=heads)
    for name in missing:
        setattr(model.bert.encoder.layer[0].attention.self, name, _without_bias(
            getattr(model.bert.encoder.layer[0].attention.self, name)))
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    got = accelerate(model)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _without_bias(linear: torch.nn.Linear) -> torch.nn.Linear:
    plain = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
    plain.weight = linear.weight
    return plain


def test_hooked_or_wrapped_projections_are_refused(tiny_bert, tiny_dims):
    """The fast path reads weights and never calls the projections: a forward hook, a Linear
    subclass (an adapter) or a torch pruning reparametrization, which the model honours, is
    refused, naming the layer and projection, instead of silently bypassed."""
    from torch.nn.utils import prune as torch_prune  # noqa: PLC0415

    model = sparsebert.patch(tiny_bert())
    fast = accelerate(model)
    ids, mask = _batch(2, 5, tiny_dims.vocab, [5, 3])
    fast(input_ids=ids, attention_mask=mask)  # fine, and cached
    layer = model.bert.encoder.layer[1]
    handle = layer.attention.self.value.register_forward_hook(lambda mod, args, out: 2 * out)
    with pytest.raises(FastPathError, match=r"layer 1: its value projection \(torch.nn.modules"
                                            r".linear.Linear\) is not a plain nn.Linear without "
                                            r"hooks"):
        fast(input_ids=ids, attention_mask=mask)
    handle.remove()
    fast(input_ids=ids, attention_mask=mask)

    class Adapter(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    up = layer.intermediate.dense
    adapter = Adapter(up.in_features, up.out_features)
    adapter.load_state_dict(up.state_dict())
    layer.intermediate.dense = adapter
    with pytest.raises(FastPathError,
                       match=r"layer 1: its intermediate projection \(tests.test_speed\..*Adapter\)"):
        fast(input_ids=ids, attention_mask=mask)
    layer.intermediate.dense = up
    torch_prune.l1_unstructured(model.bert.encoder.layer[0].output.dense, "weight", amount=0.5)
    with pytest.raises(FastPathError, match=r"layer 0: its FFN output projection"):
        fast(input_ids=ids, attention_mask=mask)


def test_an_input_asking_for_gradients_is_refused(shared_bert, tiny_dims):
    ids, mask = _batch(2, 5, tiny_dims.vocab, [5, 3])
    fast = accelerate(shared_bert)
    embeds = shared_bert.bert.embeddings.word_embeddings(ids).detach().requires_grad_()
    with pytest.raises(FastPathError, match="an input requires grad, but the fast path computes "
                                            "no gradients; call the model itself"):
        fast(inputs_embeds=embeds, attention_mask=mask)
    with torch.no_grad():  # nothing asks for them here
        fast(inputs_embeds=embeds, attention_mask=mask)


def test_question_answering_span_loss_runs_padded(tiny_model, tiny_dims):
    """A span loss is a softmax over every position, padding included: such a call runs
    padded, so the loss equals the model's (the unpadded logits at padding differ)."""
    model = sparsebert.patch(tiny_model("bert", "BertForQuestionAnswering")).eval()
    heads = torch.ones(tiny_dims.layers, tiny_dims.heads)
    heads[0, 1] = 0
    sparsebert.set_masks(model, head_mask=heads)
    ids, mask = _batch(3, 8, tiny_dims.vocab, [8, 5, 2])
    spans = {"start_positions": torch.tensor([1, 2, 0]), "end_positions": torch.tensor([3, 4, 1])}
    fast = accelerate(model)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, **spans)
    got = fast(input_ids=ids, attention_mask=mask, **spans)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.start_logits, want.start_logits, rtol=0, atol=1e-5)
    assert fast.encoder.unpad  # the setting is back for the next call


def test_new_storage_at_the_old_address_rebuilds_the_compact_weights(tiny_bert, tiny_dims):
    """A `.to()` round trip can give a parameter new storage at its old address (same object,
    version and data_ptr): the compact weights are rebuilt (the storage object differs)."""
    model = sparsebert.patch(tiny_bert())
    heads = torch.ones(tiny_dims.layers, tiny_dims.heads)
    heads[0, 1] = 0
    sparsebert.set_masks(model, head_mask=heads)
    fast = accelerate(model)
    ids, mask = _batch(2, 5, tiny_dims.vocab, [5, 3])
    fast(input_ids=ids, attention_mask=mask)
    builds = fast.encoder.builds
    value = model.bert.encoder.layer[0].attention.self.value
    with torch.no_grad():
        shared = value.weight.detach().numpy()
        shared *= -1.0  # written outside torch's counters
        value.weight.data = torch.from_numpy(shared)  # a new storage at the same address
        want = model(input_ids=ids, attention_mask=mask).logits
    got = fast(input_ids=ids, attention_mask=mask).logits
    assert fast.encoder.builds == builds + 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_span_loss_call_in_one_thread_leaves_other_threads_unpadded(tiny_model, tiny_dims):
    """unpadding() used to switch the shared encoder's `unpad` off and back around a span-loss
    call: a plain call in another thread meanwhile ran padded, and one ending in between left
    unpadding off for good. The padded-call setting is now per thread."""
    import threading  # noqa: PLC0415

    model = sparsebert.patch(tiny_model("bert", "BertForQuestionAnswering")).eval()
    fast = accelerate(model)
    ids, mask = _batch(3, 8, tiny_dims.vocab, [8, 5, 2])
    spans = {"start_positions": torch.tensor([1, 2, 0]), "end_positions": torch.tensor([3, 4, 1])}
    with torch.no_grad():
        want_loss = model(input_ids=ids, attention_mask=mask, **spans).loss
    unpadded = fast(input_ids=ids, attention_mask=mask).start_logits
    assert not unpadded[2, 2:].any()  # padded positions of an unpadded call are zeros
    inside, release, seen = threading.Event(), threading.Event(), {}

    def hold(module, args):  # the QA call waits inside its forward for the other thread
        if threading.current_thread().name == "qa":
            inside.set()
            assert release.wait(30)

    hook = model.bert.embeddings.register_forward_pre_hook(hold)
    try:
        qa = threading.Thread(name="qa", target=lambda: seen.update(
            loss=fast(input_ids=ids, attention_mask=mask, **spans).loss))
        qa.start()
        assert inside.wait(30)
        seen["plain"] = fast(input_ids=ids, attention_mask=mask).start_logits  # meanwhile
        release.set()
        qa.join(30)
    finally:
        hook.remove()
    torch.testing.assert_close(seen["plain"], unpadded, rtol=0, atol=0)
    torch.testing.assert_close(seen["loss"], want_loss, rtol=0, atol=1e-5)
    assert fast.encoder.unpad
    assert not fast(input_ids=ids, attention_mask=mask).start_logits[2, 2:].any()


@pytest.mark.parametrize("compile", [False, True])
def test_a_hook_on_the_ffn_activation_is_honoured(shared_bert, tiny_dims, compile):
    """The fast path ran GELU in place (aten.gelu_) and skipped the activation module's hooks;
    it now calls the module whenever it has a hook, added after the first call included
    (compiled: the layer is rebuilt, so the compiled loop's guards see the change)."""
    fast = accelerate(shared_bert, compile=compile)
    ids, mask = _batch(2, 5, tiny_dims.vocab, [5, 3])
    fast(input_ids=ids, attention_mask=mask)  # compact weights built before the hook
    act = shared_bert.bert.encoder.layer[0].intermediate.intermediate_act_fn
    hook = act.register_forward_hook(lambda module, args, out: out * 0)
    try:
        with torch.no_grad():
            want = shared_bert(input_ids=ids, attention_mask=mask).logits
        got = fast(input_ids=ids, attention_mask=mask).logits
    finally:
        hook.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        unhooked = shared_bert(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(unhooked, want)
    torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits, unhooked,
                               rtol=0, atol=1e-5)  # the hook removed: in place again


@pytest.mark.parametrize("option, value", [("unpad", "False"), ("compile", "no"),
                                           ("reuse_buffers", None), ("graphs", "x")])
def test_on_off_options_must_be_bools(shared_bert, option, value):
    with pytest.raises(ValueError, match=rf"accelerate: '{option}' must be True or False.*got "
                                         rf"{value!r}"):
        accelerate(shared_bert, **{option: value})
    accelerate(shared_bert, graphs=None)  # the default: on where CUDA graphs run
