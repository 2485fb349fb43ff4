"""Running one unit (sparsebert.sweep.grid) in a worker process: the search stages of
sparsebert.lottery, each alone, with the worker's loaded models and tokenized data kept warm
between units of the same task x seed (a small LRU of prepared searches per process, and
sparsebert.train.data_cache for the fine-tunes' train and dev splits).

A unit's spec is a plain dict (it crosses process and Ray boundaries): the unit's fields plus
out (the sweep directory), search / train (config JSON), seeds, reports, device, threads and
attempt (1 for the first try).

SPARSEBERT_SWEEP_FAIL=PATTERN[:N][,PATTERN[:N]...] in the driver's environment makes units
whose id matches an fnmatch PATTERN fail on their first N attempts (default 1): a failure
injected through the real runner, to exercise retries and failure reports.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from sparsebert.errors import ConfigError
from sparsebert.lottery.config import SearchConfig
from sparsebert.lottery.full_model import full_model_replaced
from sparsebert.lottery.search import Search, write_report
from sparsebert.lottery.summary import SUMMARY_VERSION
from sparsebert.lottery.super_survivors import SUPER_VERSION, SuperStage
from sparsebert.train import data_cache
from sparsebert.train.config import TrainConfig
from sparsebert.train.rundir import RESULTS_NAME, model_missing

FAIL_ENV = "SPARSEBERT_SWEEP_FAIL"
WARM_SEARCHES = 3  # prepared searches kept per worker (model copies + tokenized dev sets)

_warm: OrderedDict[tuple, Search] = OrderedDict()


class InjectedFailure(RuntimeError):
    """Raised for units matched by SPARSEBERT_SWEEP_FAIL."""


def task_dir(spec: dict[str, Any]) -> Path:
    return Path(spec["out"]) / spec["task"]


def seed_dir(spec: dict[str, Any], seed: int) -> Path:
    return task_dir(spec) / f"seed_{seed}"


def _configs(spec: dict[str, Any], seed: int | None) -> tuple[SearchConfig, TrainConfig]:
    search = SearchConfig.from_json(spec["search"])
    train = TrainConfig.from_json(spec["train"])
    train.task = spec["task"]
    if seed is not None:
        train.seed = seed
    train.device, train.threads = spec["device"], spec["threads"]
    return search, train


def _search(spec: dict[str, Any], seed: int, prepared: bool = True) -> Search:
    """The Search of `seed` in this task; prepared ones are kept warm in this process."""
    search, train = _configs(spec, seed)
    if not prepared:
        return Search(search, train, seed_dir(spec, seed), progress=False)
    key = (str(seed_dir(spec, seed)), spec["device"], repr(spec["search"]), repr(spec["train"]))
    if key in _warm:
        _warm.move_to_end(key)
        return _warm[key]
    runner = Search(search, train, seed_dir(spec, seed), progress=False)
    runner.load_full()
    _warm[key] = runner
    while len(_warm) > WARM_SEARCHES:
        _warm.popitem(last=False)
    return runner


def _super(spec: dict[str, Any]) -> SuperStage:
    search, train = _configs(spec, None)
    return SuperStage(spec["task"], task_dir(spec), list(spec["seeds"]), search, train,
                      progress=False, runner_for=lambda seed: _search(spec, seed))


def fail_rules(text: str) -> list[tuple[str, int]]:
    """SPARSEBERT_SWEEP_FAIL's (pattern, attempts) rules; ConfigError naming the variable for
    a rule that is not PATTERN[:N] with N an integer >= 1."""
    rules = []
    for rule in filter(None, (part.strip() for part in text.split(","))):
        pattern, colon, count = rule.partition(":")
        pattern, count = pattern.strip(), count.strip()
        if not pattern or (colon and not (count.isdecimal() and int(count) >= 1)):
            raise ConfigError(f"{FAIL_ENV}={text!r}: rule {rule!r} is not PATTERN[:N] with N "
                              f"an integer >= 1")
        rules.append((pattern, int(count) if colon else 1))
    return rules


def _check_injected_failure(spec: dict[str, Any]) -> None:
    """The driver's SPARSEBERT_SWEEP_FAIL, passed in the spec (workers on a Ray cluster run
    with the environment of `ray start`, not the driver's); this process's when absent."""
    rules = spec.get("fail_injection")
    for pattern, attempts in fail_rules(os.environ.get(FAIL_ENV, "") if rules is None
                                        else rules):
        if fnmatch.fnmatchcase(spec["id"], pattern) and spec["attempt"] <= attempts:
            raise InjectedFailure(f"{FAIL_ENV} {pattern}:{attempts}: failing {spec['id']} on "
                                  f"attempt {spec['attempt']}")


def run_unit(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one unit (idempotent: finished stages are skipped); returns what its marker
    records: seconds (wall), cpu_seconds (the worker's CPU time over the unit), where it ran
    (host and worker pid: a Ray task's worker is known only here), and the unit's headline
    numbers when it has some. A unit that raises leaves no warm search
    behind (a stage stopped half-way may have left its loaded models changed)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    data_cache.enable()  # tokenized train/dev splits shared by this worker's fine-tunes
    torch.set_num_threads(spec["threads"])
    _check_injected_failure(spec)
    try:
        info = _run(spec)
    except BaseException:
        _warm.clear()
        raise
    return {"seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,  # this worker, all its threads
            "device": spec["device"], "host": socket.gethostname(), "pid": os.getpid(), **info}


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    """The unit's stage; returns its headline numbers."""
    kind, seed, method, subnet = spec["kind"], spec["seed"], spec["method"], spec["subnet"]
    info: dict[str, Any] = {}
    if kind == "full":
        result = _search(spec, seed, prepared=False).full_stage()
        info["score"] = result.score
    elif kind == "search":
        found = getattr(_search(spec, seed), f"{method}_search_stage")()
        info["fraction_kept"] = found["fraction_kept"]
    elif kind == "pruned":
        getattr(_search(spec, seed), f"{method}_pruned_stage")(subnet)
    elif kind == "retrained":
        result = getattr(_search(spec, seed), f"{method}_retrained_stage")(subnet)
        info["score"] = result.score
    elif kind == "summary":
        runner = _search(spec, seed)
        runner.summary_stage(report=False)
        info["reports"] = _report(runner.out, spec["reports"])
    elif kind == "super-masks":
        _super(spec).masks_stage()
    elif kind == "super-pruned":
        _super(spec).pruned_stage(seed, subnet)
    elif kind == "super-retrained":
        _super(spec).retrained_stage(seed, subnet)
    elif kind == "super-summary":
        _super(spec).summary_stage(report=False)
    elif kind == "task-report":
        info["reports"] = _report(task_dir(spec), spec["reports"])
    elif kind == "report":  # written with or without --reports (it is the sweep's result)
        info["reports"] = write_report(Path(spec["out"]))
    else:
        raise ValueError(f"unknown unit kind {kind!r}")
    return info


