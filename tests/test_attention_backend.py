"""The "sparsebert" attention backend (sparsebert.hf.attention_backend and head_gates) on tiny
random models of five families that route attention through transformers' AttentionInterface:
ELECTRA and XLM-R (BERT-style encoders), DistilBERT, Llama with grouped-query attention and GPT-2
(decoders).

The independent reference is the same model on transformers' own "sdpa" backend, with each
head's context scaled by its gate just before the attention output projection (a forward
pre-hook), i.e. the definition of a head gate, differentiated by autograd.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from torch import nn

import sparsebert
import sparsebert.hf.attention_backend as backend
from sparsebert.errors import SparsebertError
from sparsebert.hf import AttentionBackendError, override_head_gates, use_sparse_attention
from sparsebert.hf.head_gates import attention_modules

# The KV-cache argument of a causal LM's forward: `cache` in recent transformers 5 releases
# (5.24), `past_key_values` in earlier ones (5.17).
_CAUSAL_LM_ARGS = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
CACHE_ARG = "cache" if "cache" in _CAUSAL_LM_ARGS else "past_key_values"

# Gates for the 3 x 4 tiny models: zeros, soft gates, and a layer with every head pruned.
GATES = torch.tensor([[1.0, 0.0, 0.5, 0.8], [0.0, 0.0, 0.0, 0.0], [0.3, 1.0, 0.0, 0.7]])


@dataclass(frozen=True)
class Family:
    """A model family: how to build a tiny config, and where the attention output projections
    (whose input is the heads' contexts concatenated, head h in columns [h*D, (h+1)*D)) are."""

    name: str
    config: Callable  # (tiny_config fixture, tiny_dims) -> config with attn "sdpa"
    out_proj: Callable[[nn.Module], list[nn.Module]]
    causal: bool


def _distilbert(tiny_config, dims):
    return transformers.DistilBertConfig(
        dim=dims.hidden,
        n_layers=dims.layers,
        n_heads=dims.heads,
        hidden_dim=dims.intermediate,
        vocab_size=dims.vocab,
        max_position_embeddings=dims.max_positions,
        attn_implementation="sdpa",
    )


def _llama(tiny_config, dims):
    return transformers.LlamaConfig(
        hidden_size=dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.heads // 2,  # grouped-query attention, 2 query heads per kv head
        intermediate_size=dims.intermediate,
        vocab_size=dims.vocab,
        max_position_embeddings=dims.max_positions,
        attn_implementation="sdpa",
    )


def _gpt2(tiny_config, dims):
    return transformers.GPT2Config(
        n_embd=dims.hidden,
        n_layer=dims.layers,
        n_head=dims.heads,
        n_inner=dims.intermediate,
        vocab_size=dims.vocab,
        n_positions=dims.max_positions,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )


def _deepseek_v3(tiny_config, dims):
    """Multi-head latent attention: value heads of another size (8) than query/key heads
    (16 + 8 rotary), every layer dense (no experts)."""
    return transformers.DeepseekV3Config(
        hidden_size=dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.heads,
        intermediate_size=dims.intermediate,
        vocab_size=dims.vocab,
        max_position_embeddings=dims.max_positions,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=8,
        first_k_dense_replace=dims.layers,
        attn_implementation="sdpa",
    )


def _bert_layers(model):
    return [layer.attention.output.dense for layer in model.encoder.layer]


FAMILIES = {
    f.name: f
    for f in (
        Family("electra", lambda tc, d: tc("electra", attn="sdpa"), _bert_layers, False),
        Family("xlm-roberta", lambda tc, d: tc("xlm-roberta", attn="sdpa"), _bert_layers, False),
        Family(
            "distilbert",
            _distilbert,
            lambda m: [layer.attention.out_lin for layer in m.transformer.layer],
            False,
        ),
        Family("llama", _llama, lambda m: [layer.self_attn.o_proj for layer in m.layers], True),
        Family("gpt2", _gpt2, lambda m: [block.attn.c_proj for block in m.h], True),
        Family("deepseek-v3", _deepseek_v3,
               lambda m: [layer.self_attn.o_proj for layer in m.layers], True),
    )
}
NAMES = list(FAMILIES)


@pytest.fixture
def pair(tiny_config, tiny_dims):
    """pair(name, device="cpu") -> (sdpa model, the same weights on the sparsebert backend)."""

    def make(name: str, device: str = "cpu"):
        config = FAMILIES[name].config(tiny_config, tiny_dims)
        torch.manual_seed(0)
        reference = transformers.AutoModel.from_config(config).to(device).eval()
        return reference, use_sparse_attention(copy.deepcopy(reference))

    return make


def _inputs(tiny_batch, padded: bool, device: str = "cpu") -> dict:
    ids, mask = tiny_batch()  # (3, 9); rows 1 and 2 padded at the end
    batch = {"input_ids": ids.to(device)}
    if padded:
        batch["attention_mask"] = mask.to(device)
    return batch


def _gate_reference(model: nn.Module, family: Family, gates: torch.Tensor):
    """Hooks that scale each head's context by its gate before the output projection.
    gates: (L, H) or (L, B, H). Returns the hook handles."""
    handles = []
    for layer, proj in enumerate(family.out_proj(model.base_model)):

        def hook(module, args, gate=gates[layer]):
            x = args[0]  # (B, S, H*D)
            heads = gate.shape[-1]
            g = gate[:, None, :, None] if gate.dim() == 2 else gate[None, None, :, None]
            scaled = x.unflatten(-1, (heads, -1)) * g.to(x.dtype)  # (B, S, H, D)
            return (scaled.flatten(-2), *args[1:])

        handles.append(proj.register_forward_pre_hook(hook))
    return handles


def _assert_matches_gated_reference(model: nn.Module, reference: nn.Module, family: Family,
                                    gates: torch.Tensor, batch: dict) -> None:
    """model's last hidden state equals the stock reference's with `gates` applied by hooks
    (the hooks are removed afterwards)."""
    handles = _gate_reference(reference, family, gates)
    with torch.no_grad():
        want = reference(**batch).last_hidden_state
        got = model(**batch).last_hidden_state
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _gated_loss(model: nn.Module, family: Family, gates: torch.Tensor, batch: dict,
                weight: torch.Tensor, *, reference: bool) -> torch.Tensor:
    """sum(last_hidden_state * weight) with head gates `gates`: through the hook reference
    (reference=True, a model on "sdpa") or through the backend's gate override."""
    if reference:
        handles = _gate_reference(model, family, gates)
        loss = (model(**batch).last_hidden_state * weight).sum()
        for handle in handles:
            handle.remove()
        return loss
    with override_head_gates(model, gates):
        return (model(**batch).last_hidden_state * weight).sum()


def _capture_proj_inputs(model: nn.Module, family: Family) -> list[torch.Tensor]:
    """Records the input (B, S, H*D) of every attention output projection on each forward."""
    seen: list[torch.Tensor] = []
    for proj in family.out_proj(model.base_model):
        proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen


class _Spy:
    """Wraps a function, records its calls, and calls it (the real thing runs)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch):
    """(op spy, SDPA spy) on the two attention cores the backend can use."""
    op = _Spy(backend.masked_attention)
    sdpa = _Spy(backend.scaled_dot_product_attention)
    monkeypatch.setattr(backend, "masked_attention", op)
    monkeypatch.setattr(backend, "scaled_dot_product_attention", sdpa)
    return op, sdpa


# --------------------------------------------------------------------------------------------
# All gates on: the model's SDPA outputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [True, False], ids=["padding-mask", "no-mask"])
@pytest.mark.parametrize("name", NAMES)
def test_all_gates_on_equal_sdpa(name, padded, pair, tiny_batch, spies):
    reference, model = pair(name)
    assert model.config._attn_implementation == "sparsebert"
    batch = _inputs(tiny_batch, padded)
    with torch.no_grad():
        want = reference(**batch).last_hidden_state
        got = model(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    op, sdpa = spies
    layers = len(attention_modules(model))
    if FAMILIES[name].causal:  # causal masks take the gathered-heads SDPA path
        assert (len(op.calls), len(sdpa.calls)) == (0, layers)
    else:  # padding masks (or none) take the sparsebert op
        assert (len(op.calls), len(sdpa.calls)) == (layers, 0)
        if padded:
            key_padding_mask = op.calls[0][0][4]  # (B, S) bool, True = real token
            torch.testing.assert_close(key_padding_mask, batch["attention_mask"].bool())


def test_load_with_attn_implementation(tiny_config, tiny_dims, tiny_batch):
    """attn_implementation="sparsebert" at from_config time, then gates through set_masks."""
    config = _llama(tiny_config, tiny_dims)
    torch.manual_seed(0)
    reference = transformers.AutoModel.from_config(config).eval()
    model = transformers.AutoModel.from_config(config, attn_implementation="sparsebert").eval()
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == "sparsebert"
    batch = _inputs(tiny_batch, padded=True)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch).last_hidden_state, reference(**batch).last_hidden_state
        )
        sparsebert.set_masks(model, head_mask=GATES)
        torch.testing.assert_close(sparsebert.get_masks(model)["head_mask"], GATES)
        handles = _gate_reference(reference, FAMILIES["llama"], GATES)
        want = reference(**batch).last_hidden_state
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(model(**batch).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def _assert_gated_decoding_matches(name: str, lm_class, tiny_config, tiny_dims,
                                   tiny_batch) -> None:
    """Family `name`'s causal LM on the backend with GATES: a 6-token prefill, then 3 tokens
    one at a time with a KV cache, gives the logits of the stock model gated by hooks."""
    torch.manual_seed(0)
    family = FAMILIES[name]
    reference = lm_class(family.config(tiny_config, tiny_dims)).eval()
    model = use_sparse_attention(copy.deepcopy(reference))
    sparsebert.set_masks(model, head_mask=GATES)
    _gate_reference(reference, family, GATES)
    ids, _ = tiny_batch()
    logits = {}
    with torch.no_grad():
        for key, m in (("want", reference), ("got", model)):
            out = m(input_ids=ids[:, :6], use_cache=True)
            steps = [out.logits]
            for t in range(6, 9):
                out = m(input_ids=ids[:, t : t + 1], **{CACHE_ARG: out.past_key_values})
                steps.append(out.logits)
            logits[key] = torch.cat(steps, dim=1)
    torch.testing.assert_close(logits["got"], logits["want"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cached_decoding_equals_sdpa(name, tiny_config, tiny_dims, tiny_batch, spies):
    """Prefill (causal: SDPA over active heads), then one token at a time with a KV cache
    (Sq = 1, no mask): GPT-2's steps run the op; Llama's grouped-query steps run SDPA over the
    active query heads and their key/value heads (the op would need each key/value head
    repeated for its query heads, a copy of the cache at every step)."""
    lm_class = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel}
    _assert_gated_decoding_matches(name, lm_class[name], tiny_config, tiny_dims, tiny_batch)
    op, sdpa = spies
    # SDPA: layers 0 and 2 (layer 1 has no active head); steps over 7, 8 and 9 keys
    if name == "gpt2":
        assert len(sdpa.calls) == 2  # the prefill
        assert [tuple(args[1].shape) for args, _ in op.calls] == [
            (3, keys, 4, 8) for keys in (7, 8, 9) for _layer in range(3)]  # (the op skips)
    else:
        assert not op.calls
        assert [(tuple(args[0].shape), tuple(args[1].shape)) for args, _ in sdpa.calls[2:4]] == [
            ((3, 3, 1, 8), (3, 3, 7, 8))] * 2  # 3 active heads each, their key/value heads
        assert len(sdpa.calls) == 2 * 4


# --------------------------------------------------------------------------------------------
# Gated heads: exactly zero, equal to the reference, skipped, gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_masked_heads_contribute_zero(name, pair, tiny_batch):
    family = FAMILIES[name]
    reference, model = pair(name)
    sparsebert.set_masks(model, head_mask=GATES)
    seen = _capture_proj_inputs(model, family)
    _gate_reference(reference, family, GATES)
    batch = _inputs(tiny_batch, padded=True)
    with torch.no_grad():
        got = model(**batch).last_hidden_state
        want = reference(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for layer, context in enumerate(seen):  # (B, S, H*D) per layer
        per_head = context.unflatten(-1, (GATES.shape[1], -1))  # (B, S, H, D)
        for head in range(GATES.shape[1]):
            is_zero = bool((per_head[:, :, head] == 0).all())
            assert is_zero == (GATES[layer, head] == 0), (layer, head)


@pytest.mark.parametrize("name", ["electra", "llama"])
def test_padded_batches_compile_into_one_graph(name, pair, tiny_batch):
    """A padded batch traces into one graph (fullgraph=True; strict torch.export for the
    encoder), on the op path (a padding mask: its structure tells, no value is read) and on the
    SDPA path (a causal mask: the gates are not read on the host while tracing; every head runs,
    gated). Those host reads broke every layer's graph and failed fullgraph. The values and the
    gates' gradients are eager's."""
    _, model = pair(name)
    gates = GATES.clone().requires_grad_(True)
    batch = _inputs(tiny_batch, padded=True)

    def forward(b):
        return model(**b).last_hidden_state

    with override_head_gates(model, gates):
        want = forward(batch)
        (want_grad,) = torch.autograd.grad(want.square().sum(), gates)
        torch._dynamo.reset()
        got = torch.compile(forward, backend="eager", fullgraph=True)(batch)
        (got_grad,) = torch.autograd.grad(got.square().sum(), gates)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)
    assert (got_grad[GATES == 0] == 0).all()
    if name == "electra":
        sparsebert.set_masks(model, head_mask=GATES)
        with torch.no_grad():
            want = model(**batch).last_hidden_state
        exported = torch.export.export(model, (), kwargs=batch, strict=True)
        with torch.no_grad():
            got = exported.module()(**batch).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_value_heads_of_another_size_decode_as_the_reference(tiny_config, tiny_dims, tiny_batch,
                                                            spies):
    """DeepSeek-V3's latent attention (value heads of 8, query/key heads of 24) under gates,
    prefill then cached decoding: the reference's logits; the op (equal sizes only) is never
    called, SDPA over the active heads is."""
    _assert_gated_decoding_matches("deepseek-v3", transformers.DeepseekV3ForCausalLM,
                                   tiny_config, tiny_dims, tiny_batch)
    op, sdpa = spies
    assert op.calls == [] and len(sdpa.calls) == 2 * 4  # layers 0 and 2, prefill + 3 steps
    assert {(args[0].shape[-1], args[2].shape[-1]) for args, _ in sdpa.calls} == {(24, 8)}


@pytest.mark.parametrize("name", ["llama", "gpt2", "distilbert", "deepseek-v3"])
def test_pruned_heads_are_not_computed(name, pair, tiny_batch, spies):
    _, model = pair(name)
    sparsebert.set_masks(model, head_mask=GATES)
    with torch.no_grad():
        model(**_inputs(tiny_batch, padded=True))
    op, sdpa = spies
    if FAMILIES[name].causal:
        # The attention core sees only the active heads: 3 in layer 0, none (no call) in layer
        # 1, 3 in layer 2; key/value heads follow their query heads (grouped-query attention).
        assert [args[0].shape[1] for args, _ in sdpa.calls] == [3, 3]
        assert [args[1].shape[1] for args, _ in sdpa.calls] == [3, 3]
        assert op.calls == []
    else:  # the op gets the gates and skips gate-0 heads itself (tests/test_masked_attention.py)
        torch.testing.assert_close(torch.stack([args[3] for args, _ in op.calls]), GATES)


@pytest.mark.parametrize("per_example", [False, True], ids=["per-head", "per-example"])
@pytest.mark.parametrize("name", NAMES)
def test_gate_gradients_match_reference(name, per_example, pair, tiny_batch):
    """d loss / d gate equals autograd through the hook reference where the gate is nonzero, and
    is exactly 0 at gate 0 (pruned heads are not computed); weight gradients agree too."""
    family = FAMILIES[name]
    reference, model = pair(name)
    batch = _inputs(tiny_batch, padded=True)
    gates = GATES
    if per_example:  # (L, B, H): example 1 drops one more head, example 2 keeps layer 1 head 2
        gates = GATES[:, None, :].repeat(1, batch["input_ids"].shape[0], 1)
        gates[0, 1, 0] = 0.0
        gates[1, 2, 2] = 0.6
    weight = torch.randn(*batch["input_ids"].shape, reference.config.hidden_size)
    grads = {}
    for key, m in (("want", reference), ("got", model)):
        leaf = gates.clone().requires_grad_(True)
        loss = _gated_loss(m, family, leaf, batch, weight, reference=key == "want")
        params = [p for p in m.parameters() if p.requires_grad]
        grads[key] = torch.autograd.grad(loss, [leaf, *params], allow_unused=True)
    gate_got, gate_want = grads["got"][0], grads["want"][0]
    pruned = gates == 0
    assert bool((gate_got[pruned] == 0).all())
    assert bool((gate_want[~pruned] != 0).all())
    torch.testing.assert_close(gate_got[~pruned], gate_want[~pruned], atol=1e-5, rtol=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    for param, got, want in zip(params, grads["got"][1:], grads["want"][1:], strict=True):
        # None = not used at all (e.g. the projections of a layer whose heads are all pruned)
        got = torch.zeros_like(param) if got is None else got
        want = torch.zeros_like(param) if want is None else want
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_exact_zero_gate_grad_matches_reference_everywhere(name, pair, tiny_batch):
    """After sparsebert.hf.set_zero_gate_grad(model), d loss / d gate equals autograd through the
    hook reference at every entry: gates at 0 (a layer with every head at 0 included) too."""
    family = FAMILIES[name]
    reference, model = pair(name)
    sparsebert.hf.set_zero_gate_grad(model)
    assert all(m.exact_zero_gate_grad for m in attention_modules(model))
    batch = _inputs(tiny_batch, padded=True)
    weight = torch.randn(*batch["input_ids"].shape, reference.config.hidden_size)
    grads = []
    for m in (reference, model):
        leaf = GATES.clone().requires_grad_(True)
        loss = _gated_loss(m, family, leaf, batch, weight, reference=m is reference)
        grads.append(torch.autograd.grad(loss, leaf)[0])
    want, got = grads
    assert bool((want[GATES == 0] != 0).all())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    sparsebert.hf.set_zero_gate_grad(model, exact=False)
    assert not any(m.exact_zero_gate_grad for m in attention_modules(model))


@pytest.mark.all_devices
@pytest.mark.parametrize("name", ["electra", "llama"])
def test_devices_match_sdpa_under_gates(name, device, pair, tiny_batch):
    """The same comparison on every device (the op's native CUDA kernel on a GPU)."""
    family = FAMILIES[name]
    reference, model = pair(name, device)
    sparsebert.set_masks(model, head_mask=GATES)
    _gate_reference(reference, family, GATES.to(device))
    batch = _inputs(tiny_batch, padded=True, device=device)
    with torch.no_grad():
        got = model(**batch).last_hidden_state
        want = reference(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["electra", "llama"])
def test_low_precision_error_within_twice_sdpa(name, dtype, pair, tiny_batch):
    """fp16/bf16 (gates included): error vs the fp32 model at most 2x that of stock SDPA in the
    same precision (flash-attention's rule)."""
    family = FAMILIES[name]
    reference, model = pair(name)
    batch = _inputs(tiny_batch, padded=True)
    sparsebert.set_masks(model, head_mask=GATES)
    _gate_reference(reference, family, GATES)
    with torch.no_grad():
        gold = reference(**batch).last_hidden_state
        low_reference, low_model = reference.to(dtype), model.to(dtype)
        err_sdpa = (low_reference(**batch).last_hidden_state.float() - gold).abs().max()
        err_ours = (low_model(**batch).last_hidden_state.float() - gold).abs().max()
    assert err_ours <= 2 * err_sdpa + 1e-6, (float(err_ours), float(err_sdpa))


def test_training_with_dropout_runs_active_heads(pair, tiny_batch, spies):
    """Attention dropout in training goes through SDPA over the active heads; pruned heads stay 0."""
    _, model = pair("electra")
    model.config.attention_probs_dropout_prob = 0.5
    for module in attention_modules(model):
        module.dropout.p = 0.5
    sparsebert.set_masks(model, head_mask=GATES)
    seen = _capture_proj_inputs(model, FAMILIES["electra"])
    model.train()
    model(**_inputs(tiny_batch, padded=True)).last_hidden_state.sum().backward()
    op, sdpa = spies
    assert op.calls == [] and [args[0].shape[1] for args, _ in sdpa.calls] == [3, 3]
    assert all(kwargs["dropout_p"] == 0.5 for _, kwargs in sdpa.calls)
    for layer, context in enumerate(seen):
        per_head = context.unflatten(-1, (GATES.shape[1], -1))  # (B, S, H, D)
        assert bool((per_head[:, :, GATES[layer] == 0] == 0).all())


# --------------------------------------------------------------------------------------------
# Registration and bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_head_mask_and_output_attentions_are_not_silently_dropped(pair, tiny_batch):
    """A head_mask the model passes on to the attention function is an error naming set_masks
    (it was ignored: the logits of all heads); output_attentions=True warns that no weights
    come back."""
    _, model = pair("llama")
    with pytest.raises((AttentionBackendError, TypeError), match="head_mask"):
        model(**_inputs(tiny_batch, padded=True), head_mask=torch.zeros(3, 4))
    module = attention_modules(model)[0]
    heads = model.config.num_attention_heads
    query = torch.randn(2, heads, 5, 8)
    key = value = torch.randn(2, model.config.num_key_value_heads, 5, 8)
    with pytest.raises(AttentionBackendError, match=r"head_mask is not applied by the backend; "
                                                    r"set the heads' gates with "
                                                    r"sparsebert.set_masks"):
        backend.sparsebert_attention_forward(module, query, key, value, None,
                                             head_mask=torch.ones(heads))
    with pytest.warns(UserWarning, match=r"output_attentions=True returns none"):
        _, weights = backend.sparsebert_attention_forward(module, query, key, value, None,
                                                          output_attentions=True)
    assert weights is None


def test_gates_attached_under_inference_mode_are_ordinary_tensors(pair, tiny_batch):
    """use_sparse_attention inside torch.inference_mode: set_masks works outside it after
    (an inference-tensor gate refused the in-place write), and the model is the reference."""
    reference, _ = pair("electra")
    with torch.inference_mode():
        model = use_sparse_attention(copy.deepcopy(reference))
    assert not any(m.head_gate.is_inference() for m in attention_modules(model))
    sparsebert.set_masks(model, head_mask=GATES)
    _assert_matches_gated_reference(model, reference, FAMILIES["electra"], GATES,
                                    _inputs(tiny_batch, padded=True))


def test_shared_layers_take_one_gate_row_per_shared_module(tiny_dims, tiny_batch):
    """ALBERT's 6 layers run one shared attention module: a (6, H) mask is refused with that
    said, a (1, H) row gates the heads in every layer, as the hook reference does."""
    from sparsebert.hf.masks import MaskError  # noqa: PLC0415

    config = transformers.AlbertConfig(
        vocab_size=tiny_dims.vocab, embedding_size=16, hidden_size=tiny_dims.hidden,
        num_hidden_layers=6, num_attention_heads=tiny_dims.heads,
        intermediate_size=tiny_dims.intermediate, attn_implementation="sdpa")
    torch.manual_seed(0)
    reference = transformers.AlbertModel(config).eval()
    model = use_sparse_attention(copy.deepcopy(reference))
    with pytest.raises(MaskError, match=r"must have shape \(L, H\) = \(1, 4\), got \(6, 4\); "
                                        r"this model's 6 layers share 1 attention module"):
        sparsebert.set_masks(model, head_mask=torch.ones(6, tiny_dims.heads))
    gates = GATES[:1]  # (1, H)
    sparsebert.set_masks(model, head_mask=gates)
    family = Family("albert", None, lambda m: [m.encoder.albert_layer_groups[0]
                                               .albert_layers[0].attention.dense], False)
    _assert_matches_gated_reference(model, reference, family, gates,
                                    _inputs(tiny_batch, padded=True))


def test_registered_when_transformers_loads_after_sparsebert():
    """`import sparsebert` does not load transformers, yet attn_implementation="sparsebert"
    works once it does (a fresh interpreter, so the import order is the real one)."""
    code = (
        "import sys, sparsebert\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "import transformers\n"
        "config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, "
        "num_attention_heads=2, intermediate_size=8, vocab_size=10)\n"
        "model = transformers.BertModel(config)\n"
        "model = transformers.AutoModel.from_config(config, attn_implementation='sparsebert')\n"
        "print(model.config._attn_implementation)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("sparsebert")


def test_gate_overrides_on_a_model_that_ignores_gates_are_refused(pair, tiny_batch):
    """override_head_gates on a model neither patched nor on the sparsebert backend raises
    (its attention would not read the gates) and leaves the model as it was."""
    plain, _ = pair("llama")
    with pytest.raises(AttentionBackendError, match=r"neither patched nor on attn_implementation="
                                                    r"'sparsebert' \(it uses 'sdpa'\)"):
        with override_head_gates(plain, torch.zeros(3, 4, requires_grad=True)):
            pass
    assert not any(hasattr(module, "head_gate") for module in plain.modules())


def test_bad_masks_are_clear_errors(pair):
    _, model = pair("llama")
    before = sparsebert.get_masks(model)["head_mask"]
    with pytest.raises(SparsebertError, match=r"'head_mask' must have shape \(L, H\) = \(3, 4\)"):
        sparsebert.set_masks(model, head_mask=torch.ones(3, 2))
    with pytest.raises(SparsebertError, match=r"'head_mask' values must lie in \[0, 1\]"):
        sparsebert.set_masks(model, head_mask=torch.full((3, 4), 2.0))
    with pytest.raises(SparsebertError, match="'mlp_mask'.*head gates only"):
        sparsebert.set_masks(model, mlp_mask=torch.ones(3))
    torch.testing.assert_close(sparsebert.get_masks(model)["head_mask"], before)
    with pytest.raises(AttentionBackendError, match=r"'gates' must have shape \(L, H\) = \(3, 4\)"):
        with override_head_gates(model, torch.ones(2, 4)):
            pass
    for gates in (torch.ones(3, 2), torch.ones(3, 2, 2, 4)):
        with pytest.raises(AttentionBackendError, match=r"'gates' must have shape \(L, H\)"):
            with override_head_gates(model, gates):
                pass
    with pytest.raises(AttentionBackendError, match="'gates' must be a floating-point tensor"):
        with override_head_gates(model, torch.ones(3, 4, dtype=torch.long)):
            pass
    module = attention_modules(model)[0]
    module.head_gate = torch.ones(5)
    with pytest.raises(AttentionBackendError, match=r"head_gate has shape \(5,\); expected "
                                                    r"\(H,\) = \(4,\)"):
        sparsebert.set_masks(model, head_mask=GATES)
    module.head_gate = torch.ones(4)
    module.head_gate_override = torch.ones(5)
    with pytest.raises(AttentionBackendError, match=r"head gate has shape \(5,\); expected"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_cross_attention_modules_take_no_gates(tiny_config):
    """An ELECTRA decoder with cross-attention: only the self-attention modules carry gates
    (one per layer), so a (L, H) head mask fits; the cross-attention runs ungated."""
    config = tiny_config("electra", attn="sdpa", is_decoder=True, add_cross_attention=True)
    model = use_sparse_attention(transformers.ElectraModel(config).eval())
    assert attention_modules(model) == [layer.attention.self for layer in model.encoder.layer]
    sparsebert.set_masks(model, head_mask=GATES)
    torch.testing.assert_close(sparsebert.get_masks(model)["head_mask"], GATES)
    assert not hasattr(model.encoder.layer[0].crossattention.self, "head_gate")


def test_models_without_the_interface_are_rejected(tiny_bert):
    patched = sparsebert.patch(tiny_bert(attn="sdpa"))  # SparseAttention replaced the HF modules
    with pytest.raises(AttentionBackendError, match="no attention module that uses"):
        use_sparse_attention(patched)
    with pytest.raises(AttentionBackendError, match="must be a transformers PreTrainedModel"):
        use_sparse_attention(nn.Linear(2, 2))


def _bart(encoder_heads: int, decoder_heads: int) -> nn.Module:
    config = transformers.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=encoder_heads,
        decoder_attention_heads=decoder_heads, encoder_ffn_dim=64, decoder_ffn_dim=64,
        vocab_size=100, dropout=0.0, attention_dropout=0.0, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.BartModel(config).eval()


def test_encoder_decoder_models():
    """BART: every attention module (the decoder's cross-attention too) gets gates when the head
    counts agree; with different encoder and decoder head counts, which no (L, H) mask can
    describe, use_sparse_attention and set_masks refuse before anything runs."""
    ids = torch.randint(3, 100, (2, 9))
    decoder_ids = torch.randint(3, 100, (2, 5))
    stock = _bart(4, 4)
    model = use_sparse_attention(copy.deepcopy(stock))
    assert len(attention_modules(model)) == 6  # 2 encoder, 2 x (self + cross) decoder
    head_mask = torch.ones(6, 4)
    head_mask[0, 1] = head_mask[3, 2] = 0
    sparsebert.set_masks(model, head_mask=head_mask)
    with torch.no_grad():
        got = model(ids, decoder_input_ids=decoder_ids).last_hidden_state
        sparsebert.set_masks(model, head_mask=torch.ones(6, 4))
        ones = model(ids, decoder_input_ids=decoder_ids).last_hidden_state
        want = stock(ids, decoder_input_ids=decoder_ids).last_hidden_state
    torch.testing.assert_close(ones, want, atol=1e-5, rtol=1e-5)
    assert (got - want).abs().max() > 1e-3  # the masked heads count
    uneven = _bart(4, 2)
    with pytest.raises(AttentionBackendError, match=r"another head count than "
                       r"config.num_attention_heads = 4 \(decoder.layers.0.self_attn: 2"):
        use_sparse_attention(uneven)
    assert uneven.config._attn_implementation == "sdpa"  # refused before switching
    uneven.set_attn_implementation("sparsebert")
    with pytest.raises(AttentionBackendError, match="another head count"):
        sparsebert.set_masks(uneven, head_mask=torch.ones(6, 4))
    with torch.no_grad():  # without gates it still runs (every gate at 1)
        uneven(ids, decoder_input_ids=decoder_ids)


def test_unsupported_arguments_are_rejected(pair):
    _, model = pair("gpt2")
    module = attention_modules(model)[0]
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(AttentionBackendError, match="'softcap'.*attn_implementation='eager'"):
        backend.sparsebert_attention_forward(module, q, q, q, None, softcap=30.0)
    kv = torch.randn(1, 3, 3, 8)
    with pytest.raises(AttentionBackendError, match="query heads 4 are not a multiple of "
                                                    "key/value heads 3"):
        backend.sparsebert_attention_forward(module, q, kv, kv, None)


def test_gate_changes_take_effect(pair, tiny_batch):
    """The active-head cache follows new masks, in-place writes and fresh override tensors."""
    family = FAMILIES["llama"]
    reference, model = pair("llama")
    batch = _inputs(tiny_batch, padded=True)
    other = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.2]])

    def check(gates):
        _assert_matches_gated_reference(model, reference, family, gates, batch)

    for gates in (GATES, other, torch.ones(3, 4)):
        sparsebert.set_masks(model, head_mask=gates)
        check(gates)
    with torch.no_grad():  # in place, on the buffer itself
        attention_modules(model)[2].head_gate[1] = 0.0
    check(torch.ones(3, 4).index_put_((torch.tensor([2]), torch.tensor([1])), torch.zeros(1)))
    attention_modules(model)[0].head_gate.data[3] = 0.0  # bypasses the version counter
    check(torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]]))
    sparsebert.set_masks(model, head_mask=torch.ones(3, 4))
    for gates in (GATES, other, GATES):  # fresh tensors, possibly at a recycled address
        with override_head_gates(model, gates.clone()):
            check(gates)


