"""What a fine-tuning run directory holds, and how a run's model is saved and reloaded.

    config.json                 TrainConfig (with the resolved data folder in glue_dir)
    masks.json                  what was trained: patched or not, physically pruned or not,
                                head (L, H) / MLP (L,) masks, FFN neurons kept per layer, the
                                weight masks' counts, and fingerprints of all of them
    data.json                   sha256 of the GLUE files it started with (resuming on other
                                data is refused; sparsebert.train.data_identity)
    model.json                  sha256 of the --model folder's files it started from
                                (resuming after they changed is refused;
                                sparsebert.train.model_identity)
    weight_masks.safetensors    fixed weight masks (bool, by parameter name), when any
    metrics.jsonl               train-loss windows and dev metrics
    checkpoint.pt (+ .prev.pt)  while the run is unfinished (sparsebert.train.checkpoint)
    model/                      the trained model and tokenizer: save_pretrained for a plain
                                model, sparsebert.save_pruned for a patched (masked or
                                physically pruned) one, so gates and sizes come back
    results.json                RunResult, once finished

The masks are part of a run's identity: resuming with different masks is refused, naming
the difference, just as a different config is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from sparsebert.atomic import atomic_save_dir, atomic_write_json, lock_holder, read_json
from sparsebert.errors import RunDirError
from sparsebert.pruning.weight_masks import (
    WeightMasks,
    load_weight_masks,
    mask_counts,
    mask_fingerprint,
    save_weight_masks,
)

RESULTS_NAME = "results.json"
MASKS_NAME = "masks.json"
WEIGHT_MASKS_NAME = "weight_masks.safetensors"
RESULT_VERSION = 2


@dataclass
class RunResult:
    """results.json of a fine-tuning run (one schema, versioned).

    status: "finished" or "stopped" (stop_after_steps; most fields then None).
    metrics: {dev split: {metric: value}}; score: metrics[first dev split][threshold_metric].
    data: where the data came from: {"source": "glue_dir", "path": ...} or {"source": "hub"}.
    masks: masks.json's summary (kept heads/MLPs/neurons, weight-mask counts).
    """

    status: str
    task: str
    run: str
    step: int
    version: int = RESULT_VERSION
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    threshold_metric: str | None = None
    score: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)
    train_examples: int | None = None
    train_set_examples: int | None = None  # the whole training split (train_examples: a subset)
    train_time_s: float | None = None
    train_examples_per_s: float | None = None
    padding_efficiency: float | None = None
    wall_time_s: float | None = None
    device: str | None = None
    device_name: str | None = None
    precision: str | None = None  # resolved: fp32 or bf16 ("auto" as on the device it started)
    threads: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    git_sha: str | None = None
    finished_at: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = RESULTS_NAME) -> RunResult:
        """Parse results.json; version 1 files (no version field) are read too."""
        data = dict(data)
        if "steps" in data and "step" not in data:  # version 1 called it steps
            data["step"] = data.pop("steps")
        data.setdefault("version", 1)
        if data["version"] > RESULT_VERSION:
            raise RunDirError(f"{where}: version {data['version']} is newer than this "
                              f"sparsebert reads ({RESULT_VERSION}); upgrade sparsebert")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in ("status", "task", "run", "step") if name not in data]
        if missing:
            raise RunDirError(f"{where}: not a run result (missing {missing})")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunResult | None:
        """results.json of `run_dir`, or None when the run has not finished."""
        path = Path(run_dir) / RESULTS_NAME
        if not path.is_file():
            return None
        data = read_json(path, "restore it, or delete it and rerun the same command to "
                               "fine-tune the run again (its checkpoints are gone once it "
                               "finished); `sparsebert evaluate` scores its model/ meanwhile")
        return cls.from_json(data, str(path))

    def save(self, run_dir: str | os.PathLike) -> None:
        atomic_write_json(Path(run_dir) / RESULTS_NAME, self.to_json())


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- what was trained: masks ------------------------------------------------------------------

def _digest(values: Any) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def describe_masks(model: nn.Module, weight_masks: WeightMasks | None = None) -> dict[str, Any]:
    """masks.json's content for `model` (patched or not) and its fixed weight masks.

    Keys: patched, pruned, head_mask (L, H) / mlp_mask (L,) as lists (patched models),
    heads_kept, mlps_kept, neurons_kept (per layer), weight_masks {tensors, kept, total,
    sha256}, and identity: the fields compared when a run is resumed.
    """
    from sparsebert.hf.masks import get_masks  # noqa: PLC0415
    from sparsebert.hf.patching import is_patched  # noqa: PLC0415
    from sparsebert.hf.surgery import layer_sizes  # noqa: PLC0415

    out: dict[str, Any] = {"patched": bool(is_patched(model))}
    if out["patched"]:
        masks = get_masks(model)
        heads, mlps, neurons = masks["head_mask"], masks["mlp_mask"], masks["neuron_mask"]
        sizes = layer_sizes(model)
        full_heads, full_ffn = heads.shape[1], neurons.shape[1]
        out.update({
            "pruned": any(s["num_heads"] < full_heads or s["intermediate_size"] < full_ffn
                          for s in sizes),
            "head_mask": heads.tolist(), "mlp_mask": mlps.tolist(),
            "heads_kept": int((heads != 0).sum()), "mlps_kept": int((mlps != 0).sum()),
            "neurons_kept": [int(n) for n in (neurons != 0).sum(dim=1)],
            "neuron_mask_sha256": _digest(neurons.tolist()),
            "layer_sizes": sizes,
        })
    else:
        out["pruned"] = False
    named = weight_masks.named(model) if weight_masks is not None and len(weight_masks) else {}
    if named:
        kept, total = mask_counts(named)
        out["weight_masks"] = {"file": WEIGHT_MASKS_NAME, "tensors": len(named), "kept": kept,
                               "total": total, "sha256": mask_fingerprint(named)}
    identity_keys = ("patched", "pruned", "head_mask", "mlp_mask", "neuron_mask_sha256",
                     "layer_sizes")
    identity = {k: out[k] for k in identity_keys if k in out}
    identity["weight_masks_sha256"] = out.get("weight_masks", {}).get("sha256")
    out["identity"] = identity
    return out


# masks.json of a plain (unpatched) model trained without weight masks.
PLAIN_MASKS: dict[str, Any] = {
    "patched": False, "pruned": False,
    "identity": {"patched": False, "pruned": False, "weight_masks_sha256": None},
}


def masks_difference(saved: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """A short description of how two masks.json identities differ, or None if they agree."""
    a, b = saved.get("identity", {}), mine.get("identity", {})
    if a == b:
        return None
    parts = []
    for key in ("patched", "pruned"):
        if a.get(key) != b.get(key):
            parts.append(f"{key}: saved {a.get(key)}, requested {b.get(key)}")
    if a.get("head_mask") != b.get("head_mask"):
        parts.append(f"head mask: saved keeps {saved.get('heads_kept')} heads, requested "
                     f"{mine.get('heads_kept')}" + _layers_differing(a.get("head_mask"),
                                                                      b.get("head_mask")))
    if a.get("mlp_mask") != b.get("mlp_mask"):
        parts.append(f"MLP mask: saved keeps {saved.get('mlps_kept')} MLPs, requested "
                     f"{mine.get('mlps_kept')}" + _layers_differing(a.get("mlp_mask"),
                                                                     b.get("mlp_mask")))
    if a.get("neuron_mask_sha256") != b.get("neuron_mask_sha256"):
        parts.append(f"FFN neurons kept per layer: saved {saved.get('neurons_kept')}, "
                     f"requested {mine.get('neurons_kept')}")
    if a.get("layer_sizes") != b.get("layer_sizes") and not parts:
        parts.append("physical layer sizes differ")
    if a.get("weight_masks_sha256") != b.get("weight_masks_sha256"):
        ws, wm = saved.get("weight_masks", {}), mine.get("weight_masks", {})
        parts.append(f"weight masks: saved keeps {ws.get('kept', 'all')} of "
                     f"{ws.get('total', '-')}, requested {wm.get('kept', 'all')} of "
                     f"{wm.get('total', '-')}")
    return "; ".join(parts) or "masks differ"


def _layers_differing(a: list | None, b: list | None) -> str:
    if a is None or b is None or len(a) != len(b):
        return ""
    layers = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return f" (layers {', '.join(map(str, layers[:8]))}{', ...' if len(layers) > 8 else ''} differ)"


def check_masks(out_dir: Path, masks: dict[str, Any]) -> None:
    """Refuse a run directory whose masks.json differs from `masks`; write it if missing."""
    path = out_dir / MASKS_NAME
    if path.is_file():
        saved = read_json(path, "restore it, or delete that run directory to fine-tune again")
        if not isinstance(saved, dict):
            raise RunDirError(f"{path}: damaged (expected a JSON object, found "
                              f"{type(saved).__name__}); restore it, or delete that run "
                              "directory to fine-tune again")
        difference = masks_difference(saved, masks)
        if difference:
            raise RunDirError(f"{out_dir} holds a run trained with other masks ({difference}); "
                              f"use another --out or delete that directory")
    else:
        atomic_write_json(path, masks)


# --- the trained model --------------------------------------------------------------------------

def save_run_model(out_dir: Path, model: nn.Module, tokenizer,
                   weight_masks: WeightMasks | None = None) -> None:
    """model/ (and weight_masks.safetensors): patched models through save_pruned, so gates and
    physical sizes reload; plain models through save_pretrained."""
    from sparsebert.hf.loading import save_model, save_tokenizer  # noqa: PLC0415
    from sparsebert.hf.patching import is_patched  # noqa: PLC0415
    from sparsebert.hf.serialization import save_pruned  # noqa: PLC0415

    if weight_masks is not None and len(weight_masks):
        save_weight_masks(out_dir / WEIGHT_MASKS_NAME, weight_masks.named(model))

    def write(path: Path) -> None:
        if is_patched(model):
            save_pruned(model, path)
            save_tokenizer(tokenizer, path)
        else:
            save_model(model, tokenizer, path)

    atomic_save_dir(out_dir / "model", write)


def model_missing(run_dir: str | os.PathLike) -> str | None:
    """What is missing from the model/ folder of run `run_dir` (no folder, no config.json, no
    weight file, or, for a patched run (masks.json), no save_pruned description), or None
    when it holds a saved model. A finished run without one is fine-tuned again."""
    from sparsebert.hf.loading import WEIGHT_FILE_PATTERNS, weight_files  # noqa: PLC0415
    from sparsebert.hf.pruned_format import PRUNED_JSON  # noqa: PLC0415

    model_dir = Path(run_dir) / "model"
    if not model_dir.is_dir():
        return f"{model_dir} is missing"
    if not (model_dir / "config.json").is_file():
        return f"{model_dir} has no config.json"
    if not weight_files(model_dir):
        return f"{model_dir} has no weight file ({', '.join(WEIGHT_FILE_PATTERNS)})"
    try:
        masks = json.loads((Path(run_dir) / MASKS_NAME).read_text())
    except (OSError, ValueError):
        masks = None
    if (isinstance(masks, dict) and masks.get("patched") is True
            and not (model_dir / PRUNED_JSON).is_file()):
        return f"{model_dir} has no {PRUNED_JSON} (the run trained a patched model)"
    return None


def load_run_model(run_dir: str | os.PathLike, num_labels: int, labels: tuple[str, ...] = (),
                   ) -> tuple[nn.Module, Any]:
    """(model, tokenizer) exactly as the run trained it: gates, physical pruning and fixed
    weight masks restored. The model is in eval mode on the CPU. RunDirError naming the
    folder when model/ is missing or incomplete."""
    from sparsebert.hf.loading import load_model, load_tokenizer  # noqa: PLC0415
    from sparsebert.hf.serialization import PRUNED_JSON, load_pruned  # noqa: PLC0415

    run_dir = Path(run_dir)
    missing = model_missing(run_dir)
    if missing is not None:
        raise RunDirError(f"{run_dir}: the run's model is gone ({missing}); rerun the command "
                          f"that fine-tuned it to fine-tune it again, or delete the run "
                          f"directory {run_dir} to redo it")
    model_dir = run_dir / "model"
    if (model_dir / PRUNED_JSON).is_file():
        model, tokenizer = load_pruned(model_dir), load_tokenizer(model_dir)
    else:
        model, tokenizer = load_model(model_dir, num_labels, labels=labels)
    masks_file = run_dir / WEIGHT_MASKS_NAME
    if masks_file.is_file():
        WeightMasks.from_named(model, _recorded_weight_masks(run_dir, masks_file)).apply()
    model.eval()
    return model, tokenizer


def _recorded_weight_masks(run_dir: Path, masks_file: Path) -> dict[str, Tensor]:
    """The run's fixed weight masks from `masks_file`, checked against the fingerprint its
    masks.json records (a flipped bit is still a valid mask: the file has no checksum)."""
    named = load_weight_masks(masks_file)
    record = run_dir / MASKS_NAME
    saved = read_json(record, "restore it, or delete that run directory") \
        if record.is_file() else None
    recorded = (saved.get("weight_masks") or {}).get("sha256") if isinstance(saved, dict) \
        else None
    if recorded is not None and mask_fingerprint(named) != recorded:
        kept, total = mask_counts(named)
        raise RunDirError(f"{masks_file}: damaged (it keeps {kept} of {total} weights, not the "
                          f"masks {record.name} records: {saved['weight_masks'].get('kept')} "
                          f"of {saved['weight_masks'].get('total')}, sha256 {recorded}); "
                          f"restore it, or delete the run directory {run_dir} to redo it")
    return named


def check_out_dir(out_dir: Path) -> None:
    """--out must be a directory or not exist yet, and not the folder of a study: a sweep
    directory, a task folder of one, or a multi-seed search (checked before any data is
    loaded)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"--out {out_dir}: exists and is a file, not a run directory; "
                          f"pass a directory path")
    study = study_folder(out_dir)
    if study is not None:
        raise RunDirError(f"--out {out_dir}: {study}, not a run directory; use another --out")


