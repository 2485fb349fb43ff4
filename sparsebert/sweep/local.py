"""The local backend: one spawned worker process per slot, each bound to a device.

On the CPU the cores are split between the workers (torch.set_num_threads per worker); on a
GPU, --per-gpu workers share each device, so several units train on it at once. A worker
keeps its loaded models and tokenized data between units (sparsebert.sweep.units), exits when
the driver dies (a watchdog on the parent), and is replaced when it dies itself (its unit is
reported failed and retried).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import queue
import signal
import threading
import traceback
from dataclasses import dataclass
from typing import Any


@dataclass
class Slot:
    """Room for one unit at a time on a device; `warm_key` says what its worker has loaded."""

    index: int
    device: str
    threads: int
    busy: str | None = None
    warm_key: Any = None
    pid: int | None = None


@dataclass
class Event:
    """A unit that ended: ok with the marker info, or not with a one-line error + details."""

    unit_id: str
    ok: bool
    info: dict[str, Any]


def error_info(error: BaseException) -> dict[str, Any]:
    return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:500],
            "traceback": "".join(traceback.format_exception(error))[-4000:]}


def _watch_parent() -> None:
    """Exit this worker at once when the driver process dies (no orphans writing on)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(3)


def _exit_now(code: int) -> None:
    """Leave at once, after the finalizers that unlink this process's named semaphores (e.g.
    tqdm's lock), which would otherwise be reported leaked when the sweep ends."""
    multiprocessing.util._run_finalizers(0)
    os._exit(code)


def _stop_now(signum, frame) -> None:
    _exit_now(128 + signum)


def worker_main(inbox, results, index: int) -> None:
    """A worker's loop: run unit specs from `inbox`, put (index, unit id, ok, info) on
    `results`; None ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, _stop_now)  # how the driver stops a busy worker
    threading.Thread(target=_watch_parent, daemon=True).start()
    from sparsebert.sweep.units import run_unit  # noqa: PLC0415 (after the spawn)

    while True:
        spec = inbox.get()
        if spec is None:  # sent once every result was received
            results.close()
            results.join_thread()  # our results are flushed to the pipe
            _exit_now(0)  # skip the rest of interpreter teardown (about a second after real work)
        try:
            results.put((index, spec["id"], True, run_unit(spec)))
        except BaseException as error:  # noqa: BLE001 (reported to the driver, which retries)
            results.put((index, spec["id"], False, error_info(error)))


class LocalBackend:
    """A pool of spawned workers, one per slot."""

    name = "local"

    def __init__(self, slots: list[Slot]) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.results = self.context.Queue()
        self.slots = slots
        self.workers: dict[int, tuple[Any, Any]] = {}
        for slot in slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        inbox = self.context.Queue()
        process = self.context.Process(target=worker_main, args=(inbox, self.results,
                                                                  slot.index),
                                       name=f"sparsebert-sweep-{slot.index}", daemon=True)
        process.start()
        slot.pid, slot.busy, slot.warm_key = process.pid, None, None
        self.workers[slot.index] = (process, inbox)

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.busy is None]

    def submit(self, slot: Slot, spec: dict[str, Any], warm_key: Any) -> None:
        slot.busy, slot.warm_key = spec["id"], warm_key
        self.workers[slot.index][1].put(spec)

    def poll(self, timeout: float) -> list[Event]:
        """Units that ended within `timeout` seconds, and those whose worker died."""
        events = []
        try:
            message = self.results.get(timeout=timeout)
            while True:
                index, unit_id, ok, info = message
                self.slots[index].busy = None
                events.append(Event(unit_id, ok, info))
                message = self.results.get_nowait()
        except queue.Empty:
            pass
        for slot in self.slots:
            process = self.workers[slot.index][0]
            if process.is_alive():
                continue
            if slot.busy is not None:
                events.append(Event(slot.busy, False, {
                    "error": f"worker {slot.index} (pid {process.pid}) died with exit code "
                             f"{process.exitcode} while running it"}))
            self._start(slot)  # a fresh worker takes the slot
        return events

    def close(self) -> None:
        """Idle workers finish cleanly; busy ones (the sweep was interrupted) are stopped at
        once: their units have no completion marker and rerun on resume."""
        for slot in self.slots:
            process, inbox = self.workers[slot.index]
            if slot.busy is not None:
                process.terminate()
            elif process.is_alive():
                inbox.put(None)
        for process, inbox in self.workers.values():
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
            inbox.close()
        self.results.close()