def test_mask_reads_nothing_on_the_host_while_a_cuda_graph_is_captured(monkeypatch):
    """An all-real padding mask is dropped (no mask, as sdpa_mask) only where the mask may be
    read on the host: under CUDA-graph capture (simulated here) that read is not allowed, and
    the (B, 1, Sq, Sk) key mask comes back instead."""
    from transformers.masking_utils import bidirectional_mask_function  # noqa: PLC0415

    from sparsebert.hf.attention_backend import sparsebert_mask  # noqa: PLC0415

    padding = torch.ones(2, 5, dtype=torch.long)

    def mask():
        return sparsebert_mask(2, 5, 5, mask_function=bidirectional_mask_function,
                               attention_mask=padding, allow_is_bidirectional_skip=True)

    assert mask() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("read on the host"))
    captured = mask()
    assert captured.shape == (2, 1, 5, 5) and captured.dtype == torch.bool
    monkeypatch.undo()
    assert bool(captured.all())


# --------------------------------------------------------------------------------------------
# The attention function called directly, against transformers' own sdpa function
# --------------------------------------------------------------------------------------------
def _sdpa_gated(module: nn.Module, query, key, value, mask, gate: torch.Tensor, **kwargs):
    """transformers' "sdpa" attention function with each head's output scaled by its gate:
    (B, Sq, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

    out, _ = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    return out * gate[None, None, :, None]


@pytest.mark.parametrize("core", ["op", "causal", "per-head-mask", "per-head-key-mask"])
def test_direct_call_equals_gated_sdpa(core, pair):
    """The backend as transformers calls it (grouped-query attention, 2 query heads per
    key/value head): the `scaling` argument is used as given (models such as Gemma pass one
    other than D ** -0.5), and per-head 4-d masks follow their heads when gated-off heads are
    left out of the gathered ones (a per-head mask that repeats over query rows is no padding
    mask: it differs between heads)."""
    _, model = pair("llama")
    sparsebert.set_masks(model, head_mask=GATES)
    module = attention_modules(model)[0]  # gates [1, 0, 0.5, 0.8]: head 1 not computed
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 5, 8, generator=gen)
    key, value = torch.randn(2, 2, 2, 5, 8, generator=gen)
    mask = None
    if core == "per-head-mask":  # (B, H, Sq, Sk) bool, True = attend; every row attends somewhere
        mask = torch.rand(2, 4, 5, 5, generator=gen) > 0.4
        mask[..., 0] = True
    if core == "per-head-key-mask":  # (B, H, 1, Sk) expanded over queries (stride 0)
        mask = torch.rand(2, 4, 1, 5, generator=gen) > 0.4
        mask[..., 0] = True
        mask = mask.expand(2, 4, 5, 5)
    kwargs = {"scaling": 0.3, "is_causal": core == "causal"}
    got, weights = backend.sparsebert_attention_forward(module, query, key, value, mask, **kwargs)
    want = _sdpa_gated(module, query, key, value, mask, GATES[0], **kwargs)
    assert weights is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert bool((got[:, :, 1] == 0).all())


@pytest.mark.parametrize("padded", [False, True])
def test_grouped_query_decoding_step_copies_no_key_value_head(padded, pair):
    """A single-token decoding step of grouped-query attention with every head active shares
    each key/value head between its query heads, as transformers' sdpa does, with or without a
    padding mask (a left-padded batch): no per-query-head copy of the cache ((B, H, L, D) at
    every step, groups times the layer's cache) and the outputs of transformers' sdpa
    function."""
    _, model = pair("llama")
    module = attention_modules(model)[0]
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 1, 8, generator=gen)
    key, value = torch.randn(2, 2, 2, 9, 8, generator=gen)  # 2 key/value heads, 9 cached keys
    mask = None
    if padded:  # (B, 1, 1, L) bool, True = attend: the second row left-padded by 3
        mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        mask[1, :, :, :3] = False
    with torch.profiler.profile() as profile:
        got, _ = backend.sparsebert_attention_forward(module, query, key, value, mask)
    copies = {event.key for event in profile.key_averages()} & {
        "aten::repeat_interleave", "aten::index_select", "aten::repeat", "aten::expand_copy"}
    assert not copies, f"the key/value heads were copied: {sorted(copies)}"
    want = _sdpa_gated(module, query, key, value, mask, torch.ones(4))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_direct_call_on_a_module_without_gates_or_is_causal():
    """A module with no gates and no is_causal attribute: every head at gate 1 and causal
    attention, as transformers' sdpa function defaults."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

    module = nn.Module()
    query, key, value = torch.randn(3, 1, 4, 5, 8, generator=torch.Generator().manual_seed(0))
    got, _ = backend.sparsebert_attention_forward(module, query, key, value, None)
    want, _ = sdpa_attention_forward(module, query, key, value, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["electra", "llama"])
def test_gate_gradients_at_all_ones(name, pair, tiny_batch):
    """Gates at 1 with requires_grad (where importance scores start): the outputs are the
    model's, and d loss / d gate is the hook reference's, on the op (ELECTRA's padding masks)
    and on the gathered-heads SDPA path (Llama's causal masks)."""
    family = FAMILIES[name]
    reference, model = pair(name)
    batch = _inputs(tiny_batch, padded=True)
    weight = torch.randn(*batch["input_ids"].shape, reference.config.hidden_size)
    grads = []
    for m in (reference, model):
        leaf = torch.ones(3, 4, requires_grad=True)
        loss = _gated_loss(m, family, leaf, batch, weight, reference=m is reference)
        grads.append(torch.autograd.grad(loss, leaf)[0])
    want, got = grads
    assert bool((want != 0).all())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_nested_overrides_restore_the_outer_gates(pair, tiny_batch):
    """Leaving an inner override_head_gates block brings back the outer block's gates, and
    leaving the outer one the set_masks gates."""
    family = FAMILIES["electra"]
    reference, model = pair("electra")
    batch = _inputs(tiny_batch, padded=True)
    inner = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.2]])
    buffer_gates = torch.ones(3, 4)
    buffer_gates[2, 3] = 0.0
    sparsebert.set_masks(model, head_mask=buffer_gates)

    def check(gates):
        _assert_matches_gated_reference(model, reference, family, gates, batch)

    with override_head_gates(model, GATES):
        check(GATES)
        with override_head_gates(model, inner):
            check(inner)
        check(GATES)
    check(buffer_gates)
    assert all(m.head_gate_override is None for m in attention_modules(model))


