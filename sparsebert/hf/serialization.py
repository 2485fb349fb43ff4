"""Save and reload physically pruned (or merely masked) patched models.

A saved directory is laid out as save_pretrained's plus one file (sparsebert.hf.pruned_format);
reload it with `load_pruned`: plain `from_pretrained` drops the gates, re-initialises removed
MLPs and attention layers and refuses layers that lost some heads or neurons (a size mismatch;
only an unmasked, unpruned save reloads the same there):
    config.json               the model config (save_pretrained's format; original sizes)
    model.safetensors         the weights under the usual HF names, with per-layer shapes
    sparsebert_pruned.json    format/version, architecture, per-layer sizes, kept head/neuron ids,
                              gates, and the masks in the original numbering
`load_pruned` first checks that the three files agree (description vs config.json vs the weight
shapes in the safetensors header), then rebuilds the architecture from config.json, patches it,
shrinks each layer to the recorded sizes and loads the weights strictly. Saving is atomic
(sparsebert.atomic.atomic_save_dir): the directory is built under a temporary name and moved
into place only when complete.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from sparsebert.atomic import atomic_save_dir
from sparsebert.hf.loading import config_value_errors, config_value_problem, error_text
from sparsebert.hf.masks import get_masks
from sparsebert.hf.patching import patch, sparse_blocks
from sparsebert.hf.pruned_format import (
    CONFIG_FILE,
    FORMAT,
    PRUNED_JSON,
    VERSION,
    WEIGHTS_FILE,
    PrunedModelError,
    PrunedModelNotFoundError,
    check_description,
    check_weight_shapes,
    config_sizes,
    float_dtypes,
    read_description,
    weights_dtype,
)
from sparsebert.hf.structure import STRUCTURES, structure_for
from sparsebert.nn.common import layer_linears

__all__ = [
    "FORMAT",
    "PRUNED_JSON",
    "VERSION",
    "WEIGHTS_FILE",
    "PrunedModelError",
    "PrunedModelNotFoundError",
    "load_pruned",
    "save_pruned",
]


def _check_plain_weights(blocks: list) -> None:
    """Every projection an nn.Linear itself holding its `weight` parameter: load_pruned reads
    the weights under their plain names (`...query.weight`), where an adapter (peft's LoRA
    layer: `query.base_layer.weight`), a quantized or parametrized linear, or a
    torch.nn.utils.prune mask (`weight_orig`) saves others."""
    for layer, (attn, mlp) in enumerate(blocks):
        for name, linear in layer_linears(attn, mlp).items():
            if linear is not None and (type(linear) is not nn.Linear
                                       or "weight" not in linear._parameters):
                raise PrunedModelError(
                    f"save_pruned: layer {layer}'s {name} projection "
                    f"({type(linear).__module__}.{type(linear).__name__}) is not a plain "
                    f"nn.Linear with its own weight (an adapter, a quantized or parametrized "
                    f"linear, or a torch.nn.utils.prune mask), whose weights load_pruned could not "
                    f"read back: merge adapters first (peft: merge_and_unload), make pruning masks "
                    f"permanent (torch.nn.utils.prune.remove), or save before wrapping")


def _describe(model: nn.Module) -> dict[str, Any]:
    """The JSON description of a patched model: sizes, ids, gates and masks per layer."""
    masks = get_masks(model)
    layers = []
    blocks = sparse_blocks(model)
    _check_plain_weights(blocks)
    for attn, mlp in blocks:
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


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and sparsebert.accelerate's wrappers (in any nesting)."""
    from sparsebert.speed.accelerate import AcceleratedModel  # speed imports hf: not at the top

    while True:
        if isinstance(model, AcceleratedModel):
            model = model.model
        elif isinstance(model, nn.Module) and "_orig_mod" in model._modules:
            model = model._orig_mod
        else:
            return model


