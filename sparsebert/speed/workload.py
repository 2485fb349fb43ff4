"""What `sparsebert speed` measures: the model, the masks and the batch.

* models: "bert-base" (BERT-base shapes, random weights, nothing downloaded), "minilm" /
  "default" (the default pre-trained model), or a local model directory;
* masks: a file (--head-mask: masks JSON of a search or run, or a (L, H) tensor in .pt/.npy),
  random per-layer fractions (--prune-heads / --prune-ffn: every layer keeps the same number of
  heads and FFN neurons, chosen at random with a seed), or a run directory (--run: a fine-tune
  run's masks.json, or every subnetwork of a search's structured/masks/);
* batches: token ids with lengths "full" (every row S long), "uniform" (uniform in [S/4, S],
  seeded) or "glue:TASK" (that task's dev examples, tokenized with the model's tokenizer and
  truncated to S: their real lengths).
Every error names the flag and what was expected (SpeedError: one line, exit 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsebert.errors import SparsebertError
from sparsebert.hf.loading import (
    config_value_errors,
    config_value_problem,
    error_text,
    position_limit,
)

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SpeedError(SparsebertError):
    """Bad input to `sparsebert speed` (the message names the argument)."""


@dataclass
class MaskSet:
    """One subnetwork to measure: head_mask (L, H), mlp_mask (L,), neuron_mask (L, F)."""

    name: str
    head_mask: torch.Tensor
    mlp_mask: torch.Tensor
    neuron_mask: torch.Tensor
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def kept(self) -> tuple[float, float]:
        """(fraction of heads kept, fraction of FFN neurons kept: MLP gate x neuron gate)."""
        heads = float((self.head_mask != 0).float().mean())
        ffn = float(((self.neuron_mask != 0) & (self.mlp_mask[:, None] != 0)).float().mean())
        return heads, ffn


# --- models ---------------------------------------------------------------------------------
def load_speed_model(name: str, seed: int = 0) -> tuple[nn.Module, object | None]:
    """(sequence-classification model in fp32 eval mode, tokenizer or None) for --model."""
    if name == "bert-base":
        from transformers import BertConfig, BertForSequenceClassification  # noqa: PLC0415

        torch.manual_seed(seed)
        model = BertForSequenceClassification(BertConfig(**BERT_BASE, num_labels=2))
        return model.eval(), None
    from sparsebert.hf.loading import load_model  # noqa: PLC0415

    source = None if name in ("minilm", "default") else name
    num_labels = 2  # the default model: a fresh 2-label head
    if source is not None:
        num_labels = check_model_dir(name).num_labels  # a fine-tuned head keeps its size
    model, tokenizer = load_model(source, num_labels=num_labels, seed=seed)
    return model.eval(), tokenizer


def check_model_dir(name: str):
    """--model DIR must be a local directory of an encoder the fast path supports; returns its
    config (transformers' PretrainedConfig)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from sparsebert.hf.pruned_format import PRUNED_JSON  # noqa: PLC0415
    from sparsebert.hf.structure import STRUCTURES, supported_model_types  # noqa: PLC0415

    folder = Path(name)
    if not folder.is_dir():
        raise SpeedError(f"--model {name!r}: expected bert-base, minilm, or a local model "
                         "directory (nothing is downloaded)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except FileNotFoundError:
        raise SpeedError(f"--model {name}: no config.json in it (expected a directory "
                         "written by save_pretrained)") from None
    except (OSError, ValueError, AttributeError) as error:
        raise SpeedError(f"--model {name}: config.json cannot be read ({error})") from None
    if model_type not in STRUCTURES:
        raise SpeedError(f"--model {name}: model type {model_type!r} is not supported by the "
                         f"fast path (supported: {', '.join(supported_model_types())})")
    if (folder / PRUNED_JSON).is_file():
        raise SpeedError(f"--model {name}: a masked or physically pruned model (written by "
                         "save_pruned); expected the unpruned model, with its masks from --run "
                         "or --head-mask (the command builds the pruned variants itself)")
    try:  # (a decoder config is refused by sparsebert.patch, as everywhere)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, *config_value_errors()) as error:
        raise SpeedError(f"--model {name}: config.json cannot be read ({error_text(error)})"
                         ) from None
    problem = config_value_problem(config)
    if problem is not None:
        raise SpeedError(f"--model {name}: {problem}")
    return config


def model_shape(model: nn.Module) -> dict[str, int]:
    """Unpruned sizes from the config: layers, heads, hidden, intermediate, max_length."""
    config = model.config
    return {"layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "hidden": config.hidden_size, "intermediate": config.intermediate_size,
            "max_length": position_limit(config, model)}


# --- masks ----------------------------------------------------------------------------------
def random_masks(shape: dict[str, int], prune_heads: float, prune_ffn: float,
                 seed: int = 0) -> MaskSet:
    """Every layer keeps round((1 - p) * n) heads / FFN neurons, chosen at random."""
    for flag, value in (("--prune-heads", prune_heads), ("--prune-ffn", prune_ffn)):
        if not 0.0 <= value <= 1.0:
            raise SpeedError(f"{flag} {value}: expected a fraction in [0, 1]")
    gen = torch.Generator().manual_seed(seed)
    layers = shape["layers"]

    def keep(n: int, fraction: float) -> torch.Tensor:  # (L, n)
        kept = round((1.0 - fraction) * n)
        mask = torch.zeros(layers, n)
        for layer in range(layers):
            mask[layer, torch.randperm(n, generator=gen)[:kept]] = 1.0
        return mask

    name = f"random {1 - prune_heads:.0%} heads, {1 - prune_ffn:.0%} FFN"
    return MaskSet(name, keep(shape["heads"], prune_heads), torch.ones(layers),
                   keep(shape["intermediate"], prune_ffn), source="--prune-heads/--prune-ffn")


_MASK_AXES = {"head_mask": "layers x heads", "mlp_mask": "layers",
              "neuron_mask": "layers x FFN neurons"}


def _check_shape(flag: str, source: str, what: str, value,
                 expected: tuple[int, ...]) -> torch.Tensor:
    """One mask of a masks file as a float tensor of the `expected` shape, values in [0, 1]."""
    where = f"{flag} {source}"
    try:
        if isinstance(value, torch.Tensor):  # any real dtype (numpy has no bfloat16)
            if value.is_complex():
                raise TypeError("complex")
            tensor = value.detach().to("cpu", torch.float32)
        else:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float32))
    except (TypeError, ValueError, RuntimeError):
        raise SpeedError(f"{where}: {what} is not a numeric array") from None
    if tuple(tensor.shape) != expected:
        raise SpeedError(f"{where}: {what} has shape {tuple(tensor.shape)}, but this model needs "
                         f"{expected} ({_MASK_AXES[what]}); the masks are for another model")
    if bool(((tensor < 0) | (tensor > 1) | torch.isnan(tensor)).any()):
        raise SpeedError(f"{where}: {what} values must lie in [0, 1]")
    return tensor


