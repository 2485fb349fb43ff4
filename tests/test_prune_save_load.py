"""prune == masked (< 1e-5) with ragged per-layer masks; save_pruned / load_pruned round trips;
atomic saves; clear errors, checked up front, for tampered pruned-model directories."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertForSequenceClassification

import sparsebert.hf as sbhf
import sparsebert.nn.attention as sb_attention
import sparsebert.nn.mlp as sb_mlp
from sparsebert.errors import SparsebertError
from sparsebert.hf import serialization
from sparsebert.hf.serialization import PrunedModelError, PrunedModelNotFoundError
from sparsebert.hf.surgery import count_parameters

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def ragged_masks(layers: int, heads: int, neurons: int, seed: int = 0):
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


def masked(model):
    """Patch `model` and set ragged masks; returns (model, head, mlp, neuron masks)."""
    model = sbhf.patch(model)
    cfg = model.config
    masks = ragged_masks(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size)
    sbhf.set_masks(model, head_mask=masks[0], mlp_mask=masks[1], neuron_mask=masks[2])
    return (model, *masks)


def logits_before_and_after_prune(model, ids, mask):
    """(the masked model's logits, the same model's after sbhf.prune), without grad."""
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        sbhf.prune(model)
        return before, model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("path", ["host_skip", "tensor_gate"])
def test_prune_equals_masked(path, monkeypatch, tiny_bert, tiny_batch):
    if path == "tensor_gate":  # the CUDA / grad path: gates applied as tensors, no host skip
        monkeypatch.setattr(sb_attention, "known_all_zero", lambda gate: False)
        monkeypatch.setattr(sb_mlp, "known_all_zero", lambda gate: False)
    model, head, _, neuron = masked(tiny_bert())
    ids, mask = tiny_batch()
    before = count_parameters(model)
    masked_logits, pruned = logits_before_and_after_prune(model, ids, mask)
    assert max_diff(pruned, masked_logits) < TOL
    sizes = sbhf.layer_sizes(model)
    assert [s["num_heads"] for s in sizes] == (head != 0).sum(1).tolist()
    assert sizes[1]["num_heads"] == 0 and sizes[-1]["intermediate_size"] == 0
    assert sizes[0]["intermediate_size"] == int(neuron[0].sum())
    assert count_parameters(model) < before
    layer1 = model.bert.encoder.layer[1]
    assert layer1.attention.self.query is None and layer1.attention.output.dense is None
    assert torch.equal(sbhf.get_masks(model)["head_mask"], head)


def test_prune_keeps_small_soft_gates_and_removes_only_exact_zeros(tiny_bert, tiny_batch):
    """A gate of 0.01 or 0.3 is a soft gate, not a pruned component: prune() keeps such heads,
    neurons and MLPs (with their gates) and removes only the exact zeros, so the pruned model
    computes what the masked one does."""
    model = sbhf.patch(tiny_bert())
    cfg = model.config
    head = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads)
    head[0, 1], head[0, 2], head[1, 0], head[2, 3] = 0.01, 0.3, 0.0, 0.3
    mlp = torch.tensor([1.0, 0.01, 0.3])
    neuron = torch.ones(cfg.num_hidden_layers, cfg.intermediate_size)
    neuron[0, :3] = torch.tensor([0.01, 0.3, 0.0])
    neuron[1, 5], neuron[2, 7], neuron[2, 8] = 0.3, 0.01, 0.0
    sbhf.set_masks(model, head_mask=head, mlp_mask=mlp, neuron_mask=neuron)
    ids, mask = tiny_batch()
    masked_logits, pruned = logits_before_and_after_prune(model, ids, mask)
    assert max_diff(pruned, masked_logits) < TOL
    sizes = sbhf.layer_sizes(model)
    assert [s["num_heads"] for s in sizes] == [4, 3, 4]
    assert [s["intermediate_size"] for s in sizes] == [cfg.intermediate_size - 1,
                                                      cfg.intermediate_size,
                                                      cfg.intermediate_size - 1]
    got = sbhf.get_masks(model)
    for key, want in (("head_mask", head), ("mlp_mask", mlp), ("neuron_mask", neuron)):
        assert torch.equal(got[key], want), key


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_per_head_mask_runs_on_the_pruned_and_reloaded_model(attn, kind, tiny_bert,
                                                               tiny_batch, tmp_path):
    """A 4-d mask with one entry per head (B, H, S, S) gives a physically pruned model, and
    the same model saved and reloaded, the masked model's logits (each kept head reads its own
    entry); a mask of another head count is an error naming attention_mask."""
    model, *_ = masked(tiny_bert(attn=attn))
    ids, _ = tiny_batch()
    batch, seq = ids.shape
    heads = model.config.num_attention_heads
    gen = torch.Generator().manual_seed(3)
    attend = torch.rand(batch, heads, seq, seq, generator=gen) > 0.3
    attend[..., 0] = True  # every query row attends somewhere
    mask = attend if kind == "bool" else torch.zeros(attend.shape).masked_fill(~attend, -1e4)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        sbhf.prune(model)
        pruned = model(ids, attention_mask=mask).logits
        loaded = sbhf.load_pruned(sbhf.save_pruned(model, tmp_path / "pruned")).eval()
        reloaded = loaded(ids, attention_mask=mask).logits
    assert max_diff(pruned, want) < TOL and max_diff(reloaded, want) < TOL
    with torch.no_grad(), pytest.raises(ValueError, match=r"attention_mask \(3, 3, 9, 9\): "
                                                         r"dimension 1 must be 1 or the model's "
                                                         r"number of heads \(4\), got 3"):
        model(ids, attention_mask=mask[:, :3])


def test_prune_twice_and_train_after(tiny_roberta, tiny_batch):
    model, head, _, _ = masked(tiny_roberta())
    ids, mask = tiny_batch()
    sbhf.prune(model)
    head2 = head.clone()
    head2[0, 0] = 0.0
    sbhf.set_masks(model, head_mask=head2)
    with torch.no_grad():
        masked_logits = model(ids, attention_mask=mask).logits
    sbhf.prune(model)
    assert 0 not in model.roberta.encoder.layer[0].attention.head_ids
    assert torch.equal(sbhf.get_masks(model)["head_mask"], head2)
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).logits, masked_logits) < TOL
    model.train()
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 0])).loss.backward()
    attention = model.roberta.encoder.layer[0].attention
    assert attention.self.query.weight.grad.shape[0] == attention.num_heads * attention.head_dim


def _inference_tensors(model) -> list[str]:
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_inference()]


def test_prune_and_load_pruned_under_inference_mode_give_ordinary_tensors(tmp_path, tiny_bert,
                                                                          tiny_batch):
    """prune and load_pruned called under torch.inference_mode give a model as from_pretrained
    does there: ordinary weights and gates, so it trains and its masks can be set afterwards
    (they were inference tensors: backward and set_masks failed with PyTorch's errors)."""
    model, head, mlp, _ = masked(tiny_bert())
    ids, mask = tiny_batch()
    labels = torch.tensor([0, 1, 0])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    sbhf.save_pruned(model, tmp_path / "saved")
    with torch.inference_mode():
        loaded = sbhf.load_pruned(tmp_path / "saved")
        sbhf.prune(model)
    for rebuilt in (loaded, model):
        assert _inference_tensors(rebuilt) == []
        sbhf.set_masks(rebuilt, head_mask=sbhf.get_masks(rebuilt)["head_mask"])
        with torch.no_grad():
            assert max_diff(rebuilt(ids, attention_mask=mask).logits, expected) < TOL
        rebuilt.train()
        rebuilt(ids, attention_mask=mask, labels=labels).loss.backward()


def test_pruning_twice_keeps_the_original_numbering(tiny_bert, tiny_batch):
    """Prune head 0 and neurons 0-1 of layer 0, then head 2 and neuron 5 (original numbers,
    which are no longer the current ones): the kept ids, get_masks and the logits follow
    the original numbering, as the masked unpruned model computes them."""
    model = sbhf.patch(tiny_bert(num_labels=3))
    reference = copy.deepcopy(model)
    ids, mask = tiny_batch()
    cfg = model.config
    heads = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads)
    neurons = torch.ones(cfg.num_hidden_layers, cfg.intermediate_size)
    heads[0, 0], neurons[0, :2] = 0, 0
    sbhf.set_masks(model, head_mask=heads, neuron_mask=neurons)
    sbhf.prune(model)
    heads[0, 2], neurons[0, 5] = 0, 0
    sbhf.set_masks(model, head_mask=heads, neuron_mask=neurons)
    sbhf.prune(model)
    kept = [h for h in range(cfg.num_attention_heads) if h not in (0, 2)]
    assert model.bert.encoder.layer[0].attention.head_ids == kept
    got = sbhf.get_masks(model)
    assert torch.equal(got["head_mask"], heads) and torch.equal(got["neuron_mask"], neurons)
    sbhf.set_masks(reference, head_mask=heads, neuron_mask=neurons)
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).logits,
                        reference(ids, attention_mask=mask).logits) < TOL


