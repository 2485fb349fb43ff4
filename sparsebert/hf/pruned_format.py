"""The pruned-model directory format, and its checks before anything is built from it.

    config.json               the model config (save_pretrained's format; original sizes)
    model.safetensors         the weights under the usual HF names, with per-layer shapes
    sparsebert_pruned.json    {"format": "sparsebert-pruned", "version": 1, "model_type",
                              "architecture", "num_layers", "layers": [{"num_heads", "head_dim",
                              "intermediate_size", "head_ids", "neuron_ids", "head_gate",
                              "mlp_gate", "neuron_gate"}, ...], "masks": {...}}

`check_description` holds the description against config.json (layer count, per-layer sizes, ids
and gate lists) and `check_weight_shapes` holds the recorded sizes against the tensor shapes in
the safetensors header (no tensor is read). Errors are PrunedModelError: one short line naming
the file and the field, never a dump of id lists.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sparsebert.errors import SparsebertError
from sparsebert.hf.structure import ModelStructure

PRUNED_JSON = "sparsebert_pruned.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "sparsebert-pruned"
VERSION = 1

LAYER_KEYS = (
    "num_heads",
    "head_dim",
    "intermediate_size",
    "head_ids",
    "neuron_ids",
    "head_gate",
    "mlp_gate",
    "neuron_gate",
)


class PrunedModelError(SparsebertError):
    """A pruned-model directory that cannot be loaded: missing or damaged files, or files that
    do not agree with each other (description vs config.json vs weight shapes)."""


class PrunedModelNotFoundError(PrunedModelError, FileNotFoundError):
    """The pruned-model directory does not exist (also a FileNotFoundError)."""


def _short(value: Any, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters (never a whole id list in a message)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


# --------------------------------------------------------------------------------------------
# The description file
# --------------------------------------------------------------------------------------------
def read_description(path: Path) -> dict[str, Any]:
    """The parsed sparsebert_pruned.json of directory `path` (format and version checked)."""
    if not path.is_dir():
        raise PrunedModelNotFoundError(f"load_pruned: {path} is not a directory")
    file = path / PRUNED_JSON
    if not file.is_file():
        raise PrunedModelError(
            f"load_pruned: {path} has no {PRUNED_JSON}, so it is not a sparsebert pruned-model "
            "directory (write one with sparsebert.save_pruned; load plain checkpoints with "
            "from_pretrained)"
        )
    try:
        description = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PrunedModelError(f"load_pruned: {PRUNED_JSON} is not valid JSON: {error}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise PrunedModelError(f"load_pruned: {PRUNED_JSON} is not a {FORMAT!r} description")
    if description.get("version") != VERSION:
        raise PrunedModelError(
            f"load_pruned: {PRUNED_JSON} has version {_short(description.get('version'))}; "
            f"this sparsebert reads {VERSION}"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise PrunedModelError(f"load_pruned: {path} has no {name}")
    return description


_FIELD_OF = {
    "layers": "num_layers",
    "heads": "num_heads",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
}


def config_sizes(config, row: ModelStructure) -> dict[str, int]:
    """Unpruned sizes from a HF config: layers, heads, head_dim, hidden, intermediate."""
    fields = row.config
    sizes = {
        "layers": getattr(config, fields.num_layers),
        "heads": getattr(config, fields.num_heads),
        "hidden": getattr(config, fields.hidden_size),
        "intermediate": getattr(config, fields.intermediate_size),
    }
    for key, value in sizes.items():
        if not _is_int(value) or value < 1:
            raise PrunedModelError(
                f"load_pruned: {CONFIG_FILE} {getattr(fields, _FIELD_OF[key])} must be a "
                f"positive int, got {_short(value)}"
            )
    sizes["head_dim"] = sizes["hidden"] // sizes["heads"]
    return sizes


def _check_ids(where: str, ids: Any, count: int, count_name: str, limit: int, limit_name: str):
    """ids: a list of `count` distinct ints in [0, limit)."""
    if not isinstance(ids, list):
        raise PrunedModelError(f"{where} must be a list of ints, got {type(ids).__name__}")
    if len(ids) != count:
        raise PrunedModelError(f"{where} has {len(ids)} ids but {count_name} is {count}")
    seen: set[int] = set()
    for index, value in enumerate(ids):
        if not _is_int(value) or not 0 <= value < limit:
            raise PrunedModelError(
                f"{where}[{index}] is {_short(value)}; ids must be ints in [0, {limit}) "
                f"({CONFIG_FILE} {limit_name} = {limit})"
            )
        if value in seen:
            raise PrunedModelError(f"{where}[{index}] repeats id {value}; ids must be distinct")
        seen.add(value)


def _check_gates(where: str, gates: Any, count: int, count_name: str) -> None:
    """gates: a list of `count` finite numbers in [0, 1]."""
    if not isinstance(gates, list):
        raise PrunedModelError(f"{where} must be a list of numbers, got {type(gates).__name__}")
    if len(gates) != count:
        raise PrunedModelError(f"{where} has {len(gates)} values but {count_name} is {count}")
    for index, value in enumerate(gates):
        if not _is_number(value) or not 0 <= value <= 1:
            raise PrunedModelError(f"{where}[{index}] is {_short(value)}; gates lie in [0, 1]")


def check_description(description: dict[str, Any], sizes: dict[str, int], fields) -> None:
    """Hold the description against the config's sizes (`config_sizes`); fields: the row's
    ConfigFields (for the names in messages). Raises PrunedModelError at the first problem."""
    file = f"load_pruned: {PRUNED_JSON}"
    layers = description.get("layers")
    if not isinstance(layers, list):
        raise PrunedModelError(f"{file} 'layers' must be a list, got {type(layers).__name__}")
    if description.get("num_layers") != len(layers):
        raise PrunedModelError(
            f"{file} num_layers is {_short(description.get('num_layers'))} but 'layers' has "
            f"{len(layers)} entries"
        )
    if len(layers) != sizes["layers"]:
        raise PrunedModelError(
            f"{file} has {len(layers)} layers but {CONFIG_FILE} {fields.num_layers} is "
            f"{sizes['layers']}"
        )
    for i, entry in enumerate(layers):
        where = f"{file} layers[{i}]"
        if not isinstance(entry, dict):
            raise PrunedModelError(f"{where} must be an object, got {type(entry).__name__}")
        missing = [key for key in LAYER_KEYS if key not in entry]
        if missing:
            raise PrunedModelError(f"{where} lacks {', '.join(missing)}")
        heads, ffn = entry["num_heads"], entry["intermediate_size"]
        for key, value, limit, name in (
            ("num_heads", heads, sizes["heads"], fields.num_heads),
            ("intermediate_size", ffn, sizes["intermediate"], fields.intermediate_size),
        ):
            if not _is_int(value) or not 0 <= value <= limit:
                raise PrunedModelError(
                    f"{where}.{key} is {_short(value)} but {CONFIG_FILE} {name} is {limit} "
                    f"(expected an int in [0, {limit}])"
                )
        if entry["head_dim"] != sizes["head_dim"]:
            raise PrunedModelError(
                f"{where}.head_dim is {_short(entry['head_dim'])} but {CONFIG_FILE} gives "
                f"{sizes['head_dim']} ({fields.hidden_size} {sizes['hidden']} / "
                f"{fields.num_heads} {sizes['heads']})"
            )
        _check_ids(f"{where}.head_ids", entry["head_ids"], heads, "num_heads", sizes["heads"],
                   fields.num_heads)  # fmt: skip
        _check_ids(f"{where}.neuron_ids", entry["neuron_ids"], ffn, "intermediate_size",
                   sizes["intermediate"], fields.intermediate_size)  # fmt: skip
        _check_gates(f"{where}.head_gate", entry["head_gate"], heads, "num_heads")
        _check_gates(f"{where}.neuron_gate", entry["neuron_gate"], ffn, "intermediate_size")
        mlp_gate = entry["mlp_gate"]
        if not _is_number(mlp_gate) or not 0 <= mlp_gate <= 1:
            raise PrunedModelError(f"{where}.mlp_gate is {_short(mlp_gate)}; gates lie in [0, 1]")


# --------------------------------------------------------------------------------------------
# Weight shapes, from the safetensors header
# --------------------------------------------------------------------------------------------
def _layer_linears(row: ModelStructure, index: int) -> dict[str, str]:
    """Role -> the dotted module path (below the base model) of layer `index`'s linears."""
    attn, mlp = row.attention_layout, row.mlp_layout
    layer = f"{row.layers}.{index}"
    block = f"{layer}.{row.attention}"
    return {
        "query": f"{block}.{attn.self_attention}.{attn.query}",
        "key": f"{block}.{attn.self_attention}.{attn.key}",
        "value": f"{block}.{attn.self_attention}.{attn.value}",
        "attention output": f"{block}.{attn.output}.{attn.output_dense}",
        "intermediate": f"{layer}.{mlp.intermediate}.{mlp.intermediate_dense}",
        "output": f"{layer}.{mlp.output}.{mlp.output_dense}",
    }


