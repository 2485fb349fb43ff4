"""Save and reload physically pruned (or merely masked) patched models.

A saved directory is from_pretrained-style plus one file:
    config.json               the model config (save_pretrained's format; original sizes)
    model.safetensors         the weights under the usual HF names, with per-layer shapes
    sparsebert_pruned.json    format/version, architecture, per-layer sizes, kept head/neuron ids,
                              gates, and the masks in the original numbering
`load_pruned` rebuilds the architecture from config.json, patches it, shrinks each layer to the
recorded sizes, then loads the weights strictly. Saving is atomic: everything is written to a
temporary sibling directory which is renamed onto the target only when complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from sparsebert.hf.masks import get_masks
from sparsebert.hf.patching import patch, sparse_blocks
from sparsebert.hf.structure import structure_for

PRUNED_JSON = "sparsebert_pruned.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "sparsebert-pruned"
VERSION = 1


def _describe(model: nn.Module) -> dict[str, Any]:
    """The JSON description of a patched model: sizes, ids, gates and masks per layer."""
    masks = get_masks(model)
    layers = []
    for attn, mlp in sparse_blocks(model):
        layers.append(
            {
                "num_heads": attn.num_heads,
                "head_dim": attn.head_dim,
                "intermediate_size": mlp.intermediate_size,
                "head_ids": list(attn.head_ids),
                "neuron_ids": list(mlp.neuron_ids),
                "head_gate": attn.head_gate.detach().float().cpu().tolist(),
                "mlp_gate": float(mlp.mlp_gate),
                "neuron_gate": mlp.neuron_gate.detach().float().cpu().tolist(),
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "num_layers": len(layers),
        "layers": layers,
        "masks": {"head_mask": masks["head_mask"].tolist(), "mlp_mask": masks["mlp_mask"].tolist()},
    }


def save_pruned(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a patched (pruned or masked) model to directory `path`; returns the path.

    Raises FileExistsError if `path` exists and overwrite is False. Nothing is left at `path`
    (and no temporary directory remains) if any step fails.
    """
    description = _describe(model)  # validates: patched, supported
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"save_pruned: {target} exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        # Step 1: config (original sizes), weights, then the description, into the temp dir.
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / PRUNED_JSON).write_text(json.dumps(description, indent=1))
        # Step 2: move it into place (an existing target is swapped out, then removed).
        if target.exists():
            backup = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
            )
            backup.rmdir()
            os.rename(target, backup)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _read_description(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"load_pruned: {path} is not a directory")
    file = path / PRUNED_JSON
    if not file.is_file():
        raise ValueError(
            f"load_pruned: {path} has no {PRUNED_JSON}, so it is not a sparsebert pruned-model directory "
            "(write one with sparsebert.save_pruned; load plain checkpoints with from_pretrained)"
        )
    try:
        description = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"load_pruned: {file} is not valid JSON: {error}") from error
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ValueError(f"load_pruned: {file} is not a {FORMAT!r} description")
    if description.get("version") != VERSION:
        raise ValueError(
            f"load_pruned: {file} has version {description.get('version')}; this sparsebert reads {VERSION}"
        )
    return description


def _model_class(description: dict[str, Any], model_class: type | None) -> type:
    if model_class is not None:
        return model_class
    import transformers  # heavy; only needed here

    name = description.get("architecture", "")
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None:
        raise ValueError(f"load_pruned: unknown architecture {name!r}; pass model_class=")
    return cls


@torch.no_grad()
def _shrink(model: nn.Module, description: dict[str, Any]) -> None:
    """Resize each patched layer to the recorded sizes and restore ids and gates."""
    blocks = sparse_blocks(model)
    layers = description["layers"]
    if len(layers) != len(blocks):
        raise ValueError(
            f"load_pruned: description has {len(layers)} layers, the config builds {len(blocks)}"
        )
    for index, ((attn, mlp), entry) in enumerate(zip(blocks, layers)):
        if (
            entry["head_dim"] != attn.head_dim
            or entry["num_heads"] > attn.num_heads
            or entry["intermediate_size"] > mlp.intermediate_size
        ):
            raise ValueError(
                f"load_pruned: layer {index} sizes {entry} do not fit the configured model"
            )
        if entry["num_heads"] < attn.num_heads:
            attn.select_heads(range(entry["num_heads"]))
        if entry["intermediate_size"] < mlp.intermediate_size:
            mlp.select_neurons(range(entry["intermediate_size"]))
        attn.head_ids = [int(h) for h in entry["head_ids"]]
        mlp.neuron_ids = [int(n) for n in entry["neuron_ids"]]
        attn.head_gate.copy_(torch.tensor(entry["head_gate"], dtype=torch.float32))
        mlp.mlp_gate.fill_(float(entry["mlp_gate"]))
        mlp.neuron_gate.copy_(torch.tensor(entry["neuron_gate"], dtype=torch.float32))


def load_pruned(
    path: str | os.PathLike,
    *,
    model_class: type | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Rebuild a model saved by `save_pruned` (patched, pruned, gates restored, eval mode).

    model_class: the HF class to build (default: the saved architecture, e.g.
    BertForSequenceClassification). Raises ValueError if `path` lacks the pruned-model JSON.
    """
    from transformers import AutoConfig

    root = Path(path)
    description = _read_description(root)
    config = AutoConfig.from_pretrained(root, local_files_only=True)
    if config.model_type != description.get("model_type"):
        raise ValueError(
            f"load_pruned: config.json model_type {config.model_type!r} != description "
            f"{description.get('model_type')!r}"
        )
    model = _model_class(description, model_class)(config)
    structure_for(model)  # clear error for an unsupported type
    patch(model)
    _shrink(model, description)
    load_model(model, root / WEIGHTS_FILE, strict=True)
    model.eval()
    return model if device is None else model.to(device)