def save_pruned(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a patched (pruned or masked) model to directory `path`; returns the path.

    Raises FileExistsError if `path` exists and overwrite is False. Nothing is left at `path`
    (and no temporary directory remains) if any step fails; with overwrite=True a failed save
    leaves the previous directory as it was.
    """
    target = Path(_checked_path("save_pruned", path))
    model = _unwrapped(model)
    description = _describe(model)  # validates: patched, supported
    if target.exists() and not overwrite:
        raise FileExistsError(f"save_pruned: {target} exists (pass overwrite=True to replace it)")
    if target.exists() and not target.is_dir():
        raise PrunedModelError(f"save_pruned: {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        # Config (original sizes), weights, then the description, into a fresh directory.
        tmp.mkdir()
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / PRUNED_JSON).write_text(json.dumps(description, indent=1))

    atomic_save_dir(target, write)
    return target


def _model_class(description: dict[str, Any], model_class: type | None, config) -> type:
    if model_class is not None:
        from transformers import PreTrainedModel  # heavy; only needed here

        if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
            raise PrunedModelError(
                f"load_pruned: model_class must be a transformers model class (e.g. "
                f"{description.get('architecture') or 'BertForSequenceClassification'}), got "
                f"{model_class!r}")
        wanted = getattr(getattr(model_class, "config_class", None), "model_type", None)
        if wanted and wanted != config.model_type:
            raise PrunedModelError(
                f"load_pruned: model_class {model_class.__name__} is for model_type "
                f"{wanted!r}; the directory holds a {config.model_type!r} model (saved as "
                f"{description.get('architecture')})")
        return model_class
    import transformers  # heavy; only needed here

    name = description.get("architecture", "")
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None:
        raise PrunedModelError(
            f"load_pruned: {PRUNED_JSON} architecture {name!r} is not a transformers class; "
            "pass model_class="
        )
    return cls


@torch.no_grad()
def _shrink(model: nn.Module, description: dict[str, Any]) -> None:
    """Resize each patched layer to the recorded sizes and restore ids and gates (the
    description was checked against the config by check_description)."""
    for (attn, mlp), entry in zip(sparse_blocks(model), description["layers"]):
        if entry["num_heads"] < attn.num_heads:
            attn.select_heads(range(entry["num_heads"]))
        if entry["intermediate_size"] < mlp.intermediate_size:
            mlp.select_neurons(range(entry["intermediate_size"]))
        attn.head_ids = [int(h) for h in entry["head_ids"]]
        mlp.neuron_ids = [int(n) for n in entry["neuron_ids"]]
        attn.head_gate.copy_(torch.tensor(entry["head_gate"], dtype=torch.float32))
        mlp.mlp_gate.fill_(float(entry["mlp_gate"]))
        mlp.neuron_gate.copy_(torch.tensor(entry["neuron_gate"], dtype=torch.float32))


def _read_config(root: Path, description: dict[str, Any]):
    """config.json as a HF config, its model_type matching the description's (supported)."""
    from transformers import AutoConfig  # heavy; only needed here

    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError, *config_value_errors()) as error:
        raise PrunedModelError(
            f"load_pruned: {CONFIG_FILE} cannot be read: {error_text(error, 160)}") from None
    if config.model_type != description.get("model_type"):
        raise PrunedModelError(
            f"load_pruned: {CONFIG_FILE} model_type {config.model_type!r} != {PRUNED_JSON} "
            f"model_type {str(description.get('model_type'))[:40]!r}"
        )
    if config.model_type not in STRUCTURES:
        raise PrunedModelError(
            f"load_pruned: model_type {config.model_type!r} is not supported (supported: "
            f"{', '.join(sorted(STRUCTURES))})"
        )
    return config


