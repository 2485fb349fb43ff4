"""importance(..., cuda_graph=True): the same scores as the eager pass, replayed from one CUDA
graph per batch shape (sparsebert.pruning.importance_graph). The eager pass is itself checked
against a brute-force reference on the unpatched model in test_importance.py."""

from __future__ import annotations

import pytest
import torch

from sparsebert.hf import patch, set_masks
from sparsebert.hf.patching import sparse_blocks
from sparsebert.pruning.importance import importance

CUDA = torch.cuda.is_available()
NUM_LABELS = 3


def cuda_test(fn):
    """Marks a test as CUDA-only (selected by `-m cuda`, skipped without a GPU)."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="no CUDA device")(fn))


def batches_of_three_shapes(tiny_batches):
    """Five batches in three shapes: (4, 9) twice, (4, 6) twice (cut), a last (3, 9)."""
    full = tiny_batches(num_batches=5, batch=4, num_labels=NUM_LABELS)
    cut = [{k: (v[:, :6] if v.dim() == 2 else v) for k, v in b.items()} for b in full[2:4]]
    last = {k: v[:3] for k, v in full[4].items()}
    return full[:2] + cut + [last]


def masked_model(tiny_bert, device, **overrides):
    """A patched tiny BERT on `device` with a masked head in layer 0 and a masked MLP in
    layer 1 (so the true-gradient path of masked heads runs inside the graph)."""
    model = patch(tiny_bert(num_labels=NUM_LABELS, **overrides)).to(device)
    blocks = sparse_blocks(model)
    heads = torch.ones(len(blocks), blocks[0][0].num_heads)
    heads[0, 0] = 0.0
    mlps = torch.ones(len(blocks))
    mlps[1] = 0.0
    set_masks(model, head_mask=heads, mlp_mask=mlps)
    return model


def assert_same_scores(graphed, eager, rtol, atol):
    for name in ("head", "mlp", "neuron"):
        a, b = getattr(graphed, name), getattr(eager, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    assert graphed.examples == eager.examples and graphed.tokens == eager.tokens
    if eager.per_example is not None:
        for name, value in eager.per_example.items():
            torch.testing.assert_close(graphed.per_example[name], value, rtol=rtol, atol=atol)


@cuda_test
@pytest.mark.parametrize("mode", ["paper", "per_example", "fisher"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_replay_scores_as_the_eager_pass(mode, precision, tiny_bert, tiny_batches):
    model = masked_model(tiny_bert, "cuda")
    batches = batches_of_three_shapes(tiny_batches)
    kwargs = dict(mode=mode, precision=precision, neurons=True, progress=False,
                  keep_per_example=mode != "paper")
    eager = importance(model, batches, **kwargs)
    graphed = importance(model, batches, cuda_graph=True, **kwargs)
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=1e-3)
    assert_same_scores(graphed, eager, **tol)


@cuda_test
def test_graph_replay_on_the_tensor_core_kernels_head_dim_64(tiny_bert, tiny_batches):
    """Head dim 64 runs the mma.sync forward and backward inside the graph."""
    model = masked_model(tiny_bert, "cuda", hidden_size=128, num_attention_heads=2)
    batches = batches_of_three_shapes(tiny_batches)
    eager = importance(model, batches, precision="bf16", progress=False)
    graphed = importance(model, batches, precision="bf16", cuda_graph=True, progress=False)
    assert_same_scores(graphed, eager, rtol=2e-2, atol=1e-3)


@cuda_test
def test_graph_replay_leaves_the_model_as_it_was(tiny_bert, tiny_batches):
    model = masked_model(tiny_bert, "cuda")
    model.train()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    importance(model, batches_of_three_shapes(tiny_batches), cuda_graph=True, progress=False)
    assert model.training and flags == [p.requires_grad for p in model.parameters()]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in model.parameters())


@cuda_test
def test_shapes_beyond_the_graph_limit_run_eagerly(tiny_bert, tiny_batches):
    """Nine batch shapes: eight graphs, the ninth eager (a shape seen before replays); the
    same scores."""
    model = masked_model(tiny_bert, "cuda")
    batches = [{k: (v[:, :seq] if v.dim() == 2 else v) for k, v in b.items()}
               for seq, b in zip(range(9, 3, -1), tiny_batches(num_batches=6, batch=4,
                                                                num_labels=NUM_LABELS))]
    batches += [{k: v[:size] for k, v in b.items()}
                for size, b in zip((3, 2, 1, 2), tiny_batches(num_batches=4, batch=4, seed=2,
                                                              num_labels=NUM_LABELS))]
    eager = importance(model, batches, mode="per_example", precision="fp32", progress=False)
    graphed = importance(model, batches, mode="per_example", precision="fp32", progress=False,
                         cuda_graph=True)
    assert_same_scores(graphed, eager, rtol=1e-5, atol=1e-6)


@cuda_test
def test_fractional_labels_of_a_replayed_shape_are_refused(tiny_bert, tiny_batches):
    """Float labels are class ids when whole; a later batch of an already captured shape with
    fractional ones is refused, as in the eager pass (a replay would truncate them)."""
    model = masked_model(tiny_bert, "cuda")
    batches = tiny_batches(num_batches=2, batch=4, num_labels=NUM_LABELS)
    batches[0]["labels"] = batches[0]["labels"].float()
    batches[1]["labels"] = batches[1]["labels"].float() + 0.5
    with pytest.raises(ValueError, match="must be class ids, got fractional values"):
        importance(model, batches, cuda_graph=True, progress=False)


def test_cuda_graph_is_an_error_for_michel_and_on_the_cpu(tiny_bert, tiny_batches):
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = tiny_batches(num_labels=NUM_LABELS)
    with pytest.raises(ValueError, match="'michel'"):
        importance(model, batches, mode="michel", cuda_graph=True, progress=False)
    with pytest.raises(ValueError, match="CUDA device, got one on cpu"):
        importance(model, batches, cuda_graph=True, progress=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_masks_as_views_changes_the_mask_not_the_outputs(attn, tiny_bert, tiny_batches):
    """Under padding_masks_as_views the patched attention gets a stride-0 padding mask (read
    without a host read, as a capture needs), the logits are the same, the config is restored."""
    from sparsebert.hf.attention_backend import padding_masks_as_views
    from sparsebert.nn import attention as attention_module

    model = patch(tiny_bert(num_labels=NUM_LABELS, attn=attn)).eval()
    batch = tiny_batches(num_labels=NUM_LABELS)[0]
    assert not bool(batch["attention_mask"].all())  # some padding
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    masks = []
    original = attention_module.is_padding_mask

    def spy(mask):
        masks.append(mask)
        return original(mask)

    with torch.no_grad():
        expected = model(**inputs).logits
        attention_module.is_padding_mask = spy
        try:
            with padding_masks_as_views(model):
                logits = model(**inputs).logits
        finally:
            attention_module.is_padding_mask = original
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert masks and all(m.dtype == torch.bool and m.dim() == 4 and m.stride(2) == 0
                         for m in masks)
    assert model.config._attn_implementation == attn
    with pytest.raises(RuntimeError, match="inside"), padding_masks_as_views(model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == attn