def test_gates_are_made_on_the_model_device(tiny_config, tiny_dims):
    """use_sparse_attention makes each layer's gates where the layer's weights are (the meta
    device stands in for an accelerator here)."""
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(_llama(tiny_config, tiny_dims))
    use_sparse_attention(model)
    assert {m.head_gate.device.type for m in attention_modules(model)} == {"meta"}


@pytest.mark.parametrize("name", ["electra", "llama"])
def test_fp32_gates_on_a_bf16_model(name, pair, tiny_batch):
    """A model cast to bf16 before use_sparse_attention keeps fp32 gates: outputs come back in
    bf16, with an error vs the fp32 model at most 2x that of stock SDPA in bf16."""
    family = FAMILIES[name]
    reference, _ = pair(name)
    model = use_sparse_attention(copy.deepcopy(reference).to(torch.bfloat16))
    sparsebert.set_masks(model, head_mask=GATES)
    assert {m.head_gate.dtype for m in attention_modules(model)} == {torch.float32}
    batch = _inputs(tiny_batch, padded=True)
    _gate_reference(reference, family, GATES)
    with torch.no_grad():
        gold = reference(**batch).last_hidden_state
        got = model(**batch).last_hidden_state
        low = reference.to(torch.bfloat16)(**batch).last_hidden_state
    assert got.dtype == torch.bfloat16
    err_sdpa = (low.float() - gold).abs().max()
    err_ours = (got.float() - gold).abs().max()
    assert err_ours <= 2 * err_sdpa + 1e-6, (float(err_ours), float(err_sdpa))


