"""The sweep's own options (what `sparsebert sweep` adds to the search and training flags),
and the optional TOML file (--config) that sets any of the three: CLI flags win over the file.

    # sweep.toml: keys are flag names with underscores, flat or under [sweep]/[search]/[train]
    tasks = "RTE,MRPC,CoLA"          # or a list: ["RTE", "MRPC"]
    seeds = [1337, 42, 86]
    max_train_examples = 500
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsebert.checks import is_finite_number, is_integer
from sparsebert.errors import ConfigError
from sparsebert.flags import field_type, help_field
from sparsebert.glue.tasks import GlueError, get_task
from sparsebert.lottery.config import METHODS, SearchConfig
from sparsebert.train.config import TrainConfig, is_valid_seed, parse_seeds, resolve_device

MAX_PER_GPU = 256  # units packed on one GPU; Ray requests 1 / per_gpu of it (>= 1e-4)
BACKENDS = ("local", "ray")
UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}  # --unit-timeout's suffixes
NO_STOP_AFTER_STEPS = ("does not apply to a sweep (every fine-tune would stop at that step and "
                       "fail); stop a sweep with Ctrl-C or kill, and rerun it to resume")


class SweepError(ConfigError):
    """A bad sweep option, a sweep directory that holds another grid, or a backend failure."""


class ClusterLost(SweepError):
    """The Ray cluster the sweep joined stopped answering while units ran."""


@dataclass
class SweepConfig:
    """The grid and how it is run."""

    tasks: str = help_field("comma-separated GLUE tasks", "RTE,MRPC,CoLA")
    seeds: str = help_field("comma-separated seeds (>= 2 for the super-survivors)",
                            "1337,42,86")
    methods: str = help_field("comma-separated methods: structured, magnitude",
                              "structured,magnitude")
    super_survivors: bool = help_field("super-survivor controls per task (structured, >= 2 "
                                       "seeds)", True)
    reports: bool = help_field("report.md + figures in every search and task directory, as "
                               "`sparsebert search` writes (the sweep's report is always "
                               "written)", True)
    workers: int | None = help_field("units run at once (default: per --devices: the CPU "
                                     "cores this process may use, capped at 4, on CPU; "
                                     "--per-gpu per GPU; on a Ray cluster (--ray-address): "
                                     "its CPUs / --threads, not capped, or --per-gpu per GPU "
                                     "of it)", None)
    devices: str = help_field("cpu, or comma-separated CUDA devices (cuda:0,cuda:1); auto: "
                              "every visible GPU, else cpu; on a Ray cluster (--ray-address) "
                              "cpu, cuda (Ray assigns the GPUs) or auto (its GPUs, else cpu)",
                              "auto")
    per_gpu: int = help_field("units packed onto each GPU at once", 4)
    backend: str = help_field("local (a process pool on this machine) or ray", "local")
    ray_address: str | None = help_field("address of a running Ray cluster (default: start a "
                                         "local Ray instance)", None)
    retries: int = help_field("times a failed unit is retried in one run", 1)
    unit_memory_gb: float = help_field("ray: memory each unit reserves, GB (0 = none)", 0.0)
    unit_timeout: str | None = help_field(
        "stop a unit that runs longer than this and count it failed (retried per --retries): "
        "seconds, or a number with s, m or h (90m, 2h); above the longest unit, a full "
        "fine-tune (default: no limit)", None)

    def timeout_seconds(self) -> float | None:
        """--unit-timeout in seconds; None when unset."""
        if self.unit_timeout is None:
            return None
        text = str(self.unit_timeout).strip().lower()
        scale = UNIT_SECONDS.get(text[-1:], None) if text else None
        number = text[:-1] if scale is not None else text
        try:
            seconds = float(number) * (scale or 1.0)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise SweepError(f"--unit-timeout {self.unit_timeout!r}: expected a positive "
                             "number of seconds, or one with s, m or h (e.g. 90m, 2h)")
        return seconds

    def task_list(self) -> list[str]:
        names = _split(self.tasks, "--tasks")
        try:
            return list(dict.fromkeys(get_task(n).name for n in names))
        except GlueError as error:
            raise GlueError(f"--tasks {self.tasks!r}: {error}") from None

    def seed_list(self) -> list[int]:
        seeds = parse_seeds(",".join(_split(self.seeds, "--seeds")))
        if seeds is None:
            raise SweepError(f"--seeds {self.seeds!r}: expected comma-separated integers "
                             "(e.g. 1337,42,86)")
        if len(set(seeds)) != len(seeds):
            raise SweepError(f"--seeds {self.seeds!r}: expected distinct seeds")
        if not all(map(is_valid_seed, seeds)):
            raise SweepError(f"--seeds {self.seeds!r}: expected integers in [0, 2**64 - 1]")
        return seeds

    def method_list(self) -> list[str]:
        methods = list(dict.fromkeys(_split(self.methods, "--methods")))
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SweepError(f"--methods {self.methods!r}: unknown {unknown}; expected a "
                             f"comma-separated subset of {','.join(METHODS)}")
        return [m for m in METHODS if m in methods]  # the search's own order

    def redo_list(self, redo: str) -> tuple[str, ...]:
        """--redo's methods, each one of the sweep's --methods."""
        methods = list(dict.fromkeys(_split(redo, "--redo")))
        grid = self.method_list()
        outside = [m for m in methods if m not in grid]
        if outside:
            raise SweepError(f"--redo {redo!r}: {outside} not among the sweep's --methods "
                             f"({','.join(grid)})")
        return tuple(m for m in grid if m in methods)

    def device_list(self) -> list[str]:
        """Devices checked to exist on this machine; 'auto' resolved."""
        names = _split(self.devices, "--devices")
        if names == ["auto"]:
            import torch  # noqa: PLC0415

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            return [f"cuda:{i}" for i in range(count)] or ["cpu"]
        for name in names:
            try:
                resolve_device(name)
            except ConfigError as error:  # "--device NAME: why" -> "--devices LIST: NAME: why"
                why = str(error).split(": ", 1)[-1].replace("--device ", "--devices ")
                raise SweepError(f"--devices {self.devices!r}: {name}: {why}") from None
        if "cpu" in names and len(names) > 1:
            raise SweepError(f"--devices {self.devices!r}: expected cpu alone, or CUDA devices")
        devices = [str(_indexed(resolve_device(n))) for n in names]
        if len(set(devices)) != len(devices):
            raise SweepError(f"--devices {self.devices!r}: a device is listed twice (use "
                             "--per-gpu to run more units on one GPU)")
        return devices

    def validate(self) -> SweepConfig:
        self.task_list(), self.seed_list(), self.method_list()
        if self.backend not in BACKENDS:
            raise SweepError(f"--backend {self.backend!r}: expected local or ray")
        for name, low in (("workers", 1), ("per_gpu", 1), ("retries", 0)):
            value = getattr(self, name)
            if value is None and name == "workers":
                continue
            if not is_integer(value) or value < low:
                raise SweepError(f"--{name.replace('_', '-')} {value!r}: expected an integer "
                                 f">= {low}")
        if self.per_gpu > MAX_PER_GPU:
            raise SweepError(f"--per-gpu {self.per_gpu}: expected 1 to {MAX_PER_GPU} units per "
                             "GPU")
        self.timeout_seconds()
        if not is_finite_number(self.unit_memory_gb) or self.unit_memory_gb < 0:
            raise SweepError(f"--unit-memory-gb {self.unit_memory_gb!r}: expected a finite "
                             "number >= 0 (0 = no reservation)")
        if self.ray_address and self.backend != "ray":
            raise SweepError("--ray-address needs --backend ray")
        if self.unit_memory_gb and self.backend != "ray":
            warnings.warn(f"--unit-memory-gb {self.unit_memory_gb:g}: reserved by Ray tasks "
                          f"only (--backend ray); ignored with --backend {self.backend}",
                          stacklevel=2)
        return self


def _indexed(device):
    """A torch.device with its index: plain "cuda" is the current GPU (so that "cuda,cuda:0"
    is seen to name one GPU twice)."""
    if device.type == "cuda" and device.index is None:
        import torch  # noqa: PLC0415

        # (0 unless this process chose another: CUDA is not initialised here for the index)
        return torch.device("cuda", torch.cuda.current_device()
                            if torch.cuda.is_initialized() else 0)
    return device


def _split(text: str, flag: str) -> list[str]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise SweepError(f"{flag} {text!r}: expected a comma-separated list")
    return parts


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Flat {field: value} from a TOML file; unknown keys are refused, lists joined."""
    try:
        import tomllib  # noqa: PLC0415 (Python >= 3.11)
    except ImportError:  # Python 3.10
        import tomli as tomllib  # noqa: PLC0415
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"--config {path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise SweepError(f"--config {path}: not a TOML file ({error})") from None
    except OSError as error:
        raise SweepError(f"--config {path}: cannot read it ({error.strerror or error})") \
            from None
    except tomllib.TOMLDecodeError as error:
        raise SweepError(f"--config {path}: not valid TOML ({error})") from None
    flat: dict[str, Any] = {}
    place: dict[str, str] = {}  # key -> where the file sets it
    for key, value in data.items():
        section = isinstance(value, dict) and key in ("sweep", "search", "train")
        for name, item in (value.items() if section else [(key, value)]):
            here = f"[{key}] {name}" if section else f"top-level {name}"
            if name in flat:
                raise SweepError(f"--config {path}: {name!r} is set twice ({place[name]} and "
                                 f"{here}); set it once")
            flat[name], place[name] = item, here
    owner = {f.name: cls for cls in (SweepConfig, SearchConfig, TrainConfig)
             for f in dataclasses.fields(cls)}  # field name -> its config class
    unknown = sorted(set(flat) - set(owner) - {"out"})
    if unknown:
        raise SweepError(f"--config {path}: unknown keys {unknown}")
    for key in ("method", "task", "seed", "device"):
        if key in flat:
            raise SweepError(f"--config {path}: {key!r} is set per unit by the sweep; use "
                             f"{key}s = ... instead")
    if "stop_after_steps" in flat:
        raise SweepError(f"--config {path}: stop_after_steps {NO_STOP_AFTER_STEPS}")
    values = {}
    for key, value in flat.items():
        if key == "out":  # the sweep directory, when --out is not given
            if not isinstance(value, str) or not value.strip():
                raise SweepError(f"--config {path}: out = {value!r}: expected a directory path")
            values[key] = value
        else:
            values[key] = _typed(path, key, value, owner[key])
    return values


def _typed(path: Path, key: str, value: Any, cls: type) -> Any:
    """A config file's value for field `key` of `cls`, checked against the field's type (lists
    of a comma-separated field joined; ints accepted for floats, numbers for string fields:
    `unit_timeout = 90` or `= 1.5` is a number of seconds)."""
    kind = field_type(cls, key)
    if isinstance(value, list) and kind is str:
        value = ",".join(map(str, value))
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, (str, int, float)) and not isinstance(value, bool)
          }.get(kind, True)
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number",
                    str: "a string or a number"}[kind]
        raise SweepError(f"--config {path}: {key} = {value!r}: expected {expected}")
    return float(value) if kind is float else str(value) if kind is str else value