def _report(folder: Path, reports: bool) -> bool:
    """Write `folder`'s report.md and figures/ (sparsebert.report) when `reports` is on. Off
    (--no-reports), a report already there described the results before this unit ran again
    (an extended grid, a redo): report.md and figures/ are removed rather than left stale.
    False (no report written) makes a later run with reports on redo the unit."""
    if reports:
        return write_report(folder)
    (folder / "report.md").unlink(missing_ok=True)
    shutil.rmtree(folder / "figures", ignore_errors=True)
    return False


def output_present(out: Path, unit, marker: dict[str, Any]) -> bool:
    """Whether what `unit` wrote is still in the sweep directory `out` (its done `marker`
    stands for it: a folder deleted, a summary damaged or a full model replaced by hand is made
    again, with what is built on it). The report units' report.md counts where the marker
    says one was written."""
    seed = out / str(unit.task) / f"seed_{unit.seed}"
    sup = out / str(unit.task) / "super"
    files = {
        "search": seed / str(unit.method) / "search.json",
        "pruned": seed / str(unit.method) / "pruned" / f"{unit.subnet}.json",
        "super-masks": sup / "masks.json",
        "super-pruned": sup / "pruned" / str(unit.subnet) / f"seed_{unit.seed}.json",
    }
    runs = {
        "full": seed / "full",
        "retrained": seed / str(unit.method) / "retrained" / str(unit.subnet),
        "super-retrained": sup / "retrained" / str(unit.subnet) / f"seed_{unit.seed}",
    }
    summaries = {"summary": seed / "summary.json", "super-summary": sup / "summary.json"}
    reports = {"summary": seed, "task-report": out / str(unit.task), "report": out}
    if unit.kind in files:
        return files[unit.kind].is_file()
    if unit.kind in runs:  # a finished run (its results.json and model/, as the stage checks)
        results = _json_object(runs[unit.kind] / RESULTS_NAME)
        finished = (results is not None and results.get("status") == "finished"
                    and model_missing(runs[unit.kind]) is None)
        # a full model replaced by hand: the full unit's check sets aside what was built on
        # the old one (sparsebert.lottery.full_model)
        return finished and not (unit.kind == "full" and full_model_replaced(seed))
    if unit.kind in summaries and not _is_summary(summaries[unit.kind], unit.kind):
        return False
    if unit.kind in reports and marker.get("reports") is True:
        return (reports[unit.kind] / "report.md").is_file()
    return True


# The kind and version of summary.json each summary unit writes (sparsebert.lottery.summary,
# sparsebert.lottery.super_survivors: what sparsebert.report reads).
SUMMARY_KINDS = {"summary": ("sparsebert-search", SUMMARY_VERSION),
                 "super-summary": ("sparsebert-super", SUPER_VERSION)}


def _is_summary(path: Path, unit_kind: str) -> bool:
    """Whether `path` holds a summary of the kind and version the `unit_kind` unit writes (a
    JSON object of another shape, put there by hand, counts as no summary)."""
    data = _json_object(path)
    return data is not None and (data.get("kind"), data.get("version")) == SUMMARY_KINDS[unit_kind]


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object `path` holds; None when it is missing, damaged or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def unit_spec(unit, base: dict[str, Any], attempt: int, device: str, threads: int
              ) -> dict[str, Any]:
    """The dict a worker runs: the unit, the sweep-wide fields, its placement and attempt."""
    return {**copy.deepcopy(base), **unit.spec(), "attempt": attempt, "device": device,
            "threads": threads}
