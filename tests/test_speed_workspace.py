"""The fast path's reused CPU buffers (sparsebert.speed.workspace): bit-identical results to
fresh allocations, results a caller holds never overwritten, one set of buffers per thread,
release, and in-place activations equal to the out-of-place ones."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN, GELUActivation

import sparsebert
from sparsebert.speed import accelerate
from sparsebert.speed.workspace import Workspace, inplace_activation, linear

from .test_speed import SHAPES, _batch, _masks


@pytest.fixture(scope="module")
def masked_bert(tiny_bert, tiny_dims):
    """A patched tiny BERT whose layers keep different numbers of heads and neurons, so that
    buffer widths change from layer to layer."""
    model = sparsebert.patch(tiny_bert())
    heads, mlps, neurons = _masks(tiny_dims, "some")
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    return model.eval()


def _hidden(fast, ids, mask):
    return fast._runner.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("pattern", ["some", "layer_heads_off", "soft"])
def test_reused_buffers_give_the_same_bits(tiny_bert, tiny_dims, pattern):
    """Every shape of the fast-path tests, in an order that grows and shrinks the buffers, with
    and without unpadding: the same bits as allocating every intermediate afresh."""
    model = sparsebert.patch(tiny_bert())
    heads, mlps, neurons = _masks(tiny_dims, pattern)
    sparsebert.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    for unpad in (True, False):
        fresh = accelerate(model, unpad=unpad, reuse_buffers=False)
        reused = accelerate(model, unpad=unpad)
        assert fresh.encoder.workspace is None
        shapes = list(SHAPES.items())
        for shape, (batch, seq, lengths) in shapes + shapes[::-1]:
            ids, mask = _batch(batch, seq, tiny_dims.vocab, lengths)
            expected = fresh(input_ids=ids, attention_mask=mask).logits
            got = reused(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(got, expected), f"{shape} unpad={unpad}"
        if pattern != "all_off":
            assert reused.encoder.workspace.nbytes() > 0


def test_results_held_by_the_caller_survive_later_calls(masked_bert, tiny_dims):
    fast = accelerate(masked_bert)
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    first = _hidden(fast, ids, mask)
    kept = first.clone()
    for batch, seq, lengths in SHAPES.values():  # smaller, larger, the same shape again
        _hidden(fast, *_batch(batch, seq, tiny_dims.vocab, lengths, seed=11))
    _hidden(fast, *_batch(3, 9, tiny_dims.vocab, [4, 9, 9], seed=12))
    assert torch.equal(first, kept)


def test_each_thread_gets_its_own_buffers(masked_bert, tiny_dims):
    """Two threads calling one accelerated model at once, with different batches, get what each
    batch gives alone."""
    fast = accelerate(masked_bert)
    batches = [_batch(3, 9, tiny_dims.vocab, [9, 6, 2], seed=1),
               _batch(2, 12, tiny_dims.vocab, [12, 7], seed=2)]
    expected = [fast(input_ids=ids, attention_mask=mask).logits for ids, mask in batches]
    start = threading.Barrier(len(batches))
    failures: list[str] = []
    sizes: list[int] = [0] * len(batches)

    def run(i: int) -> None:
        ids, mask = batches[i]
        start.wait()
        for _ in range(30):
            got = fast(input_ids=ids, attention_mask=mask).logits
            if not torch.equal(got, expected[i]):
                failures.append(f"thread {i}: {(got - expected[i]).abs().max():.3g}")
                return
        sizes[i] = fast.encoder.workspace.nbytes()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert all(sizes), "each thread allocated its own buffers"


def test_release_frees_the_buffers(masked_bert, tiny_dims):
    fast = accelerate(masked_bert)
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    expected = fast(input_ids=ids, attention_mask=mask).logits
    assert fast.encoder.workspace.nbytes() > 0
    fast.release_buffers()
    assert fast.encoder.workspace.nbytes() == 0
    assert torch.equal(fast(input_ids=ids, attention_mask=mask).logits, expected)


def test_compiled_loop_takes_no_workspace(masked_bert):
    assert accelerate(masked_bert, compile=True).encoder.workspace is None


def test_workspace_views_and_linear():
    """Views are contiguous, sized, typed like `like`; a buffer grows, a smaller request reuses
    it; linear() into the workspace is F.linear, bit for bit, with and without a bias."""
    ws = Workspace()
    x = torch.randn(5, 7)
    a = ws.view("r", 5, 3, x)
    assert a.shape == (5, 3) and a.is_contiguous() and a.dtype == x.dtype
    b = ws.view("r", 2, 4, x)
    assert b.data_ptr() == a.data_ptr()
    c = ws.view("r", 6, 6, x)
    assert c.numel() == 36 and ws.nbytes() == 36 * 4
    d = ws.view("r", 2, 2, x.double())
    assert d.dtype == torch.float64
    weight, bias = torch.randn(9, 7), torch.randn(9)
    for b_ in (bias, None):
        out = linear(x, weight, b_, ws, "lin")
        assert torch.equal(out, torch.nn.functional.linear(x, weight, b_))


@pytest.mark.parametrize("activation", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(),
                                        ACT2FN["gelu"], ACT2FN["relu"]],
                         ids=["gelu", "gelu-tanh", "relu", "hf-gelu", "hf-relu"])
def test_inplace_activation_equals_the_module(activation):
    x = torch.randn(64, 33) * 3
    inplace = inplace_activation(activation)
    assert inplace is not None
    expected = activation(x)
    y = x.clone()
    out = inplace(y)
    assert torch.equal(out, expected) and torch.equal(y, expected)


@pytest.mark.parametrize("activation", [ACT2FN["gelu_new"], GELUActivation(use_gelu_python=True),
                                        nn.SiLU(), torch.tanh],
                         ids=["gelu-new", "gelu-python", "silu", "function"])
def test_other_activations_run_out_of_place(activation):
    assert inplace_activation(activation) is None


def test_autocast_runs_without_the_workspace(masked_bert, tiny_dims):
    """Under CPU autocast the projections run in bf16 (out= variants would not): the result is
    the fresh-allocation path's, bit for bit, and within bf16 error of the masked model's."""
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    fresh = accelerate(masked_bert, reuse_buffers=False)
    reused = accelerate(masked_bert)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = fresh(input_ids=ids, attention_mask=mask).logits
        got = reused(input_ids=ids, attention_mask=mask).logits
        with torch.no_grad():
            masked = masked_bert(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert reused.encoder.workspace.nbytes() == 0
    torch.testing.assert_close(got.float(), masked.float(), rtol=0, atol=0.05)


def test_inference_mode_then_no_grad(masked_bert, tiny_dims):
    """Buffers made under torch.inference_mode() are not writable outside it: a later plain
    call replaces them instead of failing."""
    fast = accelerate(masked_bert)
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    with torch.inference_mode():
        inside = fast(input_ids=ids, attention_mask=mask).logits
    outside = fast(input_ids=ids, attention_mask=mask).logits
    with torch.inference_mode():
        again = fast(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(inside, outside) and torch.equal(outside, again)


def test_accelerated_model_deep_copies(masked_bert, tiny_dims):
    """copy.deepcopy of an accelerated model works with buffers in use; the copy starts with
    none of its own and gives the same logits."""
    fast = accelerate(masked_bert)
    ids, mask = _batch(3, 9, tiny_dims.vocab, [9, 6, 2])
    expected = fast(input_ids=ids, attention_mask=mask).logits
    twin = copy.deepcopy(fast)
    assert twin.encoder.workspace.nbytes() == 0
    assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, expected)