def test_real_minilm_prune_equals_masked(default_model_dir, tiny_batch):
    model = sbhf.patch(AutoModel.from_pretrained(str(default_model_dir)).eval())
    cfg = model.config
    head, mlp, neuron = ragged_masks(
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    )
    sbhf.set_masks(model, head_mask=head, mlp_mask=mlp, neuron_mask=neuron)
    ids, mask = tiny_batch(batch=2, seq=16, vocab=cfg.vocab_size)
    with torch.no_grad():
        masked_out = model(ids, attention_mask=mask).last_hidden_state
        pruned = sbhf.prune(model)(ids, attention_mask=mask).last_hidden_state
    assert max_diff(pruned, masked_out) < TOL


@pytest.mark.parametrize("prune_first", [True, False])
def test_save_load_round_trip(tmp_path, prune_first, tiny_bert, tiny_batch):
    model, _, _, _ = masked(tiny_bert())
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


def test_bf16_model_reloads_in_bf16(tmp_path, tiny_bert, tiny_batch):
    """A bf16 model reloads in bf16 with fp32 gates, and its outputs are the saved model's."""
    model, _, _, _ = masked(tiny_bert())
    sbhf.prune(model)
    model.to(torch.bfloat16)
    ids, mask = tiny_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    loaded = sbhf.load_pruned(sbhf.save_pruned(model, tmp_path / "bf16"))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(attn.head_gate.dtype == torch.float32 for attn, _ in sbhf.sparse_blocks(loaded))
    for key in ("head_mask", "mlp_mask", "neuron_mask"):
        assert torch.equal(sbhf.get_masks(loaded)[key], sbhf.get_masks(model)[key])
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)


