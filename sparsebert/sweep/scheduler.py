"""The driver's loop: run every unit whose dependencies are done, as many at once as the
backend has slots, highest critical path first (and, at similar priority, on a worker that
has the unit's task x seed loaded); retry failures up to a limit; keep going past units that
failed for good (their dependents are skipped); stop a unit that runs past --unit-timeout
(a failure like any other); show done / running / failed and an ETA.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from sparsebert.sweep.grid import Unit, upward_rank
from sparsebert.sweep.state import SweepDir
from sparsebert.sweep.units import unit_spec

AFFINITY = 0.5  # a warm unit is preferred when its rank is at least this fraction of the best
REDRAW_S = 5.0  # the live line is redrawn at least this often while units run


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)       # finished in this run
    skipped: list[str] = field(default_factory=list)    # finished before (markers)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)    # a dependency failed for good
    retried: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)      # e.g. what extending the sweep added


class Scheduler:
    def __init__(self, units: list[Unit], state: SweepDir, backend, base: dict[str, Any],
                 retries: int, progress: bool = True, unit_timeout: float | None = None
                 ) -> None:
        self.units = {u.id: u for u in units}
        self.order = [u.id for u in units]
        self.rank = upward_rank(units)
        self.state, self.backend, self.base = state, backend, base
        self.retries, self.progress = retries, progress
        self.unit_timeout = unit_timeout  # seconds a unit may run; None: no limit
        self.durations: dict[str, list[float]] = defaultdict(list)  # cost key -> seconds
        self._timed: list[tuple[str, float]] = []  # (unit id, seconds) of finished units

    @staticmethod
    def _cost_key(unit: Unit) -> str:
        """Units that take about as long: the kind, and the method of a search."""
        return f"{unit.kind}:{unit.method}" if unit.kind == "search" else unit.kind

    def _record(self, unit: Unit, seconds: float) -> None:
        self.durations[self._cost_key(unit)].append(seconds)
        self._timed.append((unit.id, seconds))

    def _estimate(self, unit: Unit) -> float | None:
        seen = self.durations.get(self._cost_key(unit))
        if seen:
            return sum(seen) / len(seen)
        if not self._timed:
            return None
        # Seconds per unit of weight over every finished unit: a weighted mean, which the
        # heavy units (fine-tunes) dominate, not the mean of per-unit ratios, which cheap units
        # with a large fixed cost (a pruned evaluation's model load) would inflate or deflate.
        seconds = sum(s for _, s in self._timed)
        weight = sum(self.units[i].weight for i, _ in self._timed)
        return unit.weight * seconds / weight

    def _eta(self, remaining: list[str], running: dict[str, float]) -> str:
        """The larger of two lower bounds: the work left spread over every slot, and the
        longest chain of units left that must run one after another (with fewer units ready
        than slots, or at the end, the chain decides). '>' in front once a running unit has
        taken longer than its estimate (it counts as nearly done, so the bound holds still)."""
        estimates = {i: self._estimate(self.units[i]) for i in remaining}
        if any(e is None for e in estimates.values()):
            return "?"
        now = time.perf_counter()
        left = {i: max(e - (now - running[i]), 0.0) if i in running else e
                for i, e in estimates.items()}  # a running unit: what is left of it
        chain: dict[str, float] = {}
        for i in self.order:  # dependencies first
            if i in left:
                chain[i] = left[i] + max((chain[d] for d in self.units[i].deps if d in chain),
                                         default=0.0)
        slots = max(len(self.backend.slots) if self.backend else 1, 1)
        seconds = max(sum(left.values()) / slots, max(chain.values(), default=0.0))
        overdue = any(now - running[i] > estimates[i] for i in running if i in estimates)
        text = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
        return (">" if overdue else "") + text

    def run(self) -> Outcome:
        started = time.perf_counter()
        outcome = Outcome()
        finished = set()
        for unit_id, info in self.state.done().items():
            if unit_id in self.units:
                finished.add(unit_id)
                outcome.skipped.append(unit_id)
                if "seconds" in info:
                    self._record(self.units[unit_id], info["seconds"])
        attempts: dict[str, int] = defaultdict(int)
        running: dict[str, float] = {}
        placed: dict[str, dict[str, Any]] = {}  # running unit -> where (status.json)
        dead: set[str] = set()  # failed for good or blocked
        bar = tqdm(total=len(self.units), initial=len(finished), unit="unit", desc="sweep",
                   disable=not self.progress, dynamic_ncols=True, smoothing=0,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                              "[{elapsed}{postfix}]")  # the ETA is ours (per-kind unit times)

        changed, last_postfix, drawn_at = True, "", time.perf_counter()

        def log(text: str) -> None:
            if self.progress:  # stderr, as the bar: stdout stays the command's result
                tqdm.write(text, file=sys.stderr)

        try:  # the bar is closed (its line ended) however the loop ends: a backend's error
            # (e.g. ClusterLost) or an interrupt is then shown on a line of its own
            while True:
                ready = [i for i in self.order if i not in finished and i not in running
                         and i not in dead and all(d in finished for d in self.units[i].deps)]
                self._block_dependents(finished, dead, outcome)
                for slot in self.backend.idle() if ready else []:
                    if not ready:
                        break
                    unit = self._pick(ready, slot)
                    ready.remove(unit.id)
                    attempts[unit.id] += 1
                    self.backend.submit(slot, unit_spec(unit, self.base, attempts[unit.id],
                                                        slot.device, slot.threads), unit.warm_key)
                    running[unit.id] = time.perf_counter()
                    placed[unit.id] = {"slot": slot.index, "device": slot.device,
                                       **slot.where(), "attempt": attempts[unit.id]}
                    changed = True
                remaining = [i for i in self.order if i not in finished and i not in dead]
                postfix = (f"running {len(running)}, failed {len(outcome.failed)}, "
                           f"ETA {self._eta(remaining, running)}")
                if postfix != last_postfix or time.perf_counter() - drawn_at >= REDRAW_S:
                    bar.set_postfix_str(postfix, refresh=True)  # (the elapsed clock too)
                    last_postfix, drawn_at = postfix, time.perf_counter()
                if changed:
                    self.state.write_status({"running": placed, "done": len(finished),
                                             "failed": sorted(outcome.failed),
                                             "total": len(self.units)})
                    changed = False
                if not running:
                    break
                events = self.backend.poll(timeout=1.0)
                events += self._stop_overdue(running, {e.unit_id for e in events})
                for event in events:
                    if event.unit_id not in running:  # a backend's stray or repeated result
                        warnings.warn(f"a result for {event.unit_id!r}, which is not running, was "
                                      "ignored", RuntimeWarning)
                        continue
                    changed = True
                    unit = self.units[event.unit_id]
                    placed.pop(event.unit_id, None)
                    seconds = time.perf_counter() - running.pop(event.unit_id)
                    if event.ok:
                        info = {**event.info, "attempts": attempts[unit.id],
                                "backend": self.backend.name}
                        self.state.mark_done(unit.id, info)
                        finished.add(unit.id)
                        outcome.done.append(unit.id)
                        self._record(unit, event.info.get("seconds", seconds))
                        bar.update(1)
                        log(f"done {unit.id} in {seconds:.0f} s"
                            + (f" (score {event.info['score']:.4f})" if "score" in event.info
                               else ""))
                    elif attempts[unit.id] <= self.retries:
                        outcome.retried[unit.id] = attempts[unit.id]
                        log(f"failed {unit.id} (attempt {attempts[unit.id]}): "
                            f"{event.info['error']}; retrying")
                    else:
                        dead.add(unit.id)
                        outcome.failed[unit.id] = {**event.info, "attempts": attempts[unit.id]}
                        self.state.mark_failed(unit.id, outcome.failed[unit.id])
                        log(f"failed {unit.id} after {attempts[unit.id]} attempt(s): "
                            f"{event.info['error']}")
        finally:
            bar.close()
        outcome.wall_s = time.perf_counter() - started
        return outcome

    def _stop_overdue(self, running: dict[str, float], ended: set[str]) -> list:
        """Stop every running unit (not among `ended`) that has run past the unit timeout:
        the backend's events for them, each a failure naming the timeout (or the unit's own
        result, had it just come). A unit's time counts from when its backend says it began
        (`begun`: a Ray task leaves Ray's queue), until then its clock is held at now."""
        if self.unit_timeout is None:
            return []
        now, events = time.perf_counter(), []
        begun = getattr(self.backend, "begun", None)  # (local workers start on submission)
        for unit_id, started in list(running.items()):
            if unit_id in ended:
                continue
            if begun is not None and not begun(unit_id):  # queued (on Ray): no time counts yet
                running[unit_id] = now
                continue
            if now - started > self.unit_timeout:
                events += self.backend.stop(unit_id, {
                    "error": f"timed out: stopped after {now - started:.0f} s "
                             f"(--unit-timeout {self.unit_timeout:g} s)",
                    "timed_out": True})
        return events

    def _block_dependents(self, finished: set[str], dead: set[str], outcome: Outcome) -> None:
        """Every unit that depends on a dead one, directly or through others, is blocked: one
        pass in the grid's order, which lists every dependency before its unit."""
        for i in self.order:
            if i not in finished and i not in dead and any(d in dead for d in self.units[i].deps):
                dead.add(i)
                outcome.blocked.append(i)
                self.state.forget_failure(i)  # an earlier run's error is not why it waits now

    def _pick(self, ready: list[str], slot) -> Unit:
        """The highest-ranked ready unit, or a warm one for this worker at similar rank."""
        best = max(ready, key=lambda i: self.rank[i])
        warm = [i for i in ready if self.units[i].warm_key == slot.warm_key
                and self.units[i].seed is not None
                and self.rank[i] >= AFFINITY * self.rank[best]]
        return self.units[max(warm, key=lambda i: self.rank[i]) if warm else best]