def make_out_dir(folder: Path, error: type[Exception], shown: Path | None = None) -> None:
    """Create --out `folder` (and its parents); an OSError (a file on the way, no permission,
    a read-only file system) raised as `error` naming --out `shown` (default: the folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as failure:
        raise error(f"--out {shown or folder}: cannot create it "
                    f"({failure.strerror or failure})") from None


def foreign_entries(folder: Path, expected: Callable[[str], bool]) -> list[str]:
    """The names in `folder` (sorted) that a command would write beside or over: neither
    `expected` nor hidden (a .gitkeep, an interrupted write's .tmp); [] without the folder."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir()
                  if not entry.name.startswith(".") and not expected(entry.name))


def listed(names: list[str], most: int = 5) -> str:
    """'a, b, c and 4 more': the first `most` names and how many others."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def enclosing_sweep(path: Path) -> Path | None:
    """The sweep directory that `path` is, or is a task or seed folder of (up to two levels
    below its sweep.json / .sweep/); None when there is none."""
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "sweep.json").is_file() or (folder / ".sweep").is_dir():
            return folder
    return None


def is_multi_seed_root(path: Path) -> bool:
    """True when `path` holds a multi-seed search (seed_<s>/ folders with a config.json) and no
    run of its own."""
    return not (path / "config.json").exists() and any(
        (folder / "config.json").is_file() for folder in path.glob("seed_*"))


def study_folder(path: Path) -> str | None:
    """What `path` is when it is the folder of a study rather than a run: a sweep directory,
    a sweep's task folder, or a multi-seed search's root (seed_<s>/ folders); None else."""
    sweep = enclosing_sweep(path)
    if sweep is not None:
        return (f"{'is' if sweep == path else 'is inside'} a sweep directory ({sweep}; "
                "its runs are the seed_<s>/ searches of its task folders)")
    if is_multi_seed_root(path):
        return ("holds a multi-seed search (seed_<s>/ folders; its runs are in each seed's "
                "search)")
    return None


def is_search_dir(path: Path) -> bool:
    """True when `path` holds a lottery search's config.json (sparsebert search)."""
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and "search" in saved and "train" in saved