def test_masks_set_after_a_cast_to_half_precision_are_not_rounded(pair):
    """The gates are buffers of the model's own attention modules, so a cast of the model
    (.half()) reaches them; setting masks afterwards makes them fp32 again and writes the soft
    values exactly (a 1e-8 gate would be 0 in fp16: a pruned head)."""
    _, model = pair("electra")
    model.half()
    with torch.inference_mode():  # masks read back in an evaluation loop: still settable after
        assert sparsebert.get_masks(model)["head_mask"].dtype == torch.float32
    soft = torch.ones(len(attention_modules(model)), model.config.num_attention_heads)
    soft[0, 1], soft[0, 2] = 0.3, 1e-8
    sparsebert.set_masks(model, head_mask=soft)
    assert {m.head_gate.dtype for m in attention_modules(model)} == {torch.float32}
    assert torch.equal(sparsebert.get_masks(model)["head_mask"], soft)
    with torch.inference_mode():  # a cast under inference mode (here to fp64): still settable
        model.double()
    sparsebert.set_masks(model, head_mask=soft)
    assert {m.head_gate.dtype for m in attention_modules(model)} == {torch.float64}
    assert torch.equal(sparsebert.get_masks(model)["head_mask"], soft)


@pytest.mark.parametrize("case", ["padding", "all-real", "all-real-no-skip", "kv-offset",
                                  "causal"])