def test_mixed_precision_model_reloads_each_weight_in_its_dtype(tmp_path, tiny_bert,
                                                                tiny_batch):
    """bf16 weights with fp32 LayerNorms (a common mixed-precision setup): every parameter
    reloads in its saved dtype, and the outputs are the saved model's."""
    model, _, _, _ = masked(tiny_bert())
    sbhf.prune(model)
    model.to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
    ids, mask = tiny_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    loaded = sbhf.load_pruned(sbhf.save_pruned(model, tmp_path / "mixed"))
    saved = {name: p.dtype for name, p in model.named_parameters()}
    assert {name: p.dtype for name, p in loaded.named_parameters()} == saved
    assert set(saved.values()) == {torch.bfloat16, torch.float32}
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("per_example", [False, True])
def test_override_head_gates_on_a_pruned_patched_model(per_example, tiny_bert, tiny_batch):
    """sparsebert.hf.override_head_gates takes (L, H) gates in the original numbering on a
    patched, physically pruned model: the same outputs as set_masks with those gates, and
    gradients for the remaining heads only."""
    model, head, _, _ = masked(tiny_bert())
    sbhf.prune(model)  # removes the heads masked 0
    ids, mask = tiny_batch()
    torch.manual_seed(1)
    soft = torch.rand(head.shape) * head  # removed heads: 0
    gates = soft[:, None, :].expand(-1, ids.shape[0], -1).clone() if per_example else soft
    gates.requires_grad_(True)
    with sbhf.override_head_gates(model, gates):
        got = model(ids, attention_mask=mask).logits
    got.sum().backward()
    sbhf.set_masks(model, head_mask=soft)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    removed = (head == 0)[:, None, :].expand_as(gates) if per_example else head == 0
    assert torch.all(gates.grad[removed] == 0) and gates.grad[~removed].abs().sum() > 0


