"""sparsebert.patch: patched == unpatched eager model (bert, roberta, ..., real MiniLM), names and
state dicts unchanged, HF call paths (output_attentions / hidden_states, training, backward)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from transformers import AutoModel

import sparsebert
import sparsebert.hf as sbhf
from sparsebert.errors import SparsebertError
from sparsebert.hf.structure import UnsupportedModelError
from sparsebert.nn import SparseAttention, SparseMLP

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("model_type", sbhf.supported_model_types())
def test_patched_equals_unpatched(model_type, tiny_model, tiny_batch):
    model = tiny_model(model_type)
    patched = sbhf.patch(copy.deepcopy(model))
    ids, mask = tiny_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        out = patched(ids, attention_mask=mask).last_hidden_state
        out_nomask = patched(ids).last_hidden_state
        ref_nomask = model(ids).last_hidden_state
    assert max_diff(out, ref) < TOL
    assert max_diff(out_nomask, ref_nomask) < TOL
    assert sbhf.is_patched(patched) and not sbhf.is_patched(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementations_and_output_flags(attn, tiny_bert, tiny_batch):
    """The mask arrives as a 4-d additive (eager) or bool (sdpa) tensor; both convert."""
    model = tiny_bert(attn="eager")
    patched = sbhf.patch(tiny_bert(attn=attn))
    ids, mask = tiny_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
        with pytest.warns(UserWarning, match="no attention weights"):
            out = patched(ids, attention_mask=mask, output_hidden_states=True,
                          output_attentions=True)
        as_tuple = patched(ids, attention_mask=mask, return_dict=False)
    assert max_diff(out.logits, ref.logits) < TOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert all(max_diff(a, b) < TOL for a, b in zip(out.hidden_states, ref.hidden_states))
    assert not out.attentions  # attention weights are never materialised
    assert max_diff(as_tuple[0], ref.logits) < TOL


def test_patch_keeps_the_attention_backends_gates(tiny_bert, tiny_batch):
    """Head gates set on a model that runs on attn_implementation="sparsebert" carry over to the
    patched blocks (values and outputs unchanged), as does set_zero_gate_grad."""
    import sparsebert  # noqa: PLC0415

    model = tiny_bert(attn="sparsebert").eval()
    gates = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    sparsebert.set_masks(model, head_mask=gates)
    sbhf.set_zero_gate_grad(model)
    ids, mask = tiny_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        sbhf.patch(model)
        after = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(sparsebert.get_masks(model)["head_mask"], gates)
    assert all(attn.exact_zero_gate_grad for attn, _ in sbhf.sparse_blocks(model))
    assert max_diff(after, before) < TOL


def test_config_output_attentions_warns(tiny_bert, tiny_batch):
    """config.output_attentions=True (which transformers does not pass to the layers) warns as
    the call argument does; an explicit output_attentions=False in the call does not."""
    import warnings  # noqa: PLC0415

    patched = sbhf.patch(sbhf.patch(tiny_bert(attn="eager")))  # idempotent: one hook
    patched.config.output_attentions = True
    ids, mask = tiny_batch()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="config.output_attentions=True returns no"):
            out = patched(ids, attention_mask=mask)
        assert not out.attentions
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            patched(ids, attention_mask=mask, output_attentions=False)
        copied = copy.deepcopy(patched)
        with pytest.warns(UserWarning, match="config.output_attentions=True") as record:
            copied(ids, attention_mask=mask)
    assert len([r for r in record if "config.output_attentions" in str(r.message)]) == 1


def test_a_masked_model_pickles_after_evaluation(tiny_bert, tiny_batch):
    """A patched model with masked heads pickles (torch.save of the whole model) after an
    evaluation forward kept its live heads' weight slices, before and after sparsebert.prune,
    and the loaded copy computes the same outputs."""
    import io  # noqa: PLC0415

    model = sbhf.patch(tiny_bert(attn="eager")).eval()
    gates = torch.ones(3, 4)
    gates[0, 1] = gates[2, :3] = 0
    sparsebert.set_masks(model, head_mask=gates)
    ids, mask = tiny_batch()
    for step in ("masked", "pruned"):
        with torch.no_grad():
            want = model(ids, attention_mask=mask).logits  # keeps the slices
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, want,
                                       rtol=0, atol=0, msg=step)
        if step == "masked":
            sbhf.prune(model)


def test_patch_warns_when_a_carried_layer_has_every_head_gated_off(tiny_bert):
    import sparsebert  # noqa: PLC0415

    model = tiny_bert(attn="sparsebert").eval()
    gates = torch.ones(3, 4)
    gates[1] = 0
    sparsebert.set_masks(model, head_mask=gates)
    with pytest.warns(UserWarning, match="head gates are all 0 .* bias included"):
        sbhf.patch(model)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_packed_sequence_masks_equal_stock_sdpa(model_type, tiny_model, tiny_batch):
    """A 4-d block-diagonal mask (two sequences packed in each row) gives the stock model's
    output; sparsebert.accelerate, which needs padding masks, refuses it by name."""
    import sparsebert  # noqa: PLC0415

    model = tiny_model(model_type, attn="sdpa")
    patched = sbhf.patch(copy.deepcopy(model))
    ids, _ = tiny_batch()
    batch, seq = ids.shape
    segments = (torch.arange(seq) >= seq // 2).long()
    mask = (segments[:, None] == segments[None, :]).expand(batch, 1, seq, seq)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state
        got = patched(ids, attention_mask=mask).last_hidden_state
    assert max_diff(got, want) < TOL
    with pytest.raises(ValueError, match="attention_mask .* is not a padding mask"):
        sparsebert.accelerate(patched)(input_ids=ids, attention_mask=mask)


def test_head_mask_kwarg_is_an_error_not_ignored(tiny_bert, tiny_batch):
    patched = sbhf.patch(tiny_bert())
    ids, mask = tiny_batch()
    with pytest.raises(ValueError, match=r"sparsebert.set_masks"):
        patched(ids, attention_mask=mask, head_mask=torch.ones(3, 4))


def test_evaluation_under_inference_mode_then_training(tiny_bert, tiny_batch):
    """A masked patched model evaluated under torch.inference_mode, then trained: the live
    heads' index tensors made by the evaluation are ordinary tensors, so the backward runs
    (it failed: "Inference tensors cannot be saved for backward"), with the gradients of a
    model never run under inference_mode."""
    heads = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    models = [sbhf.patch(tiny_bert()) for _ in range(2)]
    ids, mask = tiny_batch()
    labels = torch.tensor([0, 1, 0])
    grads = []
    for evaluated_first, model in zip((True, False), models):
        sparsebert.set_masks(model, head_mask=heads)
        if evaluated_first:
            with torch.inference_mode():
                model(ids, attention_mask=mask)
        model.train()
        model.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-6, rtol=1e-6)


def test_real_minilm_patched_equals_unpatched(default_model_dir, tiny_batch):
    model = AutoModel.from_pretrained(str(default_model_dir), attn_implementation="eager").eval()
    patched = sbhf.patch(copy.deepcopy(model))
    ids, mask = tiny_batch(batch=4, seq=24, vocab=model.config.vocab_size, seed=3)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        out = patched(ids, attention_mask=mask).last_hidden_state
    assert patched.encoder.layer[0].attention.head_dim == 32
    assert max_diff(out, ref) < TOL


def test_names_and_state_dict_unchanged_both_ways(tiny_roberta, tiny_batch):
    model = tiny_roberta()
    patched = sbhf.patch(copy.deepcopy(model))
    assert [n for n, _ in patched.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(patched.state_dict()) == list(model.state_dict())
    # patched -> a fresh unpatched model, strictly, and back
    fresh = tiny_roberta(seed=7)
    fresh.load_state_dict(patched.state_dict(), strict=True)
    other = sbhf.patch(tiny_roberta(seed=8))
    other.load_state_dict(model.state_dict(), strict=True)
    ids, mask = tiny_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        assert max_diff(fresh(ids, attention_mask=mask).logits, ref) < TOL
        assert max_diff(other(ids, attention_mask=mask).logits, ref) < TOL


def test_patch_reuses_parameters_and_is_idempotent(tiny_model):
    model = tiny_model("bert")
    query = model.encoder.layer[0].attention.self.query.weight
    dense = model.encoder.layer[0].intermediate.dense.weight
    assert sbhf.patch(model) is model
    layer = model.encoder.layer[0]
    assert isinstance(layer.attention, SparseAttention) and isinstance(layer.sparse_mlp, SparseMLP)
    assert layer.attention.self.query.weight is query and layer.intermediate.dense.weight is dense
    blocks = sbhf.sparse_blocks(model)
    sbhf.patch(model)
    assert all(a is b[0] for a, b in zip([blk[0] for blk in blocks], sbhf.sparse_blocks(model)))
    clone = copy.deepcopy(model)  # the FFN routing follows the copy
    clone_layer = clone.encoder.layer[0]
    assert clone_layer.feed_forward_chunk.mlp is clone_layer.sparse_mlp
    assert clone_layer.sparse_mlp.host is clone_layer


def test_chunked_feed_forward_matches_unpatched(tiny_bert, tiny_batch):
    """config.chunk_size_feed_forward > 0: HF calls the FFN entry once per chunk of tokens."""
    model = tiny_bert(chunk_size_feed_forward=3).eval()
    patched = sbhf.patch(copy.deepcopy(model))
    ids, mask = tiny_batch()
    assert ids.shape[1] % 3 == 0  # HF requires whole chunks
    with torch.no_grad():
        assert max_diff(patched(ids, attention_mask=mask).logits,
                        model(ids, attention_mask=mask).logits) < TOL


def test_ffn_entry_signature_is_its_call_signature(tiny_model):
    """HF's apply_chunking_to_forward counts the FFN entry's parameters (inspect.signature):
    the precomputed signature is the one __call__ has."""
    model = sbhf.patch(tiny_model("bert"))
    entry = model.encoder.layer[0].feed_forward_chunk
    call = inspect.signature(type(entry).__call__)
    assert list(inspect.signature(entry).parameters) == list(call.parameters)[1:]  # minus self


def test_gradients_match_unpatched(tiny_bert, tiny_batch):
    model = tiny_bert()
    patched = sbhf.patch(copy.deepcopy(model))
    ids, mask = tiny_batch()
    labels = torch.tensor([0, 1, 0])
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    patched(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), patched.named_parameters()):
        assert max_diff(p.grad, q.grad) < 1e-5, name


def test_training_mode_runs_sdpa_dropout_path(tiny_bert, tiny_batch):
    patched = sbhf.patch(tiny_bert())
    patched.train()
    assert patched.bert.encoder.layer[0].attention.training
    ids, mask = tiny_batch()
    loss = patched(ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert patched.bert.encoder.layer[0].attention.self.query.weight.grad is not None


@pytest.mark.parametrize("order", ["disable_then_patch", "patch_then_disable"])
def test_attention_dropout_follows_the_stock_dropout_module(order, tiny_bert, tiny_batch):
    """The patched block keeps the stock `attention.self.dropout` module and reads its p: setting
    p = 0 on every nn.Dropout (the usual way to turn dropout off) makes the patched model in train
    mode equal the stock one, before or after patching (not a rate frozen from the config)."""
    model = tiny_bert(attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.1)
    patched = copy.deepcopy(model)

    def disable_dropout(m):
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    if order == "disable_then_patch":
        disable_dropout(patched)
        sbhf.patch(patched)
    else:
        sbhf.patch(patched)
        block = patched.bert.encoder.layer[0].attention
        assert block.attention_dropout == 0.3 and block.self.dropout.p == 0.3
        disable_dropout(patched)
    disable_dropout(model)
    model.train()
    patched.train()
    ids, mask = tiny_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = patched(ids, attention_mask=mask).logits
    assert max_diff(out, ref) < TOL
    assert all(block.attention_dropout == 0.0 for block, _ in sbhf.sparse_blocks(patched))
    block = patched.bert.encoder.layer[1].attention
    block.attention_dropout = 0.2  # the setter writes the module's p
    assert block.self.dropout.p == 0.2


def test_flex_attention_block_masks_get_the_hint(tiny_bert, tiny_batch):
    """flex_attention hands the layers BlockMask objects: the patched model says to use eager or
    sdpa (a TypeError naming the type), not an AttributeError from inside the mask checks."""
    model = sbhf.patch(tiny_bert())
    ids, mask = tiny_batch()
    model.set_attn_implementation("flex_attention")
    with pytest.raises(TypeError, match="BlockMask.*attn_implementation='eager' or 'sdpa'"):
        with torch.no_grad():
            model(ids, attention_mask=mask)


def test_unsupported_models_raise_clear_errors(tiny_model):
    distil = transformers.DistilBertModel(
        transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=1, n_heads=4, hidden_dim=37)
    )
    with pytest.raises(ValueError, match="unsupported model type 'distilbert'.*bert.*roberta"):
        sbhf.patch(distil)
    import sparsebert  # noqa: PLC0415

    with pytest.raises(ValueError, match="sparsebert.use_sparse_attention"):  # the way there
        sparsebert.set_masks(distil, head_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="Hugging Face"):
        sbhf.patch(torch.nn.Linear(3, 3))
    decoder = tiny_model("bert", is_decoder=True)
    with pytest.raises(SparsebertError, match="is_decoder"):  # a one-line CLI error
        sbhf.patch(decoder)
    empty = tiny_model("bert", num_hidden_layers=0)  # would never count as patched
    with pytest.raises(ValueError, match="has no encoder layers .num_hidden_layers 0."):
        sbhf.patch(empty)
    assert "bert" in sbhf.supported_model_types() and "roberta" in sbhf.supported_model_types()


def test_sparse_blocks_requires_patch(tiny_model, tiny_bert, tiny_dims):
    with pytest.raises(ValueError, match=r"sparsebert.patch\(model\) first"):
        sbhf.sparse_blocks(tiny_model("bert"))
    assert len(sbhf.sparse_blocks(sbhf.patch(tiny_bert()))) == tiny_dims.layers


@pytest.mark.parametrize("model_type", sbhf.supported_model_types())
def test_block_accessors_reach_the_layer_modules(model_type, tiny_model):
    """The public accessors of the patched blocks return the HF layer's own linears (what
    magnitude pruning and importance hooks find through the structure table)."""
    model = tiny_model(model_type)
    row = sbhf.STRUCTURES[model_type]
    originals = [
        (layer.attention.self.query, layer.attention.output.dense, layer.intermediate.dense)
        for layer in model.base_model.encoder.layer
    ]
    sbhf.patch(model)
    for (attn, mlp), layer, (query, attn_out, ffn_in) in zip(
        sbhf.sparse_blocks(model), model.base_model.encoder.layer, originals
    ):
        assert attn is getattr(layer, row.attention) and mlp.host is layer
        assert attn.query_linear() is query and attn.output_dense() is attn_out
        assert mlp.intermediate_dense() is ffn_in and mlp.output_dense() is layer.output.dense
        assert list(attn.linears()) == ["query", "key", "value", "output"]
        assert list(mlp.linears()) == ["intermediate", "output"]


def test_compiled_models_apply_their_masks(tiny_bert, tiny_batch):
    """Under torch.compile (dynamo tracing), a patched model applies a causal 4-d mask as
    given (not as a padding mask) and sparsebert.accelerate still reads HF's padding masks."""
    import sparsebert  # noqa: PLC0415

    torch._dynamo.reset()
    stock = tiny_bert(attn="sdpa")  # eager attention would add a bool mask to the scores
    patched = sbhf.patch(tiny_bert(attn="eager"))
    ids, mask = tiny_batch()
    batch, seq = ids.shape
    causal = torch.ones(seq, seq, dtype=torch.bool).tril().expand(batch, 1, seq, seq).clone()
    with torch.no_grad():
        want = stock(ids, attention_mask=causal).logits
        got = torch.compile(patched, backend="eager")(ids, attention_mask=causal).logits
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        fast = sparsebert.accelerate(copy.deepcopy(patched))
        want = stock(ids, attention_mask=mask).logits
        got = torch.compile(fast, backend="eager")(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    torch._dynamo.reset()


# Structure rows, partial patches, position limits
# --------------------------------------------------------------------------------------------
def test_every_documented_model_type_patches(tiny_model):
    """README: bert, roberta, xlm-roberta, camembert, electra (the table must not lose one:
    the parametrized tests iterate over the table itself)."""
    from sparsebert.hf.structure import supported_model_types  # noqa: PLC0415

    documented = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}
    assert documented <= set(supported_model_types())
    model = tiny_model("electra")
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
        got = sparsebert.patch(copy.deepcopy(model))(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_partly_patched_model_is_not_patched(tiny_bert):
    from sparsebert.hf.patching import is_patched, sparse_blocks  # noqa: PLC0415

    stock = tiny_bert()
    model = sparsebert.patch(copy.deepcopy(stock))
    model.bert.encoder.layer[1] = stock.bert.encoder.layer[1]  # an unpatched layer
    assert not is_patched(model)
    with pytest.raises(ValueError, match="is not patched"):
        sparse_blocks(model)


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_position_limit_is_the_longest_input_the_model_takes(model_type, tiny_model):
    from sparsebert.hf.loading import position_limit  # noqa: PLC0415

    model = tiny_model(model_type, max_position_embeddings=20)
    limit = position_limit(model.config)
    with torch.no_grad():
        model(input_ids=torch.full((1, limit), 5))  # the limit fits
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, limit + 1), 5))  # one more does not


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_torch_func_grad_through_a_padded_batch(attn, tiny_model, tiny_dims):
    """torch.func.grad through a patched model on a padded batch: the attention mask is a
    functorch-wrapped tensor there (no storage to compare): read, never cached, and the next
    plain forward of another patched model is unaffected. vmap over a 4-d float mask: SDPA."""
    ids = torch.randint(1, tiny_dims.vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    grads = []
    for patched in (False, True):
        model = tiny_model("bert", "BertForSequenceClassification", attn=attn)
        if patched:
            sparsebert.patch(model)

        def loss(scale, model=model):
            return (model(input_ids=ids, attention_mask=mask).logits * scale).sum()

        grads.append(torch.func.grad(loss)(torch.tensor(1.0)))
    torch.testing.assert_close(grads[1], grads[0])
    other = sparsebert.patch(tiny_model("bert", "BertForSequenceClassification", attn=attn))
    additive = torch.zeros(2, 1, 6, 6)
    additive[1, ..., 4:] = torch.finfo(torch.float32).min
    expected = tiny_model("bert", "BertForSequenceClassification", attn=attn)(
        input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(other(input_ids=ids, attention_mask=mask).logits, expected)
    attention = other.bert.encoder.layer[0].attention
    hidden = torch.randn(2, 6, tiny_dims.hidden)
    stacked = torch.func.vmap(lambda h, m: attention(h[None], attention_mask=m[None])[0][0])(
        hidden, additive)
    for b in range(2):
        torch.testing.assert_close(
            stacked[b], attention(hidden[b:b + 1], attention_mask=additive[b:b + 1])[0][0])


@pytest.mark.parametrize("cast", [torch.Tensor.half, torch.Tensor.bfloat16])
def test_soft_masks_survive_a_cast_after_patching(cast, tiny_bert, tiny_batch):
    """Gate buffers stay fp32 when a patched model is cast to fp16/bf16, as when the model is
    cast before patching: soft gates are not rounded (a 1e-8 gate would be 0 in fp16, a
    pruned head), and the cast model computes what the one cast before patching does. A cast
    to fp64 applies to the gates too."""
    dtype = cast(torch.zeros(())).dtype
    model = tiny_bert().eval()
    first_cast = copy.deepcopy(model).to(dtype)
    sparsebert.patch(first_cast)
    sparsebert.patch(model)
    soft = torch.ones(sparsebert.get_masks(model)["head_mask"].shape)
    soft[0, 1], soft[0, 2] = 0.3, 1e-8
    neurons = torch.rand(sparsebert.get_masks(model)["neuron_mask"].shape)
    for patched in (model, first_cast):
        sparsebert.set_masks(patched, head_mask=soft, neuron_mask=neurons)
    model.to(dtype)
    gates = [(attn.head_gate, mlp.mlp_gate, mlp.neuron_gate)
             for attn, mlp in sbhf.sparse_blocks(model)]
    assert {g.dtype for row in gates for g in row} == {torch.float32}
    masks = sparsebert.get_masks(model)
    assert torch.equal(masks["head_mask"], soft) and torch.equal(masks["neuron_mask"], neurons)
    ids, mask = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   first_cast(input_ids=ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)
    model.double()
    assert {attn.head_gate.dtype for attn, _ in sbhf.sparse_blocks(model)} == {torch.float64}


@pytest.mark.parametrize("shared", ["layer", "attention", "ffn", "parameter"])
def test_layers_sharing_one_module_are_refused(shared, tiny_bert):
    """An encoder whose layers share a module (ALBERT-style weight sharing): one set of gates
    would serve both places, so set_masks merged their masks (the last row won) and the
    first-token readout cut the shared block to one row at its first place too. patch refuses
    it, naming the layers and the backend that keeps one gate row per shared module."""
    model = tiny_bert()
    layers = model.bert.encoder.layer
    if shared == "layer":
        layers[1] = layers[0]
    elif shared == "attention":
        layers[1].attention = layers[0].attention
    elif shared == "ffn":  # prune cut layer 0's MLP out of layer 1 too (it crashed there)
        layers[1].intermediate, layers[1].output = layers[0].intermediate, layers[0].output
    else:
        layers[1].attention.self.query.weight = layers[0].attention.self.query.weight
    with pytest.raises(UnsupportedModelError,
                       match=r"encoder layers 0 and 1 share one .*attn_implementation='sparsebert'"):
        sparsebert.patch(model)
    assert not any(isinstance(m, SparseAttention) for m in model.modules())  # nothing changed


def test_a_quantized_model_is_refused_with_the_order_that_works(tiny_bert):
    """quantize_dynamic before patch: the linears' weight is a method (packed int8), so patch
    failed deep inside with AttributeError ('function' object has no attribute 'device')."""
    model = torch.ao.quantization.quantize_dynamic(tiny_bert(), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    with pytest.raises(UnsupportedModelError,
                       match=r"encoder layer 0 has quantized linears \(attention.self.query, .*"
                             r"patch, mask, prune and score the float model, then quantize it"):
        sparsebert.patch(model)
    assert not any(isinstance(m, SparseAttention) for m in model.modules())
