"""The local backend: one spawned worker process per slot, each bound to a device.

On the CPU the cores are split between the workers (torch.set_num_threads per worker); on a
GPU, --per-gpu workers share each device, so several units train on it at once. A worker
keeps its loaded models and tokenized data between units (sparsebert.sweep.units), exits when
the driver dies (a watchdog on the parent), and is replaced when it dies itself (its unit is
reported failed and retried). Each worker sends its results back on a pipe of its own: no
lock is shared between workers, so one killed at any moment holds up no other, and the driver
reads whatever a dead worker sent before it died before it reports the worker's unit failed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

from sparsebert.sweep.config import SweepError

STOP_GRACE_S = 5.0  # a worker told to stop (SIGTERM) is killed (SIGKILL) after this
WORKER_NAME = "sparsebert-sweep-"  # + the slot's index: each worker process's name
# A worker whose start-up import of the caller's script called sweep() again (no
# `if __name__ == "__main__":` guard) exits with this code (sparsebert.sweep.driver).
UNGUARDED_SCRIPT_EXIT = 78
UNGUARDED_SCRIPT = ("sweep() was called again while a worker imported the script that calls "
                    "it (workers are spawned: each imports the main script): put the call "
                    "under `if __name__ == \"__main__\":`")


@dataclass
class Slot:
    """Room for one unit at a time on a device; `warm_key` says what its worker has loaded."""

    index: int
    device: str
    threads: int
    busy: str | None = None
    warm_key: Any = None
    pid: int | None = None  # the local worker process
    task: str | None = None  # the Ray task running here (its id, as `ray list tasks` shows)
    spec: dict[str, Any] | None = None  # the unit spec of that Ray task

    def where(self) -> dict[str, Any]:
        """Where its unit runs, for status.json: the worker's pid, or the Ray task's id (its
        worker is chosen by Ray when the task starts)."""
        return {"pid": self.pid} if self.task is None else {"ray_task": self.task}


@dataclass
class Event:
    """A unit that ended: ok with the marker info, or not with a one-line error + details."""

    unit_id: str
    ok: bool
    info: dict[str, Any]


def error_info(error: BaseException) -> dict[str, Any]:
    """What a failed unit reports: a one-line error and the end of its traceback."""
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
    """SIGTERM in a worker: leave at once (see _exit_now). A second SIGTERM (a signal to the
    whole process group, then the driver's own) must not cut the finalizers short: a semaphore
    unlinked but not yet unregistered would be reported leaked."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_now(128 + signum)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored for the block (in the main thread; elsewhere as it is), so that a process
    started in it begins with SIGINT ignored (Python keeps an ignored SIGINT at start-up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:  # (None: a handler not set from Python, which cannot be put back: the default)
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None
                      else previous)


def _unit_runner(runner: Callable[[dict[str, Any]], dict[str, Any]] | None):
    """The function a worker runs each unit spec with: `runner`, else run_unit (imported in
    the worker, after the spawn)."""
    if runner is not None:
        return runner
    from sparsebert.sweep.units import run_unit  # noqa: PLC0415 (after the spawn)

    return run_unit


def _next_spec(inbox) -> dict[str, Any] | None:
    """The next unit spec from the driver; None when the driver says stop or is gone."""
    try:
        return inbox.recv()
    except (EOFError, OSError):
        return None


def _send_result(results, unit_id: str, ok: bool, info: dict[str, Any]) -> None:
    """Send (unit id, ok, info) to the driver. An info that cannot be pickled is sent as the
    unit's error instead; a driver that is gone (a broken pipe) ends this worker."""
    try:
        payload = ForkingPickler.dumps((unit_id, ok, info))
    except Exception as error:  # noqa: BLE001 (the unit fails with this error, and is retried)
        payload = ForkingPickler.dumps((unit_id, False, error_info(error)))
    try:
        results.send_bytes(payload)
    except OSError:
        _exit_now(1)


def worker_main(inbox, results, index: int,
                runner: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """A worker's loop: run the unit specs received on `inbox` (with `runner`, by default
    run_unit) and send (unit id, ok, info) for each on `results`, this worker's own pipe; None
    (or the driver's end closing) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, _stop_now)  # how the driver stops a busy worker
    threading.Thread(target=_watch_parent, daemon=True, name=f"watch-parent-{index}").start()
    run = _unit_runner(runner)
    while True:
        spec = _next_spec(inbox)
        if spec is None:  # sent once every result was received
            results.close()  # a pipe has no buffer of ours to flush: what was sent is there
            _exit_now(0)  # skip the rest of interpreter teardown (about a second after real work)
        try:
            info, ok = run(spec), True
        except BaseException as error:  # noqa: BLE001 (reported to the driver, which retries)
            info, ok = error_info(error), False
        _send_result(results, spec["id"], ok, info)


@dataclass
class Worker:
    """A slot's process with the driver's ends of its two one-way pipes: `inbox` sends it unit
    specs, `results` receives what it sends back. The results pipe belongs to this process
    alone (only it holds the writing end), so whatever is read from it is this process's."""

    process: Any
    inbox: Any
    results: Any
    ended: bool = False  # `results` reached its end (the worker closed it or died)


class LocalBackend:
    """A pool of spawned workers, one per slot. `runner`: the function a worker runs each unit
    spec with (default sparsebert.sweep.units.run_unit); it must be importable by name, as
    the workers are spawned."""

    name = "local"

    def __init__(self, slots: list[Slot],
                 runner: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.slots = slots
        self.runner = runner
        self.workers: dict[int, Worker] = {}
        for slot in slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        """A fresh worker for `slot`, with new pipes (nothing of a previous worker's is read)."""
        inbox_end, inbox = self.context.Pipe(duplex=False)
        results, results_end = self.context.Pipe(duplex=False)
        process = self.context.Process(target=worker_main,
                                       args=(inbox_end, results_end, slot.index, self.runner),
                                       name=f"{WORKER_NAME}{slot.index}", daemon=True)
        try:
            with _sigint_ignored():  # inherited: a Ctrl-C while the worker starts up (imports
                process.start()  # torch) is the driver's alone, not a traceback per worker
        finally:  # the worker's ends are its own: its death then reads as the pipe's end
            inbox_end.close()
            results_end.close()
        slot.pid, slot.busy, slot.warm_key = process.pid, None, None
        self.workers[slot.index] = Worker(process, inbox, results)

    def idle(self) -> list[Slot]:
        """The slots with no unit running."""
        return [s for s in self.slots if s.busy is None]

    def submit(self, slot: Slot, spec: dict[str, Any], warm_key: Any) -> None:
        """Start the unit `spec` on `slot`'s worker (which must be idle)."""
        if slot.busy is not None:
            raise RuntimeError(f"slot {slot.index} runs {slot.busy}; expected an idle slot")
        if self.workers[slot.index].process.exitcode is not None:
            self._replace(slot)  # died idle since the last poll: the unit is not charged for it
        slot.busy, slot.warm_key = spec["id"], warm_key
        try:
            self.workers[slot.index].inbox.send(spec)
        except OSError:  # the worker has just died: the next poll() reports the unit failed
            pass

    def poll(self, timeout: float) -> list[Event]:
        """Units that ended within `timeout` seconds, and those whose worker died. A dead
        worker's pipe is read to its end first: a result it sent before dying counts, and its
        unit is then not also reported failed."""
        watched: dict[Any, Slot] = {}
        for slot in self.slots:
            worker = self.workers[slot.index]
            watched[worker.process.sentinel] = slot
            if not worker.ended:
                watched[worker.results] = slot
        ready = multiprocessing.connection.wait(list(watched), timeout)
        events: list[Event] = []
        for slot in self.slots:
            worker = self.workers[slot.index]
            if worker.process.sentinel in ready:  # it has exited: all it sent is in the pipe
                events.extend(self._receive(slot))
                events.extend(self._replace(slot))
            elif worker.results in ready:
                events.extend(self._receive(slot))
        return events

    def _receive(self, slot: Slot) -> list[Event]:
        """The results waiting in `slot`'s pipe, as events."""
        worker, events = self.workers[slot.index], []
        while not worker.ended and worker.results.poll():
            try:
                unit_id, ok, info = worker.results.recv()
            except (EOFError, OSError):  # closed, or the worker died half-way through a result
                worker.ended = True
                break
            except Exception as error:  # noqa: BLE001 (a whole message that does not unpickle)
                unit_id, ok, info = slot.busy, False, error_info(error)
            event = self._accept(slot, unit_id, ok, info)
            if event is not None:
                events.append(event)
        return events

    def _accept(self, slot: Slot, unit_id: str | None, ok: bool,
                info: dict[str, Any]) -> Event | None:
        """The event for a result from `slot`'s worker; None (with a warning) when the slot
        was not running that unit: a result is used once, for the unit its worker was given."""
        if unit_id is None or unit_id != slot.busy:
            warnings.warn(f"worker {slot.index} (pid {slot.pid}) sent a result for {unit_id!r}, "
                          f"expected one for {slot.busy!r}; ignored", RuntimeWarning)
            return None
        slot.busy = None
        return Event(unit_id, ok, info)

    def stop(self, unit_id: str, info: dict[str, Any]) -> list[Event]:
        """Stop the running unit `unit_id` (past its timeout): its worker is terminated (killed
        if still alive after STOP_GRACE_S: a unit stuck in native code does not run Python's
        signal handler) and replaced, and the unit reported failed with `info`; a result that
        came just before counts instead. [] when no slot runs it."""
        slot = next((s for s in self.slots if s.busy == unit_id), None)
        if slot is None:
            return []
        events = self._receive(slot)
        if slot.busy != unit_id:  # its result came after all
            return events
        process = self.workers[slot.index].process
        process.terminate()
        process.join(timeout=STOP_GRACE_S)
        if process.is_alive():
            process.kill()
        slot.busy = None  # (so that _replace reports no death of its own for the unit)
        events.append(Event(unit_id, False, info))
        return events + self._replace(slot)

    def _replace(self, slot: Slot) -> list[Event]:
        """`slot`'s worker has exited: a fresh one takes the slot, and the unit it was running
        (its result never came) is reported failed."""
        worker = self.workers[slot.index]
        worker.process.join(timeout=5)  # reaped: its exit code is known
        if worker.process.exitcode == UNGUARDED_SCRIPT_EXIT:  # every worker would: stop here
            raise SweepError(UNGUARDED_SCRIPT)
        events = []
        if slot.busy is not None:
            events.append(Event(slot.busy, False, {
                "error": f"worker {slot.index} (pid {worker.process.pid}) died with exit code "
                         f"{worker.process.exitcode} while running it"}))
        worker.inbox.close()
        worker.results.close()
        self._start(slot)
        return events

    def close(self) -> None:
        """Idle workers finish cleanly; busy ones (the sweep was interrupted) are stopped at
        once: their units have no completion marker and rerun on resume."""
        for slot in self.slots:
            worker = self.workers[slot.index]
            if slot.busy is not None:
                worker.process.terminate()
            elif worker.process.is_alive():
                try:
                    worker.inbox.send(None)
                except OSError:  # it has just exited
                    pass
        for worker in self.workers.values():
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.inbox.close()
            worker.results.close()