def test_unpruned_save_is_a_from_pretrained_directory(tmp_path, tiny_bert, tiny_batch):
    model = sbhf.patch(tiny_bert())
    saved = sbhf.save_pruned(model, tmp_path / "full")
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    plain = BertForSequenceClassification.from_pretrained(saved, attn_implementation="eager").eval()
    ids, mask = tiny_batch()
    with torch.no_grad():
        got, want = plain(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    assert max_diff(got, want) < TOL


def test_save_load_tied_mlm_head(tmp_path, tiny_model, tiny_dims, tiny_batch):
    """Tied embeddings/decoder weights survive (safetensors dedupes shared tensors)."""
    model = sbhf.patch(tiny_model("bert", "BertForMaskedLM"))
    dims = tiny_dims
    sbhf.set_masks(model, head_mask=ragged_masks(dims.layers, dims.heads, dims.intermediate)[0])
    sbhf.prune(model)
    ids, mask = tiny_batch()
    loaded = sbhf.load_pruned(sbhf.save_pruned(model, tmp_path / "mlm"))
    with torch.no_grad():
        got, want = loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    assert max_diff(got, want) < TOL


def test_save_is_atomic(tmp_path, monkeypatch, tiny_bert):
    model, _, _, _ = masked(tiny_bert())
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
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    sbhf.save_pruned(model, target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrunedModelError, match="not a directory"):
        sbhf.save_pruned(model, tmp_path / "file", overwrite=True)


def test_save_into_unreplaceable_paths_and_a_failed_final_move(tmp_path, monkeypatch,
                                                              tiny_bert):
    """"." or a symbolic link cannot be swapped for a new directory: refused by name. A save
    whose final move fails puts the previous directory back and leaves no temporary one."""
    import os  # noqa: PLC0415

    from sparsebert.errors import SparsebertError  # noqa: PLC0415

    model, _, _, _ = masked(tiny_bert())
    target = tmp_path / "out"
    sbhf.save_pruned(model, target)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(SparsebertError, match="'.*link' cannot be replaced as a whole \\(a "
                       "symbolic link\\)"):
        sbhf.save_pruned(model, tmp_path / "link", overwrite=True)
    monkeypatch.chdir(target)
    with pytest.raises(SparsebertError, match="not a named folder"):
        sbhf.save_pruned(model, ".", overwrite=True)
    monkeypatch.chdir(tmp_path)
    real_replace = os.replace

    def failing_final_move(src, dst):
        if str(src).endswith(".out.tmp"):
            raise OSError("device busy")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_final_move)
    with pytest.raises(OSError, match="device busy"):
        sbhf.save_pruned(model, target, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out"]
    assert sbhf.load_pruned(target) is not None  # the previous save, back in place


def test_load_errors(tmp_path, tiny_model, tiny_bert):
    with pytest.raises(FileNotFoundError, match="not a directory") as info:
        sbhf.load_pruned(tmp_path / "missing")
    assert isinstance(info.value, (PrunedModelNotFoundError, SparsebertError))
    plain = tmp_path / "plain"
    tiny_model("bert").save_pretrained(plain)  # a from_pretrained directory, not a pruned one
    with pytest.raises(PrunedModelError, match="no sparsebert_pruned.json.*save_pruned"):
        sbhf.load_pruned(plain)
    model, _, _, _ = masked(tiny_bert())
    saved = sbhf.save_pruned(model, tmp_path / "bad")
    (saved / "sparsebert_pruned.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a 'sparsebert-pruned'"):
        sbhf.load_pruned(saved)


def test_prune_and_save_need_patched_model(tmp_path, tiny_model, tiny_dims):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="not patched"):
        sbhf.prune(model)
    with pytest.raises(ValueError, match="not patched"):
        sbhf.save_pruned(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    patched = sbhf.patch(copy.deepcopy(model))
    with (
        patched.encoder.layer[0].attention.override_head_gate(torch.ones(tiny_dims.heads)),
        pytest.raises(ValueError, match="override"),
    ):
        sbhf.prune(patched)


# --------------------------------------------------------------------------------------------
# Tampered directories: every inconsistency is found before a model is built
# --------------------------------------------------------------------------------------------
def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _tamper_layer(i, edit):
    """A tampering of the directory: edit(entry) on layers[i] of sparsebert_pruned.json."""
    return lambda d: _edit_json(d / "sparsebert_pruned.json", lambda p: edit(p["layers"][i]))


def _consistent_heads(entry):
    """All four heads back in a layer whose heads were all removed: the description agrees
    with itself and the config, but not with the weights (the old 'size of tensor a' case)."""
    entry.update(num_heads=4, head_ids=[0, 1, 2, 3], head_gate=[1.0] * 4)


def _retype_weight(directory: Path, name: str, shape) -> None:
    tensors = load_file(directory / "model.safetensors")
    tensors[name] = torch.zeros(shape)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


LAYER0_Q = "bert.encoder.layer.0.attention.self.query.weight"
LAYER1_Q = "bert.encoder.layer.1.attention.self.query.weight"
LAYER0_FFN = "bert.encoder.layer.0.intermediate.dense.weight"
LAYER0_FFN_BIAS = "bert.encoder.layer.0.intermediate.dense.bias"

# case -> (edit(directory, description), regex the one-line message must match)
TAMPERING = {
    "config_layers": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=2)),
        r"sparsebert_pruned.json has 3 layers but config.json num_hidden_layers is 2",
    ),
    "config_heads": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(num_attention_heads=8)),
        r"layers\[0\].head_dim is 8 but config.json gives 4",
    ),
    "config_fewer_heads": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(num_attention_heads=1)),
        r"layers\[0\].num_heads is \d but config.json num_attention_heads is 1",
    ),
    "config_intermediate": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(intermediate_size=10)),
        r"layers\[0\].intermediate_size is \d+ but config.json intermediate_size is 10",
    ),
    "config_intermediate_ids": (  # sizes fit, but the kept neuron ids do not
        lambda d: _edit_json(d / "config.json", lambda c: c.update(intermediate_size=30)),
        r"layers\[0\].neuron_ids\[\d+\] is 3\d; ids must be ints in \[0, 30\)",
    ),
    "config_hidden": (
        lambda d: _edit_json(
            d / "config.json", lambda c: c.update(hidden_size=64, num_attention_heads=8)
        ),
        rf"model.safetensors {LAYER0_Q} has shape \(\d+, 32\), expected \(\d+, 64\)",
    ),
    "config_zero_heads": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(num_attention_heads=0)),
        r"config.json num_attention_heads must be a positive int, got 0",
    ),
    "config_wrong_type": (  # huggingface_hub's field validation, not a ValueError
        lambda d: _edit_json(d / "config.json", lambda c: c.update(hidden_size="abc")),
        r"config.json cannot be read: .*'hidden_size'.* expected int, got str",
    ),
    "config_unknown_activation": (  # a KeyError building the model
        lambda d: _edit_json(d / "config.json", lambda c: c.update(hidden_act="nonsense")),
        r"config.json hidden_act 'nonsense': expected one of transformers' \d+ activations, "
        r"e.g. .*\bgelu\b.*\brelu\b.*\bsilu\b.*\btanh\b",  # not only GELU's variants
    ),
    "config_model_type": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(model_type="roberta")),
        r"config.json model_type 'roberta' != sparsebert_pruned.json model_type 'bert'",
    ),
    "config_missing": (lambda d: (d / "config.json").unlink(), r"has no config.json"),
    "config_garbage": (
        lambda d: (d / "config.json").write_text("{"),
        r"config.json cannot be read",
    ),
    "num_layers": (
        lambda d: _edit_json(d / "sparsebert_pruned.json", lambda p: p.update(num_layers=4)),
        r"num_layers is 4 but 'layers' has 3 entries",
    ),
    "layer_dropped": (
        lambda d: _edit_json(
            d / "sparsebert_pruned.json", lambda p: p.update(layers=p["layers"][:2], num_layers=2)
        ),
        r"has 2 layers but config.json num_hidden_layers is 3",
    ),
    "layer_key_missing": (
        _tamper_layer(2, lambda e: e.pop("mlp_gate")),
        r"layers\[2\] lacks mlp_gate",
    ),
    "head_ids_extra": (
        _tamper_layer(2, lambda e: e["head_ids"].append(0)),
        r"layers\[2\].head_ids has \d ids but num_heads is \d",
    ),
    "head_ids_range": (
        _tamper_layer(0, lambda e: e["head_ids"].__setitem__(0, 4)),
        r"layers\[0\].head_ids\[0\] is 4; ids must be ints in \[0, 4\) "
        r"\(config.json num_attention_heads = 4\)",
    ),
    "head_ids_repeated": (
        _tamper_layer(0, lambda e: e.update(head_ids=[e["head_ids"][0]] * len(e["head_ids"]))),
        r"layers\[0\].head_ids\[1\] repeats id 0",
    ),
    "head_ids_not_ints": (
        _tamper_layer(0, lambda e: e["head_ids"].__setitem__(0, "a")),
        r"layers\[0\].head_ids\[0\] is 'a'",
    ),
    "head_ids_bool": (  # JSON true is no id, although Python counts it as 1
        _tamper_layer(0, lambda e: e["head_ids"].__setitem__(0, True)),
        r"layers\[0\].head_ids\[0\] is True; ids must be ints",
    ),
    "num_heads_negative": (
        _tamper_layer(0, lambda e: e.update(num_heads=-1)),
        r"layers\[0\].num_heads is -1 but config.json num_attention_heads is 4 "
        r"\(expected an int in \[0, 4\]\)",
    ),
    "neuron_ids_short": (
        _tamper_layer(0, lambda e: e["neuron_ids"].pop()),
        r"layers\[0\].neuron_ids has \d+ ids but intermediate_size is \d+",
    ),
    "neuron_ids_range": (
        _tamper_layer(0, lambda e: e["neuron_ids"].__setitem__(-1, 37)),
        r"layers\[0\].neuron_ids\[\d+\] is 37; ids must be ints in \[0, 37\)",
    ),
    "head_gate_length": (
        _tamper_layer(0, lambda e: e["head_gate"].pop()),
        r"layers\[0\].head_gate has \d values but num_heads is \d",
    ),
    "head_gate_negative": (
        _tamper_layer(0, lambda e: e["head_gate"].__setitem__(0, -0.5)),
        r"layers\[0\].head_gate\[0\] is -0.5; gates lie in \[0, 1\]",
    ),
    "head_gate_not_a_list": (
        _tamper_layer(0, lambda e: e.update(head_gate="ones")),
        r"layers\[0\].head_gate must be a list of numbers, got str",
    ),
    "mlp_gate_value": (
        _tamper_layer(0, lambda e: e.update(mlp_gate=1.5)),
        r"layers\[0\].mlp_gate is 1.5; gates lie in \[0, 1\]",
    ),
    "neuron_gate_value": (
        _tamper_layer(0, lambda e: e["neuron_gate"].__setitem__(0, 2.0)),
        r"layers\[0\].neuron_gate\[0\] is 2.0; gates lie in \[0, 1\]",
    ),
    "head_dim": (
        _tamper_layer(0, lambda e: e.update(head_dim=16)),
        r"layers\[0\].head_dim is 16 but config.json gives 8",
    ),
    "heads_restored_without_weights": (
        _tamper_layer(1, _consistent_heads),
        rf"model.safetensors lacks {LAYER1_Q} \(sparsebert_pruned.json layers\[1\].num_heads = 4\)",
    ),
    "weights_reshaped": (
        lambda d: _retype_weight(d, LAYER0_FFN, (5, 32)),
        rf"model.safetensors {LAYER0_FFN} has shape \(5, 32\), expected \(\d+, 32\) from "
        r"sparsebert_pruned.json layers\[0\].intermediate_size = \d+",
    ),
    "bias_reshaped": (
        lambda d: _retype_weight(d, LAYER0_FFN_BIAS, (5,)),
        rf"model.safetensors {LAYER0_FFN_BIAS} has shape \(5,\), expected \(\d+,\) from "
        r"sparsebert_pruned.json layers\[0\].intermediate_size = \d+",
    ),
    "weights_for_removed_heads": (
        lambda d: _retype_weight(d, LAYER1_Q, (32, 32)),
        rf"model.safetensors holds {LAYER1_Q}, but sparsebert_pruned.json "
        r"layers\[1\].num_heads = 0",
    ),
    "weights_missing": (lambda d: (d / "model.safetensors").unlink(), r"has no model.safetensors"),
    "weights_garbage": (
        lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file"),
        r"model.safetensors is not a readable safetensors file",
    ),
    "version": (
        lambda d: _edit_json(d / "sparsebert_pruned.json", lambda p: p.update(version=2)),
        r"sparsebert_pruned.json has version 2; this sparsebert reads 1",
    ),
    "not_json": (
        lambda d: (d / "sparsebert_pruned.json").write_text("{"),
        r"sparsebert_pruned.json is not valid JSON",
    ),
}


