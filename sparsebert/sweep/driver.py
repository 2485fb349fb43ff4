"""`sweep`: check the options, expand the grid, claim the sweep directory, place workers on
devices and run the units on the chosen backend (sparsebert.sweep.scheduler)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sparsebert.lottery.config import SearchConfig
from sparsebert.sweep.config import SweepConfig, SweepError
from sparsebert.sweep.grid import Grid, expand
from sparsebert.sweep.local import LocalBackend, Slot
from sparsebert.sweep.scheduler import Outcome, Scheduler
from sparsebert.sweep.state import SweepDir, identity
from sparsebert.train.config import TrainConfig
from sparsebert.train.evaluate import data_source

MAX_CPU_WORKERS = 4


def make_slots(config: SweepConfig, train: TrainConfig) -> list[Slot]:
    """Workers per device: on the CPU, `workers` slots sharing the cores (threads each:
    --threads, else cores // workers); on GPUs, per_gpu slots per device (or `workers` in
    all, round-robin over the devices)."""
    devices = config.device_list() if not config.ray_address else _cluster_devices(config)
    cores = os.cpu_count() or 1
    if devices == ["cpu"]:
        workers = config.workers or max(1, min(cores, MAX_CPU_WORKERS))
        threads = train.threads or max(1, cores // workers)
        return [Slot(i, "cpu", threads) for i in range(workers)]
    workers = config.workers or config.per_gpu * len(devices)
    threads = train.threads or max(1, cores // workers)
    return [Slot(i, devices[i % len(devices)], threads) for i in range(workers)]


def _cluster_devices(config: SweepConfig) -> list[str]:
    """On a Ray cluster the driver's machine may have no GPU: cpu or cuda, unchecked here."""
    names = [d.strip() for d in config.devices.split(",") if d.strip()]
    if names in (["auto"], ["cpu"]):
        return ["cpu"] if names == ["cpu"] else ["cuda"]
    if not all(n == "cuda" or n.startswith("cuda:") for n in names):
        raise SweepError(f"--devices {config.devices!r}: expected cpu, auto or cuda devices")
    return ["cuda"]


def sweep(out: str | os.PathLike, config: SweepConfig | None = None,
          search_config: SearchConfig | None = None, train_config: TrainConfig | None = None,
          progress: bool = True) -> Outcome:
    """Run (or resume, or extend) the sweep in `out`; returns what ran, failed and was
    skipped. Example:

        from sparsebert.sweep import SweepConfig, sweep
        sweep("runs/sweep", SweepConfig(tasks="RTE,MRPC", seeds="1,2"))
    """
    config = (config or SweepConfig()).validate()
    search = copy.copy(search_config or SearchConfig())
    methods = config.method_list()
    search.method = methods[0] if len(methods) == 1 else "both"
    search.validate()
    train = copy.copy(train_config or TrainConfig())
    if train.seed != TrainConfig.seed or train.task != TrainConfig.task:
        raise SweepError("the sweep sets task and seed per unit: use --tasks / --seeds")
    train = train.resolved()  # checks the values and fills the preset's lr
    train.glue_dir = data_source(train.glue_dir).get("path")
    grid = Grid(tuple(config.task_list()), tuple(config.seed_list()), tuple(methods),
                tuple(search.subnet_list()), search.retrain, config.super_survivors)
    units = expand(grid)
    slots = make_slots(config, train)  # checks the devices before anything is written
    if config.backend == "ray":
        from sparsebert.sweep.ray_backend import preflight  # noqa: PLC0415

        preflight(config.ray_address)  # Ray installed, the cluster reachable: before any write
    out = Path(out).resolve()
    state = SweepDir(out)
    notes = state.open(identity(grid, search, train))
    for note in notes if progress else []:
        tqdm.write(note)
    base: dict[str, Any] = {"out": str(out), "search": search.to_json(),
                            "train": train.to_json(), "seeds": list(grid.seeds),
                            "reports": config.reports}
    done = state.done()
    if any(u.id not in done for u in units if u.kind != "report"):
        (state.meta / "done" / "report.json").unlink(missing_ok=True)  # redo the report
    status = "interrupted"
    backend = None
    try:
        if any(u.id not in done for u in units):  # else nothing to start
            backend = _backend(config, slots)
        outcome = Scheduler(units, state, backend, base, config.retries, progress).run()
        status = "failed" if outcome.failed else "finished"
        return outcome
    finally:
        if backend is not None:
            backend.close()
        state.close(status)


def _backend(config: SweepConfig, slots: list[Slot]):
    if config.backend == "ray":
        from sparsebert.sweep.ray_backend import RayBackend  # noqa: PLC0415

        return RayBackend(slots, config.ray_address, config.per_gpu, config.unit_memory_gb)
    return LocalBackend(slots)