def _base_prefix(names: set[str], row: ModelStructure) -> str:
    """The prefix of the base model's tensors in the file ('bert.', 'roberta.' or '')."""
    attn = row.attention_layout
    anchor = f"{row.layers}.0.{row.attention}.{attn.output}.{attn.output_layer_norm}.weight"
    found = sorted(name[: -len(anchor)] for name in names if name.endswith(anchor))
    found = [prefix for prefix in found if prefix == "" or prefix.endswith(".")]
    if not found:
        raise PrunedModelError(
            f"load_pruned: {WEIGHTS_FILE} has no tensor named ...{anchor}: it does not hold a "
            f"{row.model_type} encoder"
        )
    return found[0]


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16}


def float_dtypes(file: Path) -> dict[str, torch.dtype]:
    """The dtype of each floating tensor in `file`, by name (header only)."""
    with safe_open(str(file), framework="pt") as handle:
        found = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    return {name: _SAFETENSORS_FLOATS[d] for name, d in found.items() if d in _SAFETENSORS_FLOATS}


def weights_dtype(file: Path) -> torch.dtype | None:
    """The floating dtype every floating tensor in `file` shares (header only), or None when
    they differ or there is none."""
    floats = set(float_dtypes(file).values())
    return floats.pop() if len(floats) == 1 else None