def _finished_runs(root: Path, limit: int = 3) -> list[str]:
    """Up to `limit` finished run directories below `root`, as paths (none under hidden
    folders: .superseded/ holds runs set aside by --redo)."""
    found = sorted(str(marker.parent.parent) for marker in root.glob("**/model/config.json")
                   if not any(part.startswith(".")
                              for part in marker.relative_to(root).parts))
    return found[:limit]


def _is_model_dir(path: Path) -> bool:
    """True when `path` holds a saved model: an HF config.json and weights."""
    from sparsebert.hf.loading import weight_files  # noqa: PLC0415

    return (path / "config.json").is_file() and bool(weight_files(path))


def _is_finished_run(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model" / "config.json").is_file()


def require_finished(run_dir: Path) -> None:
    """A clear error when `run_dir` is no run directory or its run has not finished."""
    if run_dir.is_file() or (run_dir.exists() and not run_dir.is_dir()):
        parent = run_dir.parent
        hint = (f"; it is in the run {parent}: pass --run {parent}" if _is_finished_run(parent)
                else "; pass the --out directory of a `sparsebert finetune` run")
        raise RunDirError(f"--run {run_dir}: is a file, not a run directory{hint}")
    if not run_dir.is_dir():
        raise RunDirError(f"--run {run_dir}: not a run directory (no such directory)")
    has_config = (run_dir / "config.json").is_file()
    inside_search = next((p for p in (run_dir, *run_dir.parents) if is_search_dir(p)), None)
    if inside_search is not None and (inside_search == run_dir or not has_config):
        runs = _finished_runs(run_dir)
        hint = (f"; its finished runs include {', '.join(runs)}" if runs
                else "; it has no finished run yet")
        what = ("is a search directory" if inside_search == run_dir
                else f"is a folder of the search {inside_search}")
        raise RunDirError(f"--run {run_dir}: {what}, not a run; pass one of its runs, e.g. "
                          f"{inside_search / 'full'} or "
                          f"{inside_search / 'structured' / 'retrained' / 'good'}{hint}")
    if not has_config:
        study = study_folder(run_dir)
        if study is not None:
            runs = _finished_runs(run_dir)
            hint = (f"; its finished runs include {', '.join(runs)}" if runs
                    else "; it has no finished run yet")
            raise RunDirError(f"--run {run_dir}: {study}, not a run; pass one of its runs{hint}")
        raise RunDirError(f"--run {run_dir}: not a run directory (no config.json); run "
                          f"`sparsebert finetune --out {run_dir}` first")
    if _is_model_dir(run_dir):
        parent = run_dir.parent
        if run_dir.name == "model" and _is_finished_run(parent):
            raise RunDirError(f"--run {run_dir}: is the model folder of the run {parent}, not "
                              f"a run directory; pass --run {parent}")
        raise RunDirError(f"--run {run_dir}: is a model directory (config.json and weights), "
                          f"not a run directory; pass the --out directory of a `sparsebert "
                          f"finetune` run")
    missing = model_missing(run_dir)
    if missing is not None:
        holder = lock_holder(run_dir)
        if holder is not None:
            who = f" (process {holder})" if holder else ""
            raise RunDirError(f"--run {run_dir}: the run is still training{who}; evaluate it "
                              f"once it has finished")
        done = RunResult.load(run_dir)
        if done is not None and done.finished:
            raise RunDirError(f"--run {run_dir}: the run finished but its model is gone "
                              f"({missing}); rerun the same finetune command (or the search or "
                              f"sweep command it is part of) to fine-tune it again, or delete "
                              f"the run directory {run_dir} to redo it")
        raise RunDirError(f"--run {run_dir}: the run is unfinished (no model/); rerun the "
                          f"same finetune command to resume it (without --stop-after-steps, or "
                          f"with a later step, if it stopped there)")
