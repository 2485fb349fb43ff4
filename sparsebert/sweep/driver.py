"""`sweep`: check the options, expand the grid, claim the sweep directory, place workers on
devices and run the units on the chosen backend (sparsebert.sweep.scheduler)."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sparsebert.atomic import atomic_write_json, read_json
from sparsebert.errors import RunDirError
from sparsebert.lottery.config import SearchConfig
from sparsebert.lottery.search import check_search_dir
from sparsebert.lottery.subnetworks import SUBNETWORKS
from sparsebert.sweep.config import (
    NO_STOP_AFTER_STEPS,
    ClusterLost,
    SweepConfig,
    SweepError,
)
from sparsebert.sweep.grid import Grid, expand
from sparsebert.sweep.local import (
    UNGUARDED_SCRIPT,
    UNGUARDED_SCRIPT_EXIT,
    WORKER_NAME,
    LocalBackend,
    Slot,
)
from sparsebert.sweep.scheduler import Outcome, Scheduler
from sparsebert.sweep.state import SweepDir, identity
from sparsebert.sweep.units import FAIL_ENV, fail_rules, output_present
from sparsebert.train.config import TrainConfig
from sparsebert.train.evaluate import data_source

MAX_CPU_WORKERS = 4


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: a cluster job's cpuset, taskset),
    not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # (no affinity API: macOS, Windows)
        return os.cpu_count() or 1


def make_slots(config: SweepConfig, train: TrainConfig,
               cluster: dict[str, float] | None = None, most: int | None = None) -> list[Slot]:
    """Workers per device: on the CPU, `workers` slots sharing the cores this process may use
    (threads each: --threads, else cores // workers); on GPUs, per_gpu slots per device (or
    `workers` in all, round-robin over the devices). `cluster`: the resources of a running Ray
    cluster (--ray-address), whose CPUs and GPUs size the slots instead of this machine's.
    `most`: at most that many slots (the grid's units), their threads still those of the full
    width."""
    if cluster is not None:
        return _cluster_slots(config, train, cluster, most)
    devices = config.device_list()
    cores = usable_cores()
    if devices == ["cpu"]:
        if config.per_gpu != SweepConfig.per_gpu:
            warnings.warn(f"--per-gpu {config.per_gpu}: no GPU among --devices "
                          f"({config.devices}); ignored (--workers sets the CPU units)",
                          stacklevel=3)
        workers = config.workers or max(1, min(cores, MAX_CPU_WORKERS))
        threads = train.threads or max(1, cores // workers)
        if workers * threads > cores:
            warnings.warn(f"--workers {workers} x {threads} thread(s) each on {cores} cores: the "
                          "workers compete for the cores (more memory, no faster)", stacklevel=3)
        return [Slot(i, "cpu", threads) for i in range(_width(workers, most))]
    workers = config.workers or config.per_gpu * len(devices)
    threads = train.threads or max(1, cores // workers)
    return [Slot(i, devices[i % len(devices)], threads) for i in range(_width(workers, most))]


def _width(workers: int, most: int | None) -> int:
    """How many of `workers` slots to make: no more than `most` (at least one)."""
    return workers if most is None else min(workers, max(1, most))


def _cluster_slots(config: SweepConfig, train: TrainConfig,
                   cluster: dict[str, float], most: int | None) -> list[Slot]:
    """Slots on a running Ray cluster: GPUs x --per-gpu GPU slots (devices auto or cuda*), or
    CPU slots of --threads (default 1) CPUs each, as many as the cluster's CPUs hold."""
    names = [d.strip() for d in config.devices.split(",") if d.strip()]
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    if not names or not all(n in ("auto", "cpu", "cuda") or n.startswith("cuda:")
                            for n in names):
        raise SweepError(f"--devices {config.devices!r}: expected cpu, auto or cuda devices")
    indexed = [n for n in names if n.startswith("cuda:")]
    if indexed:  # Ray hands each task the GPU it chose (as cuda:0): an index would be ignored
        raise SweepError(f"--devices {config.devices!r}: on the Ray cluster at "
                         f"{config.ray_address} Ray assigns the GPUs; pass --devices cuda "
                         "(or auto), with --per-gpu units per GPU")
    wants_gpu = names != ["cpu"] and (names != ["auto"] or gpus > 0)
    if wants_gpu and gpus == 0:
        raise SweepError(f"--devices {config.devices!r}: the Ray cluster at "
                         f"{config.ray_address} has no GPUs (resources: {cpus} CPUs); use "
                         "--devices cpu")
    if wants_gpu:
        workers = config.workers or config.per_gpu * gpus
        threads = train.threads or max(1, cpus // workers)
        return [Slot(i, "cuda", threads) for i in range(_width(workers, most))]
    threads = train.threads or 1
    workers = config.workers or max(1, cpus // threads)
    return [Slot(i, "cpu", threads) for i in range(_width(workers, most))]


def check_inputs(grid: Grid, train: TrainConfig, out: Path) -> None:
    """Before anything is written: the model loads (a local directory holds config.json), can be
    patched, --max-length fits its position limit and, with a local GLUE folder, every task's
    train and dev files are there; every seed already started in `out` began on the same data
    and model files (its data.json and model.json), so that a resumed or extended sweep never
    mixes two datasets or two models; and without a GLUE folder, `datasets` is installed to
    reach the hub."""
    from sparsebert.glue.loading import check_hub_reachable, check_local_splits  # noqa: PLC0415
    from sparsebert.glue.tasks import get_task  # noqa: PLC0415
    from sparsebert.hf.loading import preflight_model  # noqa: PLC0415
    from sparsebert.train.data_identity import DATA_FILE, check_data  # noqa: PLC0415
    from sparsebert.train.model_identity import MODEL_FILE, check_model  # noqa: PLC0415

    preflight_model(train.model, max_length=train.max_length, patchable=True)
    for task in grid.tasks:  # (the hub itself is reached by each unit)
        check_local_splits(task, train.glue_dir)
        for started in sorted((out / task).glob(f"seed_*/{DATA_FILE}")):
            try:
                check_data(started.parent, get_task(task), train.glue_dir)
            except RunDirError as error:
                raise SweepError(f"{error} (the sweep's other seeds must use the same data)"
                                 ) from None
        for started in sorted((out / task).glob(f"seed_*/{MODEL_FILE}")):
            try:
                check_model(started.parent, train.model)
            except RunDirError as error:
                raise SweepError(f"{error} (the sweep's other seeds must use the same model)"
                                 ) from None
        check_hub_reachable(task, train.glue_dir)  # no GLUE folder: `datasets` is installed


def sweep(out: str | os.PathLike, config: SweepConfig | None = None,
          search_config: SearchConfig | None = None, train_config: TrainConfig | None = None,
          progress: bool = True, redo: str | None = None) -> Outcome:
    """Run (or resume, or extend) the sweep in `out`; returns what ran, failed and was
    skipped. `redo`: comma-separated methods whose finished results are set aside and computed
    again (sparsebert.sweep.state). Example:

        from sparsebert.sweep import SweepConfig, sweep

        if __name__ == "__main__":  # (each spawned worker imports this script)
            sweep("runs/sweep", SweepConfig(tasks="RTE,MRPC", seeds="1,2"))
    """
    if multiprocessing.current_process().name.startswith(WORKER_NAME):
        # a worker importing a script that calls sweep() unguarded: a nested sweep would only
        # fail on the lock; the driver tells the user (UNGUARDED_SCRIPT) and stops
        print(f"sparsebert sweep: {UNGUARDED_SCRIPT}", file=sys.stderr)
        raise SystemExit(UNGUARDED_SCRIPT_EXIT)
    for name, given, kind in (("config", config, SweepConfig),
                              ("search_config", search_config, SearchConfig),
                              ("train_config", train_config, TrainConfig)):
        if given is not None and not isinstance(given, kind):
            raise SweepError(f"sweep: {name!r} must be a {kind.__name__} (or None), got "
                             f"{type(given).__name__}")
    config = (config or SweepConfig()).validate()
    fail_injection = os.environ.get(FAIL_ENV, "")
    fail_rules(fail_injection)  # a malformed rule is refused before anything runs
    redo_methods = config.redo_list(redo) if redo is not None else ()
    search = copy.copy(search_config or SearchConfig())
    methods = config.method_list()
    search.method = methods[0] if len(methods) == 1 else "both"
    search.validate()
    train = copy.copy(train_config or TrainConfig())
    if train.seed != TrainConfig.seed or train.task != TrainConfig.task:
        raise SweepError("the sweep sets task and seed per unit: use --tasks / --seeds")
    if train.stop_after_steps is not None:
        raise SweepError(f"stop_after_steps {NO_STOP_AFTER_STEPS}")
    train = train.resolved()  # checks the values and fills the preset's lr
    train.glue_dir = data_source(train.glue_dir).get("path")
    subnets = tuple(s for s in SUBNETWORKS if s in search.subnet_list())  # in a fixed order
    out = Path(out).expanduser().resolve()
    grid = Grid(tuple(config.task_list()), tuple(_in_saved_order(out, config.seed_list())),
                tuple(methods), subnets, search.retrain, config.super_survivors)
    check_inputs(grid, train, out)
    units = expand(grid)
    cluster = None
    if config.backend == "ray":
        from sparsebert.sweep import ray_backend  # noqa: PLC0415

        cluster = ray_backend.preflight(config.ray_address)  # Ray installed, the cluster answers
    slots = make_slots(config, train, cluster and cluster.resources, len(units))  # checks
    # the devices
    if cluster is not None:  # a unit that no node can hold: refused before anything is written
        ray_backend.check_feasible(slots, cluster.nodes, config.per_gpu, config.unit_memory_gb)
    elif config.backend == "ray":  # (the instance the sweep starts: its share of the memory
        ray_backend.check_local_memory(config.unit_memory_gb)  # is checked when it starts)
    if train.cuda_graphs == "on" and any(slot.device == "cpu" for slot in slots):
        raise SweepError(f"--cuda-graphs on: needs CUDA devices, got --devices {config.devices!r} "
                         "(CPU slots)")
    state = SweepDir(out)
    notes = state.open(identity(grid, search, train), redo_methods,
                       after_redo=lambda methods: _record_settings(out, grid, search, train,
                                                                   methods))
    status = "interrupted"
    backend = None
    try:  # from here on, however the run ends, sweep.json and status.json record it
        if len(grid.seeds) == 1 and "structured" in grid.methods and grid.super_survivors:
            notes.append("one seed: no super-survivors and no task report over seeds (they "
                         "need >= 2 seeds; a later sweep with more seeds reuses this one)")
        for note in notes if progress else []:
            tqdm.write(note, file=sys.stderr)
        base: dict[str, Any] = {"out": str(out), "search": search.to_json(),
                                "train": train.to_json(), "seeds": list(grid.seeds),
                                "reports": config.reports,
                                "fail_injection": fail_injection}
        # e.g. the reports of an extended grid, or an output deleted by hand
        done = state.drop_stale(units, config.reports,
                                present=lambda unit, marker: output_present(out, unit, marker))
        if state.missing:
            shown = ", ".join(state.missing[:5]) + (" ..." if len(state.missing) > 5 else "")
            notes.append(f"{len(state.missing)} done unit(s) whose output is gone (deleted or "
                         f"damaged) run again, with what is built on them: {shown}")
            if progress:
                tqdm.write(notes[-1], file=sys.stderr)
        pending = sum(u.id not in done for u in units)
        if pending:  # else nothing to start; never more workers than units left to run
            backend = _backend(config, slots[:pending])
        outcome = Scheduler(units, state, backend, base, config.retries, progress,
                            unit_timeout=config.timeout_seconds()).run()
        outcome.notes = list(notes)
        status = "failed" if outcome.failed else "finished"
        return outcome
    except ClusterLost as error:  # the cluster stopped answering while units ran
        status = f"stopped: {error}"
        raise
    except SweepError as error:  # e.g. a Ray cluster that cannot hold a unit
        status = f"refused: {error}"
        raise
    finally:
        try:  # a second Ctrl-C while the workers stop still records the run's end
            if backend is not None:
                backend.close()
        finally:
            state.close(status)


def _in_saved_order(out: Path, seeds: list[int]) -> list[int]:
    """`seeds` in the order the sweep in `out` recorded them, added ones after: the
    super-survivor draw follows the seed order, so a rerun that lists the same seeds in
    another order (an accepted, equal grid) draws what the first run would have."""
    try:
        saved = json.loads((out / "sweep.json").read_text())["identity"]["grid"]["seeds"]
    except (OSError, ValueError, KeyError, TypeError):  # a new sweep (or not one: refused
        return seeds  # when the directory is claimed)
    if not isinstance(saved, list):
        return seeds
    return [s for s in saved if s in seeds] + [s for s in seeds if s not in saved]


def _record_settings(out: Path, grid: Grid, search: SearchConfig, train: TrainConfig,
                     redo: tuple[str, ...]) -> None:
    """After --redo set its methods' results aside: the searches already begun take this
    run's search settings (their config.json), which may differ in the redone methods'
    settings only; the training settings stay as the search recorded them."""
    for task in grid.tasks:
        for seed in grid.seeds:
            folder = out / task / f"seed_{seed}"
            if (folder / "config.json").is_file():
                seed_train = copy.copy(train)
                seed_train.task, seed_train.seed = task, seed
                check_search_dir(folder, search, seed_train, redo, write=False)
                saved = read_json(folder / "config.json", "restore it, or use another --out")
                atomic_write_json(folder / "config.json", {**saved, "search": search.to_json()})


def _backend(config: SweepConfig, slots: list[Slot]):
    if config.backend == "ray":
        from sparsebert.sweep.ray_backend import RayBackend  # noqa: PLC0415

        return RayBackend(slots, config.ray_address, config.per_gpu, config.unit_memory_gb)
    return LocalBackend(slots)