def check_weight_shapes(
    file: Path, description: dict[str, Any], sizes: dict[str, int], row: ModelStructure
) -> None:
    """Each layer's linear weights (and biases) in `file` have the recorded sizes; linears of
    removed heads / MLPs are absent. Reads only the safetensors header."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise PrunedModelError(
            f"load_pruned: {WEIGHTS_FILE} is not a readable safetensors file: "
            f"{_short(str(error), 120)}"
        ) from None
    prefix = _base_prefix(set(shapes), row)
    hidden = sizes["hidden"]
    for i, entry in enumerate(description["layers"]):
        inner = entry["num_heads"] * entry["head_dim"]
        ffn = entry["intermediate_size"]
        expected = {  # role -> (weight shape, recorded sizes for the message)
            "query": ((inner, hidden), "num_heads"),
            "key": ((inner, hidden), "num_heads"),
            "value": ((inner, hidden), "num_heads"),
            "attention output": ((hidden, inner), "num_heads"),
            "intermediate": ((ffn, hidden), "intermediate_size"),
            "output": ((hidden, ffn), "intermediate_size"),
        }
        for role, path in _layer_linears(row, i).items():
            (out_f, in_f), field = expected[role]
            weight, bias = f"{prefix}{path}.weight", f"{prefix}{path}.bias"
            recorded = f"{PRUNED_JSON} layers[{i}].{field} = {entry[field]}"
            if entry[field] == 0:
                if weight in shapes:
                    raise PrunedModelError(
                        f"load_pruned: {WEIGHTS_FILE} holds {weight}, but {recorded} (removed)"
                    )
                continue
            if weight not in shapes:
                raise PrunedModelError(f"load_pruned: {WEIGHTS_FILE} lacks {weight} ({recorded})")
            for name, want in ((weight, (out_f, in_f)), (bias, (out_f,))):
                if name in shapes and shapes[name] != want:
                    raise PrunedModelError(
                        f"load_pruned: {WEIGHTS_FILE} {name} has shape {shapes[name]}, expected "
                        f"{want} from {recorded}"
                    )
