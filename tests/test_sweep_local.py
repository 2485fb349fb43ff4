"""The local backend's workers and result pipes, with trivial units (no model, no data): a
result sent before a worker died is used once, a stray result is ignored, a worker killed at
any moment (even half-way through sending a result) is replaced and its unit retried while the
other workers go on, and close() leaves no process behind."""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from sparsebert.sweep.local import Event, LocalBackend, Slot
from tests.processes import pid_alive

DEADLINE_S = 20.0  # a liveness bound for one worker to start and answer on a loaded machine


def trivial_unit(spec: dict) -> dict:
    """A unit run in a worker (importable by name, as the workers are spawned). Spec keys:
    `touch` (a file created on start), `sleep` (seconds), `kill_on_attempt` (SIGKILL this
    worker on that attempt), `blob` (characters of payload returned), `unpicklable`,
    `ignore_term` (SIGTERM ignored: a unit stuck in native code, which never returns to the
    interpreter to run the handler)."""
    if spec.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "touch" in spec:
        Path(spec["touch"]).touch()
    if spec.get("kill_on_attempt") == spec.get("attempt", 1):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(spec.get("sleep", 0.0))
    info = {"seconds": 0.0, "pid": os.getpid()}
    if "blob" in spec:
        info["blob"] = "x" * spec["blob"]
    if spec.get("unpicklable"):
        info["lock"] = threading.Lock()
    return info


@contextlib.contextmanager
def _backend(workers: int = 1):
    """A LocalBackend running trivial_unit on `workers` CPU slots; on the way out it is
    closed, and every worker it ever started must be gone."""
    slots = [Slot(i, "cpu", 1) for i in range(workers)]
    backend = LocalBackend(slots, runner=trivial_unit)
    started = {s.pid for s in slots}
    original_start = backend._start

    def start(slot: Slot) -> None:
        original_start(slot)
        started.add(slot.pid)

    backend._start = start
    try:
        yield backend
    finally:
        backend.close()
        assert not [p for p in started if pid_alive(p)], "workers left running after close()"


def _events(backend: LocalBackend, count: int, deadline: float = DEADLINE_S) -> list[Event]:
    """Poll until `count` events came (then once more, briefly, to catch any extra one)."""
    events: list[Event] = []
    end = time.monotonic() + deadline
    while len(events) < count:
        assert time.monotonic() < end, f"expected {count} events within {deadline:.0f} s, " \
                                       f"got {[(e.unit_id, e.ok) for e in events]}"
        events += backend.poll(timeout=0.2)
    return events + backend.poll(timeout=0.3)


def _wait_for(condition, what: str, deadline: float = DEADLINE_S):
    """The condition's first true value; AssertionError after `deadline` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("death_seen_first", [False, True])
def test_result_sent_before_the_worker_died_counts_once(death_seen_first, monkeypatch):
    """A worker sends its result and is killed before the driver polls: the unit is done (not
    also failed, nor retried) and a fresh worker takes the slot. With `death_seen_first` the
    driver's wait reports only the worker's exit, not its readable pipe (the order in which
    the two are noticed must not matter)."""
    if death_seen_first:
        wait = multiprocessing.connection.wait

        def exits_only(objects, timeout=None):
            """The poll's wait (on sentinels and pipes) reports exits only; Connection.poll's
            own wait (on its pipe alone) is left as it is."""
            ready = wait(objects, timeout)
            if any(isinstance(o, int) for o in objects):
                ready = [r for r in ready if isinstance(r, int)]
            return ready

        monkeypatch.setattr(multiprocessing.connection, "wait", exits_only)
    with _backend() as backend:
        slot = backend.slots[0]
        backend.submit(slot, {"id": "a"}, None)
        worker = backend.workers[slot.index]
        assert worker.results.poll(DEADLINE_S), "no result sent"
        first_pid = slot.pid
        os.kill(first_pid, signal.SIGKILL)
        worker.process.join(DEADLINE_S)
        events = _events(backend, 1)
        monkeypatch.undo()  # a live worker's result is noticed by its readable pipe
        assert [(e.unit_id, e.ok) for e in events] == [("a", True)]
        assert events[0].info["pid"] == first_pid
        assert slot.busy is None and slot.pid != first_pid  # replaced
        backend.submit(slot, {"id": "b"}, None)
        assert [(e.unit_id, e.ok) for e in _events(backend, 1)] == [("b", True)]


def test_stray_result_is_ignored_with_a_warning():
    """A result for a unit its slot is not running (here: the slot was given another unit in
    the meantime) makes no event and leaves the slot busy."""
    with _backend() as backend:
        slot = backend.slots[0]
        backend.submit(slot, {"id": "a"}, None)
        slot.busy = "b"
        with pytest.warns(RuntimeWarning, match="result for 'a', expected one for 'b'"):
            assert backend.workers[slot.index].results.poll(DEADLINE_S)
            assert backend.poll(timeout=1.0) == []
        assert slot.busy == "b"


def test_worker_killed_while_sending_its_result_is_retried_others_go_on(tmp_path):
    """A worker killed half-way through sending a large result (the driver not reading)
    leaves a partial message in its own pipe only: its unit is reported failed, the other
    worker's result still arrives, and the fresh worker runs the retry."""
    with _backend(workers=2) as backend:
        big, small = backend.slots
        started = tmp_path / "big-started"
        backend.submit(big, {"id": "big", "touch": str(started), "blob": 8 << 20}, None)
        backend.submit(small, {"id": "small", "sleep": 1.0}, None)
        _wait_for(started.exists, "the big unit to start")
        time.sleep(0.5)  # it returns at once, and its worker blocks in the middle of sending
        os.kill(big.pid, signal.SIGKILL)
        events = {e.unit_id: e for e in _events(backend, 2)}
        assert set(events) == {"big", "small"}
        assert events["small"].ok
        assert not events["big"].ok and "died with exit code -9" in events["big"].info["error"]
        backend.submit(big, {"id": "big", "attempt": 2, "blob": 8 << 20}, None)
        (event,) = _events(backend, 1)
        assert event.ok and len(event.info["blob"]) == 8 << 20


