"""The fine-tuning run's configuration, presets and device / precision choices (the precisions
themselves: sparsebert.precision).

The base recipe is the paper's (PAPER.md §0): AdamW, lr 2e-5, 3 epochs, batch 32, max length
128, linear decay, no warmup, no weight decay, gradient clipping at 1.0. Preset "paper" is that
recipe; preset "minilm" is the same with the learning rate measured to train the default model
(all-MiniLM-L6-v2) well. Preset "auto" (the default) picks "minilm" for the default model and
"paper" for any other model. bf16 autocast on GPU, fp32 on CPU.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sparsebert.checks import is_finite_number, is_integer
from sparsebert.errors import ConfigError
from sparsebert.flags import dataclass_from_json, help_field
from sparsebert.glue.tasks import GlueError, get_task
from sparsebert.hf.loading import is_default_model
from sparsebert.precision import PRECISIONS, autocast  # noqa: F401 (re-exported)

# The paper's learning rate, and the one measured for the default model (results/README.md).
PRESETS: dict[str, dict[str, Any]] = {"paper": {"lr": 2e-5}, "minilm": {"lr": 1e-4}}
# Fields that may differ when resuming a run (they change what is computed by rounding at most:
# another thread count sums in another order, within about 1e-7 of the weights).
RUNTIME_FIELDS = frozenset({"glue_dir", "threads", "checkpoint_every", "log_every",
                            "stop_after_steps", "device", "eval_batch_size", "cuda_graphs"})
def local_model_path(model: str) -> str:
    """A --model naming a local directory, as its absolute path (a relative path would name
    another model when a run is resumed from another directory; ./m/ and /abs/m are the same
    model); the default model and hub ids as given."""
    if is_default_model(model):
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _model_forms(model: str) -> set[str]:
    """The strings that name the same model as `model` here: as given, its local directory's
    real path, and its absolute path without following links (a folder since deleted)."""
    path = Path(model).expanduser()
    return {model, local_model_path(model), os.path.normpath(path.absolute())}


def same_setting(name: str, saved: Any, requested: Any) -> bool:
    """Whether a run's recorded training setting is the requested one. A model is the same when
    both name the same folder from here, however written: a relative path (which versions
    before real paths were recorded kept as typed), ~, a link, a trailing slash."""
    if name in NEW_FIELDS:  # left out of a record at its default
        saved = NEW_FIELDS[name] if saved is None else saved
        requested = NEW_FIELDS[name] if requested is None else requested
    if saved == requested:
        return True
    return (name == "model" and isinstance(saved, str) and isinstance(requested, str)
            and bool(_model_forms(saved) & _model_forms(requested)))


# Fields added after runs were recorded, with the default that runs without them had: left out
# of to_json() at that default, so that earlier runs, searches and sweeps keep their identity.
NEW_FIELDS: dict[str, Any] = {"grad_accum": 1}


def compared_settings(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """The training settings to compare between a record and a request (both to_json()): the
    requested ones and any NEW_FIELDS the record holds (a non-default one it has)."""
    return list(requested) + [k for k in NEW_FIELDS if k in saved and k not in requested]


def recorded(data: dict[str, Any], name: str) -> Any:
    """A training setting of a to_json() record, NEW_FIELDS' defaults where left out."""
    return data.get(name, NEW_FIELDS.get(name))


# Seeds feed numpy's default_rng (non-negative) and torch.manual_seed (at most 2**64 - 1).
MAX_SEED = 2**64 - 1
# The shortest --max-length (room for [CLS], [SEP] and a few tokens of each text).
MIN_MAX_LENGTH = 8
# With CUDA graphs, batch widths are rounded up to this multiple (one graph per shape).
GRAPH_PAD_MULTIPLE = 16


def is_valid_seed(seed: object) -> bool:
    """An integer (not a bool) in [0, MAX_SEED]: what every RNG of a run accepts."""
    return is_integer(seed) and 0 <= seed <= MAX_SEED