def masks_from_dict(flag: str, data: dict, shape: dict[str, int], name: str,
                    source: str) -> MaskSet:
    """A MaskSet from {"head_mask": (L, H), "mlp_mask": (L,) optional, "neuron_mask" optional}."""
    layers, heads, ffn = shape["layers"], shape["heads"], shape["intermediate"]
    if data.get("head_mask") is None:  # absent, or null: a run that masked nothing
        raise SpeedError(f"{flag} {source}: no head_mask in it (keys: {sorted(data)[:8]})")
    head = _check_shape(flag, source, "head_mask", data["head_mask"], (layers, heads))
    mlp = (torch.ones(layers) if data.get("mlp_mask") is None
           else _check_shape(flag, source, "mlp_mask", data["mlp_mask"], (layers,)))
    neuron = (torch.ones(layers, ffn) if data.get("neuron_mask") is None
              else _check_shape(flag, source, "neuron_mask", data["neuron_mask"], (layers, ffn)))
    return MaskSet(name, head, mlp, neuron, source=source)


def masks_from_file(path: str, shape: dict[str, int]) -> MaskSet:
    """--head-mask FILE: JSON with head_mask (and mlp_mask / neuron_mask), or a (L, H) tensor
    saved with torch.save (.pt) or numpy (.npy)."""
    file = Path(path)
    if file.is_dir():
        raise SpeedError(f"--head-mask {path}: is a directory (expected a .json, .pt or .npy "
                         "file; for a run directory use --run)")
    if not file.is_file():
        raise SpeedError(f"--head-mask {path}: no such file")
    try:
        if file.suffix == ".json":
            data = json.loads(file.read_text())
        elif file.suffix == ".npy":
            data = {"head_mask": np.load(file)}
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            data = loaded if isinstance(loaded, dict) else {"head_mask": loaded}
    except Exception as error:  # noqa: BLE001 (json, numpy and pickle each raise their own)
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise SpeedError(f"--head-mask {path}: cannot read it as a masks file ({first})") from None
    if not isinstance(data, dict):
        raise SpeedError(f"--head-mask {path}: expected a JSON object with head_mask")
    return masks_from_dict("--head-mask", data, shape, file.stem, str(file))