def test_result_that_cannot_be_pickled_fails_the_unit():
    """A unit whose result cannot be sent fails with the pickling error (no result lost, no
    wait for ever); the worker goes on."""
    with _backend() as backend:
        slot = backend.slots[0]
        backend.submit(slot, {"id": "a", "unpicklable": True}, None)
        (event,) = _events(backend, 1)
        assert not event.ok and "pickle" in event.info["error"]
        pid = slot.pid
        backend.submit(slot, {"id": "b"}, None)
        assert [(e.unit_id, e.ok) for e in _events(backend, 1)] == [("b", True)]
        assert slot.pid == pid


def test_a_worker_that_died_idle_is_replaced_before_its_next_unit():
    """A worker killed while idle (after the last poll) does not cost the next unit sent to its
    slot an attempt: a fresh worker takes the slot first and runs it."""
    with _backend() as backend:
        slot = backend.slots[0]
        backend.submit(slot, {"id": "a"}, None)
        assert [(e.unit_id, e.ok) for e in _events(backend, 1)] == [("a", True)]
        old = slot.pid
        os.kill(old, signal.SIGKILL)
        _wait_for(lambda: backend.workers[slot.index].process.exitcode is not None,
                  "the idle worker's death")
        backend.submit(slot, {"id": "b"}, None)  # no poll in between
        events = _events(backend, 1)
        assert [(e.unit_id, e.ok) for e in events] == [("b", True)] and slot.pid != old
        assert events[0].info["pid"] == slot.pid


def test_close_stops_busy_workers_at_once():
    """close() while a unit runs stops its worker at once; an idle one ends on its own."""
    with _backend(workers=2) as backend:
        busy, idle = backend.slots
        backend.submit(busy, {"id": "long", "sleep": 60.0}, None)
        backend.submit(idle, {"id": "quick"}, None)
        assert [(e.unit_id, e.ok) for e in _events(backend, 1)] == [("quick", True)]
        started = time.monotonic()
        backend.close()
        assert time.monotonic() - started < 10
        assert backend.workers[idle.index].process.exitcode == 0
        # SIGTERM: its handler's exit status, or the signal itself if it came before the
        # worker had installed the handler (a slow start)
        assert backend.workers[busy.index].process.exitcode in (128 + signal.SIGTERM,
                                                               -signal.SIGTERM)


