"""set_masks / get_masks: round trips, a masked patched layer vs a hand-written BERT layer, and
clear errors (nothing half-written) for bad masks and unpatched models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparsebert.hf as sbhf
from sparsebert.hf.masks import MaskError


@pytest.fixture
def patched(tiny_model):
    """A patched tiny BertModel (random, seed 0)."""
    return sbhf.patch(tiny_model("bert"))


@pytest.fixture
def dims(tiny_dims):
    """(L, H, F) of the tiny models."""
    return tiny_dims.layers, tiny_dims.heads, tiny_dims.intermediate


def test_round_trip_and_defaults(patched, dims):
    model, (L, H, FF) = patched, dims
    masks = sbhf.get_masks(model)
    assert masks["head_mask"].shape == (L, H) and masks["head_mask"].eq(1).all()
    assert masks["mlp_mask"].shape == (L,) and masks["neuron_mask"].shape == (L, FF)
    heads = torch.rand(L, H)
    heads[0, 1] = 0.0
    sbhf.set_masks(model, head_mask=heads, mlp_mask=torch.tensor([1.0, 0.0, 0.5]))
    sbhf.set_masks(model, mlp_mask=(torch.rand(L, FF) > 0.5).float())  # (L, F): neurons
    got = sbhf.get_masks(model)
    assert torch.equal(got["head_mask"], heads)
    assert got["mlp_mask"].tolist() == [1.0, 0.0, 0.5]  # unchanged by the neuron call
    sbhf.set_masks(model, head_mask=np.ones((L, H), dtype=np.float32))  # numpy accepted
    sbhf.set_masks(model, neuron_mask=torch.ones(L, FF, dtype=torch.bool))  # bool accepted
    assert (
        sbhf.get_masks(model)["head_mask"].eq(1).all()
        and sbhf.get_masks(model)["neuron_mask"].eq(1).all()
    )


def bert_layer_reference(layer, x, key_mask, head_gate, mlp_gate, neuron_gate):
    """One BERT layer written out by hand with the paper's gates. x (B, S, hid)."""
    attn = layer.attention
    b, s, hid = x.shape
    H = head_gate.shape[0]
    d = hid // H

    def heads(linear):
        return linear(x).view(b, s, H, d).transpose(1, 2)  # (B, H, S, D)

    scores = heads(attn.self.query) @ heads(attn.self.key).transpose(-1, -2) / d**0.5
    scores = scores + (~key_mask)[:, None, None, :] * torch.finfo(x.dtype).min
    probs = scores.softmax(-1) * head_gate.view(1, H, 1, 1)  # gate on the attention probabilities
    ctx = (probs @ heads(attn.self.value)).transpose(1, 2).reshape(b, s, hid)
    a = attn.output.dense(ctx) if bool(head_gate.any()) else torch.zeros_like(x)
    a = attn.output.LayerNorm(a + x)
    h = F.gelu(layer.intermediate.dense(a)) * neuron_gate
    ffn = (
        layer.output.dense(h) * mlp_gate
        if bool((mlp_gate * neuron_gate).any())
        else torch.zeros_like(a)
    )
    return layer.output.LayerNorm(ffn + a)


@pytest.mark.parametrize("case", ["soft", "no_heads", "no_mlp"])
def test_masked_layer_matches_hand_written_reference(case, patched, dims, tiny_batch):
    model, (L, H, FF) = patched, dims
    torch.manual_seed(4)
    heads, mlps, neurons = torch.rand(L, H), torch.rand(L), (torch.rand(L, FF) > 0.3).float()
    heads[1, 0] = 0.0
    if case == "no_heads":
        heads[1] = 0.0
    if case == "no_mlp":
        mlps[1] = 0.0
    sbhf.set_masks(model, head_mask=heads, mlp_mask=mlps, neuron_mask=neurons)
    ids, mask = tiny_batch()
    captured = {}
    layer = model.encoder.layer[1]
    layer.register_forward_hook(lambda mod, args, out: captured.update(x=args[0], y=out))
    with torch.no_grad():
        model(ids, attention_mask=mask)
        ref = bert_layer_reference(layer, captured["x"], mask.bool(), heads[1], mlps[1], neurons[1])
    assert (captured["y"] - ref).abs().max() < 1e-5