def parse_seeds(text: str) -> list[int] | None:
    """"1337, 42,86" -> [1337, 42, 86]; None unless every comma-separated part is a plain
    decimal integer, "-" allowed (is_valid_seed then names the range), no underscores or
    non-ASCII digits (int() would read "3_0" as 30)."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not all(re.fullmatch(r"-?[0-9]+", part) for part in parts):
        return None
    return [int(part) for part in parts]


class TrainError(ConfigError):
    """Bad training config or run directory."""


_help = help_field


@dataclass
class TrainConfig:
    """Everything that defines a fine-tuning run; round-trips to JSON and to CLI flags."""

    task: str = _help("GLUE task (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI)", "RTE")
    model: str = _help("'default' (all-MiniLM-L6-v2), a local model directory or a hub id",
                       "default")
    preset: str = _help("hyper-parameter preset: paper, minilm, or auto (minilm for the "
                        "default model, else paper); sets lr when --lr is not given", "auto")
    lr: float | None = _help("peak learning rate (default: from the preset)", None)
    epochs: int = _help("training epochs", 3)
    batch_size: int = _help("training batch size (examples per optimizer step)", 32)
    grad_accum: int = _help("gradient accumulation: run each batch as N micro-batches whose "
                            "gradients add up before the optimizer step (less memory; the same "
                            "update up to rounding and dropout draws; no CUDA graphs)", 1)
    max_length: int = _help("max tokens per example (pairs truncated longest-first)", 128)
    seed: int = _help("seed of data order, subset, classifier init and dropout", 42)
    warmup_steps: int = _help("linear warmup steps", 0)
    weight_decay: float = _help("AdamW weight decay (not on biases / LayerNorm)", 0.0)
    adam_eps: float = _help("AdamW epsilon", 1e-8)
    grad_clip: float = _help("max gradient norm (0 = no clipping)", 1.0)
    max_train_examples: int | None = _help("train on a seeded random subset of N examples", None)
    bucket: bool = _help("length-bucketed batches (else plain shuffled batches)", True)
    padding: str = _help("dynamic (pad to the batch's longest) or max_length", "dynamic")
    precision: str = _help("auto (bf16 on GPU, fp32 on CPU), fp32 or bf16", "auto")
    device: str = _help("auto, cpu, cuda, cuda:N", "auto")
    cuda_graphs: str = _help("capture the training step as a CUDA graph per batch shape: "
                             "auto (on for CUDA devices), on or off", "auto")
    eval_batch_size: int = _help("evaluation batch size", 128)
    glue_dir: str | None = _help("GLUE download folder (default: $GLUE_DIR, else the hub)", None)
    checkpoint_every: int = _help("also checkpoint every N steps (0 = at epoch ends only)", 0)
    log_every: int = _help("log train loss / throughput every N steps", 20)
    threads: int | None = _help("torch CPU threads (default: torch's choice)", None)
    stop_after_steps: int | None = _help(
        "checkpoint and stop once the run reaches step N (a rerun with the same N stops there "
        "again: drop it or raise it to go on)", None)

    def resolved(self) -> TrainConfig:
        """A copy with task canonical, preset chosen and lr filled in; checks values."""
        try:
            task = get_task(self.task).name
        except GlueError as error:
            raise GlueError(f"--task {self.task!r}: {error}") from None
        preset = self.preset
        if preset == "auto":
            preset = "minilm" if is_default_model(self.model) else "paper"
        if preset not in PRESETS:
            raise TrainError(f"--preset {self.preset!r}: expected auto or one of "
                             f"{', '.join(sorted(PRESETS))}")
        lr = self.lr if self.lr is not None else PRESETS[preset]["lr"]
        out = dataclasses.replace(self, task=task, preset=preset, lr=lr,
                                  model=local_model_path(self.model))
        out.check_values()  # before float(lr): lr=True or "2e-5" is refused, not read as a number
        out.lr = float(out.lr)
        for f in dataclasses.fields(out):  # NumPy scalars -> Python numbers (JSON, seeding)
            value = getattr(out, f.name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                setattr(out, f.name, int(value))
            elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
                setattr(out, f.name, float(value))
        return out

    def check_values(self) -> None:
        """Every numeric and choice field in range; TrainError names the flag (--max-length)."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model).strip():
            # (an unset shell variable, --model "$MODEL", would train the default model)
            raise TrainError(f"--model {self.model!r}: expected 'default', a local model "
                             "directory or a hub id")
        at_least = {"epochs": 1, "batch_size": 1, "grad_accum": 1, "eval_batch_size": 1,
                    "log_every": 1,
                    "max_length": MIN_MAX_LENGTH, "warmup_steps": 0, "checkpoint_every": 0,
                    "threads": 1, "stop_after_steps": 1, "max_train_examples": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is None and name in ("threads", "stop_after_steps", "max_train_examples"):
                continue
            if not is_integer(value) or value < low:
                raise TrainError(f"{flag(name)} {value!r}: expected an integer >= {low}")
        if self.grad_accum > self.batch_size:
            raise TrainError(f"--grad-accum {self.grad_accum}: expected at most --batch-size "
                             f"({self.batch_size}) micro-batches per batch")
        if not is_valid_seed(self.seed):
            raise TrainError(f"--seed {self.seed!r}: expected an integer in [0, 2**64 - 1]")
        for name, positive in (("lr", True), ("adam_eps", True), ("weight_decay", False),
                               ("grad_clip", False)):
            value = getattr(self, name)
            if value is None and name == "lr":
                continue  # from the preset (resolved)
            if not is_finite_number(value) or (value <= 0 if positive else value < 0):
                raise TrainError(f"{flag(name)} {value!r}: expected a finite number "
                                 f"{'> 0' if positive else '>= 0'}")
        for name, choices in (("padding", ("dynamic", "max_length")),
                              ("precision", PRECISIONS),
                              ("cuda_graphs", ("auto", "on", "off"))):
            if getattr(self, name) not in choices:
                raise TrainError(f"{flag(name)} {getattr(self, name)!r}: expected one of "
                                 f"{', '.join(choices)}")

    def to_json(self) -> dict[str, Any]:
        """Every field, except those added since runs were first recorded while they hold
        their default (NEW_FIELDS): a run of the defaults is recorded as before them."""
        data = asdict(self)
        for name, default in NEW_FIELDS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_json(cls, data, TrainError)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; checks that a named device exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # a bad name; not a string or device (None)
        raise TrainError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise TrainError(f"--device {name}: this torch ({torch.__version__}) is built "
                             f"without CUDA; use --device cpu (or install a CUDA build)")
        count = torch.cuda.device_count()
        if count == 0:
            raise TrainError(f"--device {name}: no CUDA device is visible; use --device cpu")
        if device.index is not None and device.index >= count:
            raise TrainError(f"--device {name}: only {count} CUDA device(s) visible "
                             f"(cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise TrainError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def use_cuda_graphs(config: TrainConfig, device: torch.device) -> bool:
    """Whether the run captures its training step as CUDA graphs."""
    if config.cuda_graphs == "on" and device.type != "cuda":
        raise TrainError(f"--cuda-graphs on: needs a CUDA device, got --device {device}")
    if config.grad_accum > 1:  # (a graph captures one forward and backward per step)
        if config.cuda_graphs == "on":
            raise TrainError(f"--cuda-graphs on: not with --grad-accum {config.grad_accum} "
                             "(use --cuda-graphs auto or off)")
        return False
    return config.cuda_graphs == "on" or (config.cuda_graphs == "auto" and device.type == "cuda")