def test_stop_ends_a_unit_past_its_time_and_the_slot_goes_on(tmp_path, monkeypatch):
    """stop() of a running unit: its worker is terminated, killed when it ignores SIGTERM,
    and replaced; the unit is reported failed with the given info, once, and the slot runs
    the next unit. A result already sent counts instead; a unit no slot runs gives nothing."""
    monkeypatch.setattr("sparsebert.sweep.local.STOP_GRACE_S", 0.5)
    with _backend(workers=1) as backend:
        slot = backend.slots[0]
        assert backend.stop("never/given", {"error": "late"}) == []
        backend.submit(slot, {"id": "quick"}, None)
        _wait_for(lambda: backend.workers[slot.index].results.poll(), "the quick result")
        worker_pid = slot.pid
        events = backend.stop("quick", {"error": "late"})
        assert [(e.unit_id, e.ok) for e in events] == [("quick", True)]
        assert slot.pid == worker_pid and pid_alive(worker_pid) and slot.busy is None

        started = tmp_path / "started"
        backend.submit(slot, {"id": "stuck", "sleep": 600.0, "ignore_term": True,
                              "touch": str(started)}, None)
        _wait_for(started.exists, "the stuck unit's start")
        stopping = time.monotonic()
        events = backend.stop("stuck", {"error": "timed out", "timed_out": True})
        assert time.monotonic() - stopping < 10
        assert [(e.unit_id, e.ok, e.info) for e in events] == [
            ("stuck", False, {"error": "timed out", "timed_out": True})]
        assert not pid_alive(worker_pid)
        assert backend.workers[slot.index].process.pid != worker_pid  # a fresh worker
        assert backend.stop("stuck", {"error": "again"}) == []
        backend.submit(slot, {"id": "after"}, None)
        assert [(e.unit_id, e.ok) for e in _events(backend, 1)] == [("after", True)]


class _Markers:
    """The part of SweepDir the scheduler uses, in memory."""

    def __init__(self) -> None:
        self.marked: dict[str, list[dict]] = {}
        self.failed: dict[str, dict] = {}

    def done(self) -> dict:
        return {}

    def write_status(self, status: dict) -> None:
        pass

    def mark_done(self, unit_id: str, info: dict) -> None:
        self.marked.setdefault(unit_id, []).append(info)

    def forget_failure(self, unit_id: str) -> None:
        self.failed.pop(unit_id, None)

    def mark_failed(self, unit_id: str, info: dict) -> None:
        self.failed[unit_id] = info


class _RepeatingBackend:
    """A backend (one slot) that reports each unit done twice, and once a unit never given."""

    name = "repeating"

    def __init__(self) -> None:
        self.slots = [Slot(0, "cpu", 1)]
        self.sent: list[Event] = []
        self.pending: list[Event] = []

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.busy is None]

    def submit(self, slot: Slot, spec: dict, warm_key) -> None:
        slot.busy = spec["id"]
        self.pending.append(Event(spec["id"], True, {"seconds": 0.0}))

    def poll(self, timeout: float) -> list[Event]:
        events = self.sent[-1:] + [Event("never/given", True, {})] + self.pending
        self.sent += self.pending
        self.pending = []
        self.slots[0].busy = None
        return events


def _units():
    from sparsebert.sweep.grid import Grid, expand  # noqa: PLC0415

    return expand(Grid(("RTE",), (1,), ("magnitude",), ("good",), False, True))


def test_scheduler_ignores_results_for_units_not_running():
    """A repeated result, or one for a unit never started, is ignored with a warning: each
    unit is marked done once and the sweep ends."""
    from sparsebert.sweep.scheduler import Scheduler  # noqa: PLC0415

    units, markers = _units(), _Markers()
    with pytest.warns(RuntimeWarning, match="which is not running, was ignored"):
        outcome = Scheduler(units, markers, _RepeatingBackend(), {}, retries=0,
                            progress=False).run()
    assert outcome.done == [u.id for u in units] and not outcome.failed
    assert {i: len(m) for i, m in markers.marked.items()} == {u.id: 1 for u in units}


def test_sweep_with_a_worker_killed_mid_unit_completes():
    """The scheduler on two local workers, one SIGKILLed in the middle of a unit: the unit
    is retried on a fresh worker and every unit is done once."""
    from sparsebert.sweep.scheduler import Scheduler  # noqa: PLC0415

    units, markers = _units(), _Markers()
    victim = "search/RTE/1/magnitude"
    with _backend(workers=2) as backend:
        submit = backend.submit

        def submit_killing_the_victim(slot, spec, warm_key):
            """The victim's first attempt kills its worker."""
            submit(slot, {**spec, "kill_on_attempt": 1} if spec["id"] == victim else spec,
                   warm_key)

        backend.submit = submit_killing_the_victim
        outcome = Scheduler(units, markers, backend, {}, retries=1, progress=False).run()
    assert sorted(outcome.done) == sorted(u.id for u in units) and not outcome.failed
    assert outcome.retried == {victim: 1}
    assert markers.marked[victim][0]["attempts"] == 2
    assert {i: len(m) for i, m in markers.marked.items()} == {u.id: 1 for u in units}