def _subnetworks(path: str, folder: Path, prefix: str, shape: dict[str, int]) -> list[MaskSet]:
    """Every <subnet>.json of a search's structured/masks folder, good/random/bad first."""
    order = {"good": 0, "random": 1, "bad": 2}
    sets = []
    for file in sorted(folder.glob("*.json"), key=lambda p: (order.get(p.stem, 3), p.stem)):
        data = _read_object(path, file)
        sets.append(masks_from_dict("--run", data, shape, prefix + file.stem, str(file)))
    return sets


def _summary_subnetworks(path: str, summary: Path, prefix: str,
                         shape: dict[str, int]) -> list[MaskSet]:
    """The s-pruning subnetworks' head and MLP masks recorded in a search's summary.json (what
    a results copy keeps of a search), good/random/bad order."""
    if not summary.is_file():
        return []
    data = _read_object(path, summary)
    if data.get("kind") != "sparsebert-search":
        return []
    methods = data.get("methods")
    structured = methods.get("structured") if isinstance(methods, dict) else None
    subnetworks = structured.get("subnetworks") if isinstance(structured, dict) else None
    if not isinstance(subnetworks, dict):
        return []
    return [masks_from_dict("--run", {"head_mask": entry["head_mask"],
                                      "mlp_mask": entry.get("mlp_mask")},
                            shape, prefix + name, f"{summary} ({name})")
            for name, entry in subnetworks.items()
            if isinstance(entry, dict) and entry.get("head_mask") is not None]


def _read_object(path: str, file: Path) -> dict[str, Any]:
    """The JSON object in `file` of --run `path`; a SpeedError when it is not one."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise SpeedError(f"--run {path}: {file} is damaged ({error})") from None
    if not isinstance(data, dict):
        raise SpeedError(f"--run {path}: {file} is damaged (expected a JSON object, found "
                         f"{type(data).__name__})")
    return data


def _search_dirs(root: Path) -> list[tuple[Path, str]]:
    """(search directory, subnetwork name prefix): root itself and its seed_<s>/ folders."""
    return [(root, ""), *((d, f"{d.name}/") for d in sorted(root.glob("seed_*")))]


def masks_from_run(path: str, shape: dict[str, int]) -> list[MaskSet]:
    """--run DIR: every subnetwork of a search (structured/masks/*.json, good/random/bad first;
    of every seed_<s>/ for a multi-seed search; where a copy keeps only summary.json, the masks
    recorded there), or the masks of a fine-tune run of a masked model (masks.json)."""
    root = Path(path)
    if not root.is_dir():
        raise SpeedError(f"--run {path}: " + ("is a file, not a run directory" if root.exists()
                                               else "no such directory"))
    sets = []
    for search, prefix in _search_dirs(root):
        found = _subnetworks(path, search / "structured" / "masks", prefix, shape)
        sets += found or _summary_subnetworks(path, search / "summary.json", prefix, shape)
    if sets:
        return sets
    masks_file = root / "masks.json"
    if masks_file.is_file():
        data = _read_object(path, masks_file)
        if data.get("head_mask") is not None:
            masks = masks_from_dict("--run", data, shape, root.name, str(masks_file))
            if any(n < shape["intermediate"] for n in data.get("neurons_kept", [])):
                masks.notes.append("FFN neuron masks are not stored in masks.json: all neurons "
                                   "of kept MLPs counted as kept")
            return [masks]
        raise SpeedError(f"--run {path}: its masks.json holds no head mask (a run of an "
                         "unpatched model, unmasked or with weight masks only): nothing to time "
                         "but the full model; pass a search directory or a run of a head-masked "
                         "model")
    tasks = sorted({p.parent.parent.parent.name
                    for p in root.glob("*/seed_*/structured/masks")}
                   | {p.parent.parent.name for p in root.glob("*/seed_*/summary.json")})
    if tasks:  # a sweep directory: one task at a time
        raise SpeedError(f"--run {path}: a sweep directory; time one task's subnetworks at a "
                         f"time, e.g. --run {root / tasks[0]} (tasks here: {', '.join(tasks)})")
    raise SpeedError(f"--run {path}: no masks found (expected a search directory with "
                     "structured/masks/*.json or its summary.json, a multi-seed search's "
                     "directory, or a run of a masked model with masks.json)")


def is_search_dir(path: str) -> bool:
    """A search directory (structured/masks/, or a copy with only summary.json), or the parent
    of a multi-seed search's seeds."""
    def one(folder: Path) -> bool:
        if (folder / "structured" / "masks").is_dir():
            return True
        try:
            return json.loads((folder / "summary.json").read_text()).get(
                "kind") == "sparsebert-search"
        except (OSError, ValueError, AttributeError):
            return False

    return any(one(folder) for folder, _ in _search_dirs(Path(path)))