def test_mask_equals_sdpa_mask(case):
    """sparsebert_mask allows what transformers' sdpa_mask allows for the same arguments (as
    transformers' bidirectional and causal mask builders call them): for plain padding masks
    as a (B, 1, Sq, Sk) bool view of the key mask, None for an all-real one where a skip is
    allowed, and sdpa_mask's own masks otherwise."""
    from transformers.masking_utils import (  # noqa: PLC0415
        bidirectional_mask_function,
        causal_mask_function,
        sdpa_mask,
    )

    from sparsebert.hf.attention_backend import sparsebert_mask  # noqa: PLC0415

    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, 4:] = False
    kwargs = {"batch_size": 2, "q_length": 5, "kv_length": 5, "attention_mask": padding[:, :5],
              "mask_function": bidirectional_mask_function, "allow_is_causal_skip": False,
              "allow_is_bidirectional_skip": True}
    if case.startswith("all-real"):
        kwargs["attention_mask"] = torch.ones(2, 5, dtype=torch.bool)
        kwargs["allow_is_bidirectional_skip"] = case == "all-real"
    elif case == "kv-offset":  # keys 2..6 of the padding mask
        kwargs.update(attention_mask=padding, kv_offset=2)
    elif case == "causal":
        kwargs["mask_function"] = causal_mask_function
    got, want = sparsebert_mask(**kwargs), sdpa_mask(**kwargs)
    assert (got is None) == (case == "all-real")
    full = torch.ones(2, 1, 5, 5, dtype=torch.bool)  # no mask: every key attended
    got = full if got is None else got
    want = full if want is None else want
    assert got.dtype == torch.bool and got.shape == (2, 1, 5, 5)
    assert torch.equal(got, want.expand_as(got))