class _QueueingBackend:
    """A backend (one slot) whose units wait `queued_s` in a queue before they begin (as Ray
    tasks do while other jobs hold the cluster), then run `run_s`."""

    name = "queueing"

    def __init__(self, queued_s: float, run_s: float) -> None:
        self.slots = [Slot(0, "cpu", 1)]
        self.queued_s, self.run_s = queued_s, run_s
        self.submitted_at: dict[str, float] = {}
        self.stopped: list[str] = []

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.busy is None]

    def submit(self, slot: Slot, spec: dict, warm_key) -> None:
        slot.busy = spec["id"]
        self.submitted_at[spec["id"]] = time.monotonic()

    def begun(self, unit_id: str) -> bool:
        return time.monotonic() - self.submitted_at[unit_id] >= self.queued_s

    def poll(self, timeout: float) -> list[Event]:
        time.sleep(min(timeout, 0.05))
        unit_id = self.slots[0].busy
        if unit_id is None or (time.monotonic() - self.submitted_at[unit_id]
                               < self.queued_s + self.run_s):
            return []
        self.slots[0].busy = None
        return [Event(unit_id, True, {"seconds": self.run_s})]

    def stop(self, unit_id: str, info: dict) -> list[Event]:
        self.stopped.append(unit_id)
        self.slots[0].busy = None
        return [Event(unit_id, False, info)]


def test_unit_timeout_counts_from_when_a_unit_begins():
    """A unit that waits in its backend's queue longer than --unit-timeout, then runs within
    it, is not stopped: the clock starts when the backend says the unit began (it counted from
    submission, so queued units timed out; the local backend's units begin on submission)."""
    from sparsebert.sweep.grid import Grid, expand  # noqa: PLC0415
    from sparsebert.sweep.scheduler import Scheduler  # noqa: PLC0415

    units = [u for u in expand(Grid(("RTE",), (1,), ("magnitude",), ("good",), False, True))
             if not u.deps][:1]
    backend, markers = _QueueingBackend(queued_s=1.5, run_s=0.5), _Markers()
    outcome = Scheduler(units, markers, backend, {}, retries=0, progress=False,
                        unit_timeout=1.0).run()
    assert outcome.done == [units[0].id] and not outcome.failed and not backend.stopped
    backend, markers = _QueueingBackend(queued_s=0.2, run_s=30.0), _Markers()
    outcome = Scheduler(units, markers, backend, {}, retries=0, progress=False,
                        unit_timeout=1.0).run()  # a unit that runs too long still stops
    assert list(outcome.failed) == [units[0].id] and backend.stopped == [units[0].id]


def test_scheduler_stops_a_unit_past_the_unit_timeout(monkeypatch):
    """A unit that runs past --unit-timeout is stopped on each attempt, reported failed with
    the timeout named, and its dependents are blocked; every other unit is done."""
    from sparsebert.sweep.scheduler import Scheduler  # noqa: PLC0415

    monkeypatch.setattr("sparsebert.sweep.local.STOP_GRACE_S", 0.5)
    units, markers = _units(), _Markers()
    victim = "search/RTE/1/magnitude"
    with _backend(workers=2) as backend:
        for slot in backend.slots:  # started and warm: only the victim takes long
            backend.submit(slot, {"id": f"warm-{slot.index}"}, None)
        assert len(_events(backend, len(backend.slots))) == len(backend.slots)
        submit = backend.submit

        def submit_hanging_the_victim(slot, spec, warm_key):
            submit(slot, {**spec, "sleep": 600.0} if spec["id"] == victim else spec, warm_key)

        backend.submit = submit_hanging_the_victim
        started = time.monotonic()
        outcome = Scheduler(units, markers, backend, {}, retries=1, progress=False,
                            unit_timeout=3.0).run()
    assert time.monotonic() - started < 60
    assert list(outcome.failed) == [victim] and outcome.retried == {victim: 1}
    failure = outcome.failed[victim]
    assert failure["timed_out"] and failure["attempts"] == 2
    assert failure["error"].startswith("timed out: stopped after ")
    assert failure["error"].endswith(" s (--unit-timeout 3 s)")
    assert markers.failed == {victim: failure}
    assert outcome.blocked and victim not in markers.marked
    assert sorted(outcome.done + outcome.blocked + [victim]) == sorted(u.id for u in units)