def _run_train_config(path: str) -> tuple[dict[str, Any], Path | None]:
    """The training settings of a run directory's config.json (a search's or a fine-tune's; a
    multi-seed search: its first seed's), else of its summary.json (a results copy holds only
    that), and that file; ({}, None) when there is none."""
    root = Path(path)
    configs = [root / "config.json", *sorted(root.glob("seed_*/config.json")),
               root / "summary.json", *sorted(root.glob("seed_*/summary.json"))]
    config = next((c for c in configs if c.is_file()), None)
    if config is None:
        return {}, None  # masks_from_run says what is missing
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as error:
        raise SpeedError(f"--run {path}: {config} is damaged ({error})") from None
    if config.name == "summary.json":  # a search's summary: {"config": {"train": {...}}}
        data = data.get("config", {}) if isinstance(data, dict) else {}
    train = data.get("train", data) if isinstance(data, dict) else {}
    return (train if isinstance(train, dict) else {}), config


def run_model(path: str) -> str:
    """The --model of a run directory's config.json (a search's or a fine-tune's; a multi-seed
    search: its first seed's): minilm for the default model, else its local directory."""
    model = _run_train_config(path)[0].get("model")
    if model in (None, "default", "minilm"):
        return "minilm"
    if not Path(model).is_dir():
        raise SpeedError(f"--run {path}: its model {model!r} is not a local directory here; "
                         "pass --model (bert-base, minilm or a model directory)")
    return str(model)


def run_task(path: str) -> str | None:
    """The GLUE task a run directory was trained on (its config.json's, a multi-seed search:
    its first seed's), or None when it records none."""
    task = _run_train_config(path)[0].get("task")
    return task if isinstance(task, str) else None


def run_glue_dir(path: str) -> tuple[str | None, Path | None]:
    """The GLUE folder a run directory recorded (its config.json's glue_dir) and that file;
    (None, None) when it recorded none (it read $GLUE_DIR or the hub)."""
    train, config = _run_train_config(path)
    recorded = train.get("glue_dir")
    return (recorded, config) if isinstance(recorded, str) and recorded else (None, None)


# --- batches --------------------------------------------------------------------------------
def batch_lengths(spec: str, batch: int, seq: int, tokenizer=None, glue_dir=None,
                  seed: int = 0, origin: str | None = None) -> np.ndarray:
    """(B,) lengths for --lengths full | uniform | glue:TASK (glue_dir: the GLUE folder, else
    $GLUE_DIR, else the hub; origin: where glue_dir came from, named when a file is missing)."""
    if spec == "full":
        return np.full(batch, seq, dtype=np.int64)
    if spec == "uniform":
        rng = np.random.default_rng(seed)
        return rng.integers(max(1, seq // 4), seq + 1, size=batch).astype(np.int64)
    if spec.startswith("glue:"):
        from sparsebert.glue.batching import encode  # noqa: PLC0415
        from sparsebert.glue.loading import load_split  # noqa: PLC0415

        if tokenizer is None:
            from sparsebert.hf.loading import load_tokenizer  # noqa: PLC0415

            tokenizer = load_tokenizer(None)  # bert-base: the default model's (BERT) vocabulary
        from sparsebert.glue.tasks import GlueError  # noqa: PLC0415

        try:
            data = load_split(spec.split(":", 1)[1], "dev", glue_dir, origin=origin)
        except GlueError as error:
            raise GlueError(f"--lengths {spec!r}: {error}") from None
        lengths = encode(data, tokenizer, max_length=max(seq, 8)).lengths
        lengths = np.minimum(lengths, seq)
        rng = np.random.default_rng(seed)
        return rng.choice(lengths, size=batch, replace=len(lengths) < batch).astype(np.int64)
    raise SpeedError(f"--lengths {spec!r}: expected full, uniform or glue:TASK (e.g. glue:SST-2)")


def make_batch(lengths: np.ndarray, seq: int, vocab: int, device,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids (B, S) (random ids >= 1000 where vocab allows, 0 = padding) and attention_mask
    (B, S), None when every row is S long."""
    gen = torch.Generator().manual_seed(seed)
    low = 1000 if vocab > 2000 else 3
    ids = torch.randint(low, vocab, (len(lengths), seq), generator=gen)
    mask = (torch.arange(seq)[None, :] < torch.as_tensor(lengths)[:, None]).long()
    out = {"input_ids": (ids * mask).to(device)}
    if not bool(mask.all()):
        out["attention_mask"] = mask.to(device)
    return out