@pytest.fixture(scope="module")
def saved_pruned(tmp_path_factory, tiny_bert) -> Path:
    """A pruned tiny BERT (ragged masks) saved once; each test tampers with a copy."""
    model, _, _, _ = masked(tiny_bert())
    sbhf.prune(model)
    return sbhf.save_pruned(model, tmp_path_factory.mktemp("saved") / "pruned")


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_directory_is_rejected_up_front(case, saved_pruned, tmp_path, monkeypatch):
    tamper, needle = TAMPERING[case]
    directory = tmp_path / "pruned"
    directory.mkdir()
    for file in saved_pruned.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    assert sbhf.load_pruned(directory) is not None  # the untouched copy loads
    tamper(directory)

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built from an inconsistent directory")

    monkeypatch.setattr(serialization, "patch", no_build)
    with pytest.raises(PrunedModelError) as info:
        sbhf.load_pruned(directory)
    message = str(info.value)
    assert isinstance(info.value, SparsebertError) and isinstance(info.value, ValueError)
    assert message.startswith("load_pruned: ") and "\n" not in message
    assert str(directory) in message, message  # which of a sweep's many model/ folders
    assert len(message) < 300 + len(str(directory)), message
    monkeypatch.chdir(tmp_path)  # a relative folder whose name is part of a file's name
    with pytest.raises(PrunedModelError, match=r"^load_pruned: pruned(: | has no )"):
        sbhf.load_pruned("pruned")
    assert re.search(needle, message), message