def _cast_to_saved(model: nn.Module, saved: dict[str, torch.dtype]) -> None:
    """Each floating parameter and buffer named in `saved` takes its saved dtype, in place
    (a tied parameter stays one object, so it stays tied)."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            dtype = saved.get(prefix + name)
            if dtype is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            dtype = saved.get(prefix + name)
            if dtype is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(module, name, buffer.to(dtype))


def _checked_path(function: str, path: object) -> str | os.PathLike:
    """`path` when it is a str or os.PathLike; else TypeError naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{function}: 'path' must be a str or os.PathLike (a directory), got "
                        f"{type(path).__name__}")
    return path


def _checked_device(device: object) -> torch.device:
    """`device` as a torch.device that exists here; else ValueError naming it."""
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"load_pruned: 'device' {device!r}: expected a torch device (cpu, "
                         f"cuda, cuda:N)") from None
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_pruned: 'device' {device!r}: no CUDA device is visible here")
    return checked


def load_pruned(
    path: str | os.PathLike,
    *,
    model_class: type | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Rebuild a model saved by `save_pruned` (patched, pruned, gates restored, eval mode,
    each weight in its saved dtype).

    model_class: the HF class to build (default: the saved architecture, e.g.
    BertForSequenceClassification). Before anything is built, the description is checked
    against config.json (layers; per layer: sizes, head/neuron ids, gate lists, head_dim) and
    the recorded sizes against the weight shapes in model.safetensors' header.
    Raises PrunedModelNotFoundError (a FileNotFoundError) for a missing directory and
    PrunedModelError (a SparsebertError, hence ValueError) for anything wrong inside it.
    """
    root = Path(_checked_path("load_pruned", path))
    if device is not None:  # checked before a model is built
        device = _checked_device(device)
    try:
        with torch.inference_mode(False):  # ordinary tensors (trainable, gates writable), as
            return _load_pruned(root, model_class, device)  # from_pretrained's, in any mode
    except PrunedModelNotFoundError:
        raise  # (names the folder)
    except PrunedModelError as error:  # name the folder: a sweep reloads many model/ folders
        message = str(error)
        if message.startswith(f"load_pruned: {root}"):
            raise
        message = message.removeprefix("load_pruned: ")
        raise PrunedModelError(f"load_pruned: {root}: {message}") from None


def _load_pruned(root: Path, model_class: type | None, device: torch.device | str | None,
                 ) -> nn.Module:
    # Step 1: read the description and the config; check them against each other.
    description = read_description(root)
    config = _read_config(root, description)
    row = STRUCTURES[config.model_type]
    sizes = config_sizes(config, row)
    check_description(description, sizes, row.config)
    # Step 2: the recorded sizes against the weight shapes (header only, no tensor read).
    check_weight_shapes(root / WEIGHTS_FILE, description, sizes, row)
    problem = config_value_problem(config)  # (other values the build would fail on inside)
    if problem is not None:
        raise PrunedModelError(f"load_pruned: {problem}")
    # Step 3: build (in the saved weights' dtype: a bf16 model reloads as bf16), patch, shrink,
    # load.
    model = _model_class(description, model_class, config)(config)
    structure_for(model)  # clear error for a model_class of an unsupported type
    dtype = weights_dtype(root / WEIGHTS_FILE)
    if dtype is not None:
        model.to(dtype)  # before patch: the gates stay fp32, as when a bf16 model is patched
    patch(model)
    _shrink(model, description)
    if dtype is None:  # mixed precision (e.g. bf16 weights, fp32 LayerNorms): tensor by tensor
        _cast_to_saved(model, float_dtypes(root / WEIGHTS_FILE))
    try:
        load_model(model, root / WEIGHTS_FILE, strict=True)
    except RuntimeError as error:
        text = " ".join(str(error).split())
        built = type(model).__name__
        saved = description.get("architecture")
        hint = (f" (saved as {saved}, built as {built}: pass model_class={saved} or leave it "
                f"out)" if saved and saved != built else "")
        raise PrunedModelError(
            f"load_pruned: {WEIGHTS_FILE} does not fit the model built from {CONFIG_FILE}"
            f"{hint}: {text[:200]}"
        ) from None
    model.eval()
    return model if device is None else model.to(device)
