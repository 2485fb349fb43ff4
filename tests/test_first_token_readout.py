"""first_token_readout: the last layer of a patched sequence classifier at [CLS] only gives the
full computation's logits, losses, gradients and importance scores, draws the same random
numbers in training, and stays off wherever the head may read other positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification, BertForTokenClassification

import sparsebert
from sparsebert import ops
from sparsebert.glue import batching
from sparsebert.hf import first_token_readout, reads_first_token_only, set_masks, sparse_blocks
from sparsebert.hf.readout import FULL_LAST_LAYER_ENV
from sparsebert.nn import SparseMLP
from sparsebert.reference import masked_attention_ref
from sparsebert.train.evaluate import predict
from tests.attention_kit import make_padding

BATCH, SEQ = 3, 11


def make_inputs(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded batch: rows of 11, 7 and 4 real tokens, 3 labels."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([SEQ, 7, 4])
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()  # (B, S)
    ids = torch.randint(1, vocab, (BATCH, SEQ), generator=gen) * mask
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.randint(0, 3, (BATCH,), generator=gen)}


def last_layer_rows(model) -> tuple[dict[str, list[int]], list]:
    """Hooks that record the row count of the last layer's attention and MLP outputs per call:
    (what they saw, their handles)."""
    attention, mlp = sparse_blocks(model)[-1]
    seen: dict[str, list[int]] = {"attention": [], "mlp": []}
    handles = [attention.register_forward_hook(
                   lambda m, a, out: seen["attention"].append(out[0].shape[1])),
               mlp.register_forward_hook(lambda m, a, out: seen["mlp"].append(out.shape[1]))]
    return seen, handles


def logits_both_ways(model, inputs):
    """(full logits, readout logits, readout rows seen by the last layer), eval, no grad."""
    seen, handles = last_layer_rows(model)
    try:
        with torch.no_grad():
            full = model(**inputs).logits
            with first_token_readout(model) as active:
                short = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    assert active
    return full, short, seen


@pytest.mark.parametrize("masks", ["none", "some_heads", "last_layer_no_heads", "last_mlp_off",
                                   "neurons"])
def test_eval_logits_equal_the_full_computation(tiny_bert, masks):
    model = sparsebert.patch(tiny_bert(num_labels=3)).eval()
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    head_mask, mlp_mask = torch.ones(layers, heads), torch.ones(layers)
    if masks == "some_heads":
        head_mask[:, ::2] = 0
    elif masks == "last_layer_no_heads":
        head_mask[-1] = 0
    elif masks == "last_mlp_off":
        mlp_mask[-1] = 0
    set_masks(model, head_mask=head_mask, mlp_mask=mlp_mask)
    if masks == "neurons":
        sparse_blocks(model)[-1][1].neuron_gate[::3] = 0
    full, short, seen = logits_both_ways(model, make_inputs(model.config.vocab_size))
    assert full.shape == (BATCH, 3)
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-5)
    assert seen == {"attention": [SEQ, 1], "mlp": [SEQ, 1]}  # full pass, then the readout


def test_a_mask_that_is_not_a_padding_mask_is_sliced_to_the_query_rows(tiny_bert):
    """A 4-d mask that differs per query row (SDPA path): the readout row keeps its own row."""
    model = sparsebert.patch(tiny_bert(num_labels=3)).eval()
    attention = sparse_blocks(model)[-1][0]
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(BATCH, SEQ, model.config.hidden_size, generator=gen)
    allowed = torch.rand(BATCH, 1, SEQ, SEQ, generator=gen) > 0.3
    allowed[..., 0] = True  # every row attends somewhere
    with torch.no_grad():
        full, _ = attention(hidden, allowed)
        attention.output_rows = 2
        try:
            short, _ = attention(hidden, allowed)
        finally:
            attention.output_rows = None
    assert short.shape == (BATCH, 2, model.config.hidden_size)
    torch.testing.assert_close(short, full[:, :2], atol=1e-6, rtol=1e-5)


def test_training_draws_the_same_random_numbers_and_gradients(tiny_bert):
    """Dropout on: with the same seed the loss, every gradient and the generator state after
    the step equal those of the full computation; the last MLP runs on one row."""
    model = sparsebert.patch(tiny_bert(num_labels=3, hidden_dropout_prob=0.3,
                                       attention_probs_dropout_prob=0.3)).train()
    inputs = make_inputs(model.config.vocab_size)

    def step(readout: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        if readout:
            with first_token_readout(model) as active:
                assert active
                loss = model(**inputs).loss
        else:
            loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}, torch.get_rng_state()

    seen, handles = last_layer_rows(model)
    loss_full, grads_full, rng_full = step(False)
    loss_short, grads_short, rng_short = step(True)
    for handle in handles:
        handle.remove()
    assert seen == {"attention": [SEQ, SEQ], "mlp": [SEQ, 1]}
    assert torch.equal(rng_short, rng_full)
    torch.testing.assert_close(loss_short, loss_full, atol=1e-6, rtol=1e-6)
    assert grads_short.keys() == grads_full.keys()
    for name, grad in grads_full.items():
        # key biases have no gradient (softmax ignores a shift): rounding noise on both sides
        atol = 1e-6 if "key.bias" in name else 1e-6 + 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(grads_short[name], grad, atol=atol, rtol=1e-4, msg=name)


def test_the_mlp_dropout_masks_match_at_the_kept_rows():
    """SparseMLP alone in training: output_rows = 2 returns the first two rows of the full
    output, dropout included, and leaves the generator where the full call does."""
    mlp = SparseMLP(8, 16)
    mlp.output_dropout().p = 0.5
    mlp.train()
    x = torch.randn(4, 9, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    full = mlp(x)
    after_full = torch.get_rng_state()
    mlp.output_rows = 2
    torch.manual_seed(1)
    short = mlp(x)
    assert torch.equal(torch.get_rng_state(), after_full)
    assert short.shape == (4, 2, 8)
    torch.testing.assert_close(short, full[:, :2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["paper", "per_example", "fisher", "michel"])
def test_importance_scores_equal_the_full_computation(tiny_bert, mode, monkeypatch):
    model = sparsebert.patch(tiny_bert(num_labels=3))
    head_mask = torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads)
    head_mask[0, 1] = 0  # a masked head: its true gradient is scored too
    set_masks(model, head_mask=head_mask)
    batches = [make_inputs(model.config.vocab_size, seed) for seed in range(2)]

    def scores():
        return sparsebert.importance(model, batches, mode=mode, neurons=mode != "michel",
                                     progress=False, normalize=False, score_masked_heads=True)

    monkeypatch.setenv(FULL_LAST_LAYER_ENV, "1")
    full = scores()
    monkeypatch.delenv(FULL_LAST_LAYER_ENV)
    short = scores()
    for name in ("head", "mlp", "neuron"):
        want, got = getattr(full, name), getattr(short, name)
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4, msg=name)


def test_importance_of_a_model_with_chunked_feed_forward_layers(tiny_bert):
    """config.chunk_size_feed_forward > 1 (rows cut into chunks of that many, which one row is
    not): the importance pass runs the whole last layer, with the scores of the same model
    unchunked; chunks of 1 row keep the readout."""
    batches = [make_inputs(99, seed) for seed in range(2)]
    assert reads_first_token_only(sparsebert.patch(tiny_bert(chunk_size_feed_forward=1)))
    scores = []
    for chunk in (0, SEQ):
        model = sparsebert.patch(tiny_bert(num_labels=3, chunk_size_feed_forward=chunk))
        scores.append(sparsebert.importance(model, batches, progress=False, normalize=False))
    torch.testing.assert_close(scores[1].head, scores[0].head, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(scores[1].mlp, scores[0].mlp, atol=1e-7, rtol=1e-5)


def test_only_transformers_sequence_classifiers_that_are_patched_take_it(tiny_bert, tiny_model,
                                                                          monkeypatch):
    plain = tiny_bert(num_labels=3)
    assert not reads_first_token_only(plain)
    with first_token_readout(plain) as active:
        assert not active
    token = sparsebert.patch(tiny_model("bert", "BertForTokenClassification", num_labels=3))
    assert isinstance(token, BertForTokenClassification)
    assert not reads_first_token_only(token)  # its head reads every position

    class MyClassifier(BertForSequenceClassification):  # may read other positions
        pass

    custom = sparsebert.patch(MyClassifier(plain.config))
    assert not reads_first_token_only(custom)
    chunked = sparsebert.patch(tiny_bert(num_labels=3, chunk_size_feed_forward=4))
    assert not reads_first_token_only(chunked)  # its FFN cuts the rows into chunks of 4
    patched = sparsebert.patch(plain)
    assert reads_first_token_only(patched)
    monkeypatch.setenv(FULL_LAST_LAYER_ENV, "1")
    with first_token_readout(patched) as active:
        assert not active
        assert sparse_blocks(patched)[-1][0].output_rows is None


@pytest.mark.parametrize("rows", [0, -1, 1.0, True])
def test_a_bad_output_rows_names_itself(tiny_bert, rows):
    model = sparsebert.patch(tiny_bert(num_labels=3)).eval()
    attention, mlp = sparse_blocks(model)[-1]
    hidden = torch.randn(2, 5, model.config.hidden_size)
    for block, call in ((attention, lambda: attention(hidden)), (mlp, lambda: mlp(hidden))):
        block.output_rows = rows
        with pytest.raises(ValueError, match=f"{type(block).__name__}: output_rows must be"):
            call()
        block.output_rows = None


def test_settings_are_restored_on_exit_on_error_and_when_nested(tiny_bert):
    model = sparsebert.patch(tiny_bert(num_labels=3))
    attention, mlp = sparse_blocks(model)[-1]
    with first_token_readout(model):
        with first_token_readout(model):
            assert (attention.output_rows, mlp.output_rows) == (1, 1)
        assert (attention.output_rows, mlp.output_rows) == (1, 1)
    assert (attention.output_rows, mlp.output_rows) == (None, None)
    with pytest.raises(RuntimeError, match="inside"):
        with first_token_readout(model):
            raise RuntimeError("inside")
    assert (attention.output_rows, mlp.output_rows) == (None, None)
    assert all(a.output_rows is None and m.output_rows is None
               for a, m in sparse_blocks(model)[:-1])  # only the last layer is touched


@pytest.mark.parametrize("regression", [False, True])
def test_predict_gives_the_predictions_of_the_full_computation(tiny_bert, monkeypatch,
                                                               regression):
    model = sparsebert.patch(tiny_bert(num_labels=1 if regression else 3))
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, model.config.vocab_size, (int(n),), generator=gen).tolist()
            for n in torch.randint(3, 20, (12,), generator=gen)]
    encoded = batching.Encoded(input_ids=rows, token_type_ids=None,
                               labels=np.zeros(len(rows), dtype=np.int64),
                               lengths=np.array([len(r) for r in rows]), pad_token_id=0,
                               max_length=32)
    seen, handles = last_layer_rows(model)
    with_readout = predict(model, encoded, regression=regression, batch_size=5)
    monkeypatch.setenv(FULL_LAST_LAYER_ENV, "1")
    without = predict(model, encoded, regression=regression, batch_size=5)
    for handle in handles:
        handle.remove()
    assert seen["mlp"][:3] == [1, 1, 1] and max(seen["mlp"][3:]) > 1  # on, then off
    np.testing.assert_allclose(with_readout, without, atol=1e-6)


@pytest.mark.all_devices
def test_masked_attention_with_one_query_row(device, assert_native):
    """Sq = 1 against Sk keys (the readout's last layer), forward and backward, padded keys,
    a pruned head: the kernels against the reference."""
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(5)
    heads, dim, keys = 4, 32, 37
    q = torch.randn(BATCH, 1, heads, dim, generator=gen).to(device).requires_grad_()
    k = torch.randn(BATCH, keys, heads, dim, generator=gen).to(device).requires_grad_()
    v = torch.randn(BATCH, keys, heads, dim, generator=gen).to(device).requires_grad_()
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0], device=device, requires_grad=True)
    mask = make_padding(BATCH, keys, device, gen)
    out = ops.masked_attention(q, k, v, gate, mask)
    dout = torch.randn(out.shape, generator=gen).to(device)
    got = torch.autograd.grad(out, (q, k, v, gate), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, gate)]
    ref, _ = masked_attention_ref(*leaves, mask, dim**-0.5)
    want = torch.autograd.grad(ref, leaves, dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for name, g, w in zip(("dq", "dk", "dv", "d_head_gate"), got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_importance_and_logits_equal_the_full_computation(tiny_bert, monkeypatch, precision,
                                                              cuda_graph):
    """On a GPU (the masked-attention kernels with one query row; eager and graph-replayed
    importance): scores and evaluation logits as with the full last layer."""
    model = sparsebert.patch(tiny_bert(num_labels=3)).cuda()
    head_mask = torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads)
    head_mask[-1, ::2] = 0
    set_masks(model, head_mask=head_mask)
    batches = [{k: v.cuda() for k, v in make_inputs(model.config.vocab_size, seed).items()}
               for seed in range(2)]

    def run():
        imp = sparsebert.importance(model, batches, mode="paper", precision=precision,
                                    cuda_graph=cuda_graph, progress=False, normalize=False)
        inputs = {k: v for k, v in batches[0].items() if k != "labels"}
        with torch.no_grad(), first_token_readout(model):
            logits = model.eval()(**inputs).logits
        return imp, logits

    monkeypatch.setenv(FULL_LAST_LAYER_ENV, "1")
    full, full_logits = run()
    monkeypatch.delenv(FULL_LAST_LAYER_ENV)
    short, short_logits = run()
    tol = dict(atol=1e-6, rtol=1e-4) if precision == "fp32" else dict(atol=1e-3, rtol=2e-2)
    torch.testing.assert_close(short_logits, full_logits, **tol)
    for name in ("head", "mlp"):
        torch.testing.assert_close(getattr(short, name), getattr(full, name), msg=name, **tol)