def test_compiled_model_saves_as_its_model(tmp_path, tiny_bert, tiny_batch):
    """save_pruned(torch.compile(model)) writes the model itself (no _orig_mod. keys, its own
    architecture), so load_pruned rebuilds it."""
    model, _, _, _ = masked(tiny_bert())
    saved = sbhf.save_pruned(torch.compile(model), tmp_path / "compiled")
    assert json.loads((saved / "sparsebert_pruned.json").read_text())["architecture"] == (
        type(model).__name__)
    ids, mask = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(sbhf.load_pruned(saved)(ids, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits)


def test_accelerated_model_saves_as_its_model(tmp_path, tiny_bert, tiny_batch):
    """save_pruned(accelerate(model)) wrote architecture 'AcceleratedModel' and 'model.'-prefixed
    weights, which no load_pruned call could read back."""
    from sparsebert.speed import accelerate  # noqa: PLC0415

    model, _, _, _ = masked(tiny_bert())
    saved = sbhf.save_pruned(accelerate(model), tmp_path / "accelerated")
    assert json.loads((saved / "sparsebert_pruned.json").read_text())["architecture"] == (
        type(model).__name__)
    assert not any(key.startswith("model.") for key in load_file(saved / "model.safetensors"))
    ids, mask = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(sbhf.load_pruned(saved)(ids, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits)


def test_load_pruned_names_a_wrong_model_class(tmp_path, tiny_bert):
    from transformers import BertModel, RobertaModel  # noqa: PLC0415

    saved = sbhf.save_pruned(masked(tiny_bert())[0], tmp_path / "saved")
    with pytest.raises(PrunedModelError, match="model_class must be a transformers model class"):
        sbhf.load_pruned(saved, model_class="BertModel")
    with pytest.raises(PrunedModelError, match="RobertaModel is for model_type 'roberta'.*"
                                               "holds a 'bert' model"):
        sbhf.load_pruned(saved, model_class=RobertaModel)
    with pytest.raises(PrunedModelError, match="saved as BertForSequenceClassification, built as "
                                               "BertModel"):
        sbhf.load_pruned(saved, model_class=BertModel)


def test_load_pruned_onto_a_device(tmp_path, tiny_bert):
    """device= moves the rebuilt model, gates included (the meta device stands in for an
    accelerator here); the sizes are the saved ones."""
    model, _, _, _ = masked(tiny_bert())
    sbhf.prune(model)
    loaded = sbhf.load_pruned(sbhf.save_pruned(model, tmp_path / "pruned"), device="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}
    assert {b.device.type for b in loaded.buffers()} == {"meta"}
    assert sbhf.layer_sizes(loaded) == sbhf.layer_sizes(model) and not loaded.training


def test_prune_refuses_quantized_linears_before_slicing_any_layer(tiny_bert):
    """quantize_dynamic after patch: prune refuses with the order that works, and changes no
    layer (it had removed layer 0's heads when layer 1's quantized linears failed)."""
    from sparsebert.hf.structure import UnsupportedModelError  # noqa: PLC0415

    model = sbhf.patch(tiny_bert())
    head_mask = torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads)
    head_mask[0] = 0  # removed whole: nothing to slice
    head_mask[1, 1] = 0  # sliced
    sbhf.set_masks(model, head_mask=head_mask)
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    before = sbhf.layer_sizes(model)
    with pytest.raises(UnsupportedModelError,
                       match=r"layer 1's query projection .*quantized.*\(or quantize\) after"):
        sbhf.prune(model)
    assert sbhf.layer_sizes(model) == before


class _Adapter(torch.nn.Linear):
    """A LoRA-style adapter: the base weight plus a low-rank delta (as peft's layer computes)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        gen = torch.Generator().manual_seed(3)
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=gen))
        self.up = torch.nn.Parameter(torch.randn(base.out_features, rank, generator=gen))

    def forward(self, x):
        return super().forward(x) + x @ self.down.T @ self.up.T


@pytest.mark.parametrize("wrap", ["adapter", "hook", "parametrization", "torch-prune"])
def test_prune_refuses_projections_slicing_would_drop(wrap, tiny_bert, tiny_batch):
    """An adapter, hook, parametrization or torch.nn.utils.prune mask on a projection that
    would be sliced: prune put a plain sliced nn.Linear in its place, silently dropping the
    adapter's delta (outputs off the masked model's) or the hook / constraint. It refuses now,
    naming the projection, and changes nothing; masked outputs are the adapter's."""
    from sparsebert.hf.structure import UnsupportedModelError  # noqa: PLC0415

    model = sbhf.patch(tiny_bert()).eval()
    head_mask = torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads)
    head_mask[0] = 0
    head_mask[1, 2] = 0
    sbhf.set_masks(model, head_mask=head_mask)
    attention = model.bert.encoder.layer[1].attention
    query = attention.self.query
    if wrap == "adapter":
        attention.self.query = _Adapter(query)
    elif wrap == "hook":
        query.register_forward_hook(lambda module, args, out: out * 2)
    elif wrap == "parametrization":
        torch.nn.utils.parametrize.register_parametrization(
            query, "weight", torch.nn.Identity())
    else:
        from torch.nn.utils import prune as torch_prune  # noqa: PLC0415

        torch_prune.l1_unstructured(query, "weight", amount=0.5)
    ids, mask = tiny_batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    before = sbhf.layer_sizes(model)
    with pytest.raises(UnsupportedModelError, match=r"layer 1's query projection .*nothing was"):
        sbhf.prune(model)
    assert sbhf.layer_sizes(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)


@pytest.mark.parametrize("wrap", ["adapter", "torch-prune"])
def test_save_pruned_refuses_weights_load_pruned_could_not_read(wrap, tiny_bert, tmp_path):
    """An adapter (weights saved as query.base_layer.weight, as peft's) or a pruning mask
    (query.weight_orig): save_pruned wrote them, and load_pruned then failed with "lacks
    ...query.weight". It refuses at save time, naming the projection, and writes nothing."""
    model = sbhf.patch(tiny_bert())
    attention = model.bert.encoder.layer[0].attention
    if wrap == "adapter":
        attention.self.query = _Adapter(attention.self.query)
    else:
        from torch.nn.utils import prune as torch_prune  # noqa: PLC0415

        torch_prune.l1_unstructured(attention.self.query, "weight", amount=0.5)
    with pytest.raises(PrunedModelError, match=r"layer 0's query projection .*merge adapters"):
        sbhf.save_pruned(model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