def test_bad_masks_raise_and_write_nothing(patched, dims):
    model, (L, H, FF) = patched, dims
    good = torch.full((L, H), 0.5)
    sbhf.set_masks(model, head_mask=good)
    cases = [
        ({"head_mask": torch.ones(L, H + 1)}, ValueError, r"head_mask.*\(3, 4\).*got \(3, 5\)"),
        ({"head_mask": torch.ones(L, H, dtype=torch.long)}, TypeError, "floating point.*int64"),
        ({"head_mask": [[1.0] * H] * L}, TypeError, "torch.Tensor or numpy"),
        ({"head_mask": torch.full((L, H), 1.5)}, ValueError, r"\[0, 1\]"),
        ({"head_mask": torch.full((L, H), float("nan"))}, ValueError, r"\[0, 1\]"),
        ({"mlp_mask": torch.ones(L + 1)}, ValueError, r"mlp_mask.*\(L,\).*\(L, F\)"),
        ({"head_mask": torch.ones(L, H), "mlp_mask": -torch.ones(L)}, ValueError, r"\[0, 1\]"),
        ({"mlp_mask": torch.ones(L, FF), "neuron_mask": torch.ones(L, FF)}, ValueError, "once"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            sbhf.set_masks(model, **kwargs)
    assert torch.equal(sbhf.get_masks(model)["head_mask"], good)  # nothing half-written
    assert sbhf.get_masks(model)["mlp_mask"].eq(1).all()


def test_masks_need_a_patched_model(tiny_model, dims):
    model, (L, H, _) = tiny_model("roberta"), dims
    with pytest.raises(ValueError, match=r"not patched.*sparsebert.patch\(model\)"):
        sbhf.set_masks(model, head_mask=torch.ones(L, H))
    with pytest.raises(ValueError, match="not patched"):
        sbhf.get_masks(model)


def test_masks_on_pruned_model_use_original_numbering(patched, dims):
    model, (L, H, _) = patched, dims
    heads = torch.ones(L, H)
    heads[0, [0, 2]] = 0.0
    mlps = torch.tensor([1.0, 0.0, 1.0])
    sbhf.set_masks(model, head_mask=heads, mlp_mask=mlps)
    sbhf.prune(model)
    got = sbhf.get_masks(model)
    assert torch.equal(got["head_mask"], heads) and torch.equal(got["mlp_mask"], mlps)
    assert got["neuron_mask"][1].eq(0).all()
    softer = heads * 0.5
    sbhf.set_masks(model, head_mask=softer)  # kept entries may change
    assert torch.equal(sbhf.get_masks(model)["head_mask"], softer)
    with pytest.raises(MaskError, match="layer 0 head 0.*removed by sparsebert.prune"):
        sbhf.set_masks(model, head_mask=torch.ones(L, H))
    with pytest.raises(MaskError, match="layer 1.*MLP was removed"):
        sbhf.set_masks(model, mlp_mask=torch.ones(L))
    neurons = torch.ones(L, model.config.intermediate_size)
    with pytest.raises(MaskError, match="'neuron_mask' sets layer 1 neuron 0"):
        sbhf.set_masks(model, neuron_mask=neurons)
    with pytest.raises(MaskError, match="'mlp_mask' sets layer 1 neuron 0"):
        sbhf.set_masks(model, mlp_mask=neurons)  # (L, F): neuron masks


@pytest.mark.parametrize("backend", [False, True])
def test_masks_after_a_cast_under_inference_mode(backend, tiny_model, dims, tiny_batch):
    """A model cast under torch.inference_mode holds its gates as inference tensors, which take
    no in-place write outside that mode: set_masks failed with torch's RuntimeError. The masks
    now apply, as on the same model cast outside inference mode."""
    L, H, FF = dims
    head_mask = torch.ones(L, H)
    head_mask[0, 1] = head_mask[1, 3] = 0

    def masked(cast_in_inference_mode):
        model = tiny_model("bert")
        model = sbhf.use_sparse_attention(model) if backend else sbhf.patch(model)
        sbhf.set_masks(model, head_mask=torch.ones(L, H))  # (attaches the backend's gates)
        with torch.inference_mode(cast_in_inference_mode):
            model = model.to(torch.float64).eval()
        masks = {"head_mask": head_mask}
        if not backend:
            masks["mlp_mask"] = torch.tensor([1.0] * (L - 1) + [0.0])
        sbhf.set_masks(model, **masks)
        ids, mask = tiny_batch()
        with torch.no_grad():
            return sbhf.get_masks(model), model(input_ids=ids, attention_mask=mask)[0]

    (got_masks, got), (want_masks, want) = masked(True), masked(False)
    for name in want_masks:
        assert torch.equal(got_masks[name], want_masks[name]), name
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got_masks["head_mask"], head_mask)
