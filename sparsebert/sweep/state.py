"""A sweep directory's own files (everything else is the search directories' layout):

    OUT/sweep.json              the grid, the search and training configs, every run's times
    OUT/.sweep/done/<unit>.json     completion markers (atomic): seconds, cpu_seconds, attempts,
                                    backend, host and worker pid; reports (whether a summary,
                                    task report or the sweep report wrote its report.md: False
                                    with --no-reports or without matplotlib; a summary or task
                                    report made again under --no-reports removes its stale
                                    report.md)
    OUT/.sweep/failed/<unit>.json   the last error of a unit that ran out of retries
    OUT/.sweep/status.json      the running units, where (slot, device, and the worker's pid
                                    or, on Ray, the task's id) and the counts
    OUT/.sweep/lock             held (flock) by the running driver: one driver per directory
    OUT/.sweep/superseded/      results set aside: super-survivors of an earlier seed set, and
                                what --redo replaced (redo-<method>-<time>/<task>/...)

A rerun skips units with a completion marker. The directory is tied to its grid: a rerun
with other options is refused with the differences, except added tasks or seeds, which
extend the sweep (adding seeds redoes the super-survivors of the tasks already there).
--redo METHODS sets those methods' searches aside (and, for structured, the super-survivors
and the speed timings of the subnetworks: sparsebert.lottery.redo.set_aside), so that they and
everything built on them run again; the full models and the other method's results are kept.
With --redo, search settings that only the redone methods use may change as well
(sparsebert.lottery.search.METHOD_SETTINGS): the searches' config.json files take the new
settings once their results are aside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sparsebert.atomic import atomic_write_json, write_errors_named
from sparsebert.lottery.config import SearchConfig
from sparsebert.lottery.redo import move_aside, set_aside, unused
from sparsebert.lottery.search import methods_affected
from sparsebert.sweep.config import SweepError
from sparsebert.sweep.grid import Grid
from sparsebert.train.config import RUNTIME_FIELDS, TrainConfig, same_setting
from sparsebert.train.rundir import make_out_dir, now

KIND = "sparsebert-sweep"


def marker_name(unit_id: str) -> str:
    return unit_id.replace("/", "~") + ".json"


def identity(grid: Grid, search: SearchConfig, train: TrainConfig) -> dict[str, Any]:
    """What a sweep directory is tied to (runtime fields such as threads or device left out)."""
    ident = {"grid": dataclasses.asdict(grid), "search": search.identity(),
             "train": {k: v for k, v in train.to_json().items()
                       if k not in RUNTIME_FIELDS and k not in ("task", "seed")}}
    return json.loads(json.dumps(ident))  # as saved in sweep.json (tuples as lists)


def _setting(section: str, key: str, value: Any) -> Any:
    """A setting as compared: the grid's subnetworks as a set (the same units in any order)."""
    return sorted(value) if (section, key) == ("grid", "subnets") and value else value


def _same(section: str, key: str, saved: Any, requested: Any) -> bool:
    if section == "train":
        return same_setting(key, saved, requested)
    return _setting(section, key, saved) == _setting(section, key, requested)


def compare(saved: dict[str, Any], mine: dict[str, Any], redo: tuple[str, ...] = ()
            ) -> tuple[list[str], list[int]]:
    """(added tasks, added seeds) when `mine` only adds tasks/seeds to `saved`, or changes
    search settings that only the `redo` methods use; raises SweepError listing every other
    difference."""
    diffs = []
    changed_search = []  # search settings that differ
    for section in ("grid", "search", "train"):
        old, new = saved.get(section, {}), mine[section]
        for key in sorted(set(old) | set(new)):
            if key in ("tasks", "seeds") and section == "grid":
                continue
            if not _same(section, key, old.get(key), new.get(key)):
                if section == "search":
                    changed_search.append(key)
                diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    affected = [m for m in methods_affected(changed_search) if m in mine["grid"]["methods"]]
    hint = ""
    if changed_search and len(diffs) == len(changed_search):  # only search settings differ
        if set(affected) <= set(redo):
            diffs = []
        elif set(affected) <= set(mine["grid"]["methods"]):
            hint = f"; to keep the fine-tuned full models, add --redo {','.join(affected)}"
    old_grid, new_grid = saved["grid"], mine["grid"]
    for key in ("tasks", "seeds"):
        removed = [x for x in old_grid[key] if x not in new_grid[key]]
        if removed:
            diffs.append(f"{key}: {old_grid[key]!r} -> {new_grid[key]!r} ({removed} missing)")
    if diffs:
        raise SweepError(f"the sweep directory holds another grid ({'; '.join(diffs)}, as "
                         f"saved -> requested){hint}; rerun with its options, or use another "
                         f"--out (only added tasks or seeds extend a sweep)")
    return ([t for t in new_grid["tasks"] if t not in old_grid["tasks"]],
            [s for s in new_grid["seeds"] if s not in old_grid["seeds"]])


def _is_sweep(folder: Path) -> bool:
    """Whether `folder` is a sweep directory: its sweep.json is a sweep's (another tool's
    sweep.json is not), or a sweep was started there (.sweep/lock)."""
    if (folder / ".sweep" / "lock").is_file():
        return True
    try:
        saved = json.loads((folder / "sweep.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("kind") == KIND


def _missing_parts(saved: dict[str, Any]) -> str:
    """What a sweep.json of the right kind lacks ('' when whole): a runs list and the
    identity's grid with tasks and seeds lists."""
    identity = saved.get("identity")
    grid = identity.get("grid") if isinstance(identity, dict) else None
    if not isinstance(saved.get("runs"), list):
        return "'runs' list"
    if not isinstance(identity, dict):
        return "'identity' object"
    if not isinstance(grid, dict):
        return "'identity.grid' object"
    for key in ("tasks", "seeds"):
        if not isinstance(grid.get(key), list):
            return f"'identity.grid.{key}' list"
    return ""


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM received in the block are delivered when it ends (to the handlers
    in place before it), so a second Ctrl-C cannot cut a short bookkeeping write in two. In
    the main thread only (elsewhere signals cannot be handled); a no-op in other threads."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():  # (None: a handler set outside Python)
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if received:
            signal.raise_signal(received[0])


class SweepDir:
    """The sweep's files under `out`; open() takes the lock and checks (or writes) the grid."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.meta = self.out / ".sweep"
        self._lock = None
        self.record: dict[str, Any] = {}
        self.missing: list[str] = []  # done units whose output drop_stale found gone

    @property
    def path(self) -> Path:
        return self.out / "sweep.json"

    def open(self, ident: dict[str, Any], redo: tuple[str, ...] = (),
             after_redo: Callable[[tuple[str, ...]], None] | None = None) -> list[str]:
        """Lock the directory, check the grid against a saved one, set the results of the
        `redo` methods aside and call `after_redo(methods)` (the driver records changed search
        settings in the searches' config.json there); returns notes to print."""
        if self.out.exists() and not self.out.is_dir():
            raise SweepError(f"--out {self.out}: exists and is not a directory")
        outer = next((folder for folder in self.out.resolve().parents if _is_sweep(folder)),
                     None)
        if outer is not None:  # its reports and extensions would take this sweep's runs
            raise SweepError(f"--out {self.out}: is inside the sweep directory {outer}; use a "
                             f"folder outside it")
        self._read_saved()  # refuses a foreign directory before .sweep/ is made in it
        make_out_dir(self.meta, SweepError, shown=self.out)
        self._take_lock()
        try:  # read again under the lock: a driver that held it may have changed sweep.json
            return self._claim(self._read_saved(), ident, redo, after_redo)
        except BaseException:  # refused (another grid) or failed: the lock is not kept
            self._release()
            raise

    def _read_saved(self) -> dict[str, Any] | None:
        """sweep.json (None for a new sweep); refuses a damaged one and a directory that holds
        something other than a sweep."""
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise SweepError(f"{self.path}: damaged ({error}); restore it, or use another "
                                 f"--out") from None
            if not isinstance(saved, dict) or saved.get("kind") != KIND:
                if self._meta_holds_records():  # the sweep's own folder: its record replaced
                    raise SweepError(f"{self.path}: damaged (not a sweep's record, though "
                                     f"{self.meta.name}/ is there); restore it, or use another "
                                     f"--out")
                raise SweepError(f"{self.out} holds something other than a sweep; use another "
                                 f"--out")
            missing = _missing_parts(saved)
            if missing:
                raise SweepError(f"{self.path}: damaged (no {missing}); restore it, or use "
                                 f"another --out")
            return saved
        if self.out.is_dir() and not self._first_write_cut() and any(self.out.iterdir()):
            if self._meta_holds_records():  # a sweep's folder whose sweep.json is gone
                raise SweepError(f"--out {self.out}: a sweep's folder ({self.meta.name}/ is "
                                 f"there) without its {self.path.name}, which records the "
                                 f"grid and settings; restore it, or use another --out")
            raise SweepError(f"--out {self.out}: not empty and not a sweep directory; use "
                             f"another --out")
        return None

    def _meta_holds_records(self) -> bool:
        """Whether .sweep/ holds more than a lock file: what only a sweep that ran writes."""
        return self.meta.is_dir() and any(p.name != "lock" for p in self.meta.iterdir())

    def _first_write_cut(self) -> bool:
        """True when `out` holds only what a sweep killed before its first sweep.json leaves
        behind (.sweep/lock, the temporary .sweep.json.tmp): it starts afresh."""
        names = {p.name for p in self.out.iterdir()}
        if not names or not names <= {self.meta.name, f".{self.path.name}.tmp"}:
            return False
        return not self.meta.exists() or {p.name for p in self.meta.iterdir()} <= {"lock"}

    def _claim(self, saved: dict[str, Any] | None, ident: dict[str, Any],
               redo: tuple[str, ...], after_redo: Callable[[tuple[str, ...]], None] | None
               ) -> list[str]:
        """open() with the lock held: compare, extend or redo, and record this run.

        A redo is recorded (with the settings it runs under) before anything is set aside,
        and marked set_aside once its results are aside and the searches' config.json hold
        its settings: a redo cut short before that is completed by the next start, with or
        without --redo."""
        notes = []
        last = saved["runs"][-1] if saved is not None and saved.get("runs") else {}
        cut = tuple(last.get("redo", ())) if last.get("set_aside") is False else ()
        if cut:
            notes.append(f"completing the --redo {','.join(cut)} started at "
                         f"{last.get('started_at')}, cut short while setting results aside")
            redo = tuple(dict.fromkeys(redo + cut))
        if saved is not None:
            tasks, seeds = compare(saved["identity"], ident, redo)
            if tasks or seeds:
                notes.append(f"extending the sweep: adding tasks {tasks or 'none'}, seeds "
                             f"{seeds or 'none'}")
            if seeds:
                notes += self._retire_super(saved["identity"]["grid"]["tasks"],
                                            saved["identity"]["grid"]["seeds"])
            self.record = saved
            for run in saved.get("runs", []):  # we hold the lock: no earlier driver runs now
                if run.get("status") == "running":
                    run["status"] = "killed (no clean exit)"
        else:
            self.record = {"kind": KIND, "version": 1, "runs": []}
        self.record["identity"] = ident
        run: dict[str, Any] = {"started_at": now(), "pid": os.getpid(), "status": "running"}
        pending = self._pending_redo(saved.get("runs", []) if saved is not None else [])
        resumed = bool(redo) and not cut and self._resumes(pending, redo, ident["search"])
        if redo:
            run.update({"redo": list(redo), "redo_search": ident["search"],
                        "set_aside": False})
        self.record["runs"].append(run)
        atomic_write_json(self.path, self.record)  # the redo is on record before it starts
        if redo:
            if resumed:
                notes.append(f"--redo {','.join(redo)}: resuming the redo started at "
                             f"{pending.get('started_at')} ({pending.get('status')}); nothing "
                             f"more set aside")
            else:
                notes += self._redo(ident["grid"], redo)
            if after_redo is not None:
                after_redo(redo)
            run["set_aside"] = True
            atomic_write_json(self.path, self.record)
        return notes

    @staticmethod
    def _pending_redo(runs: list[dict[str, Any]]) -> dict[str, Any]:
        """The latest run with a --redo when no finished run came after it ({} if none): runs
        without --redo that stopped early in between (failed, interrupted) leave it pending."""
        for run in reversed(runs):
            if run.get("redo"):
                return run if run.get("status") != "finished" else {}
            if run.get("status") == "finished":
                return {}
        return {}

    @staticmethod
    def _resumes(pending: dict[str, Any], redo: tuple[str, ...], search: dict[str, Any]) -> bool:
        """True when `pending` (see _pending_redo) is an unfinished redo of these methods, under
        the same search settings (records written before settings were kept: the same by
        construction)."""
        return (set(redo) <= set(pending.get("redo", ())) and pending.get("status") != "finished"
                and pending.get("redo_search", search) == search)

    def _take_lock(self) -> None:
        with write_errors_named(self.meta / "lock"):  # (a read-only folder: named)
            handle = open(self.meta / "lock", "a+")  # noqa: SIM115 (held until close())
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SweepError(f"{self.out}: another sweep is running on this directory; wait "
                             f"for it or stop it first") from None
        self._lock = handle

    def _redo(self, grid: dict[str, Any], methods: tuple[str, ...]) -> list[str]:
        """Set `methods`' results aside (see the module docstring); returns notes."""
        notes = []
        searches = {self.out / task / f"seed_{seed}": (task, seed)
                    for task in grid["tasks"] for seed in grid["seeds"]}
        for method in methods:
            # Markers first, then the moves: a kill in between leaves units to redo, never a
            # marker whose results were moved away. drop_stale then forgets what was built
            # on these units.
            for task, seed in searches.values():
                self._forget(f"search/{task}/{seed}/{method}")
            if method == "structured":
                for task in grid["tasks"]:
                    self._forget_super(task)
            aside = unused(self.meta / "superseded" / f"redo-{method}-{now().replace(':', '')}")
            moved, folders = set_aside(self.out, [self.out / task for task in grid["tasks"]],
                                       list(searches), (method,), aside)
            extra = [str(folder.relative_to(self.out)) for folder in folders]
            if moved or extra:
                speed = (" (re-time the subnetworks with `sparsebert speed --run` afterwards)"
                         if any(folder.name == "speed" for folder in folders) else "")
                notes.append(f"--redo {method}: set aside {len(moved)} searches"
                             f"{' and ' + ', '.join(extra) if extra else ''} in {aside}; "
                             f"they are redone{speed}")
            else:
                notes.append(f"--redo {method}: no finished {method} results to redo")
        return notes

    def _forget(self, unit_id: str) -> None:
        (self.meta / "done" / marker_name(unit_id)).unlink(missing_ok=True)

    def _forget_super(self, task: str) -> None:
        """Drop the completion markers of `task`'s super-survivor units."""
        for marker in (self.meta / "done").glob("super-*.json"):
            if marker.stem.split("~")[1:2] == [task]:
                marker.unlink()

    def _retire_super(self, tasks: list[str], seeds: list[int]) -> list[str]:
        """Move the super-survivors of the old seed set aside (kept, out of the report)."""
        notes = []
        for task in tasks:
            src = self.out / task / "super"
            if not src.exists():
                continue
            dest = self.meta / "superseded" / f"{task}-super-seeds_{'_'.join(map(str, seeds))}"
            move_aside(src, dest)
            self._forget_super(task)
            notes.append(f"{task}: super-survivors of seeds {seeds} moved to {dest}; they are "
                         f"redone over the new seeds")
        return notes  # the task and sweep reports are redone by drop_stale

    def close(self, status: str) -> None:
        """Record how this run ended (sweep.json; status.json: nothing runs any more) and
        release the lock. A Ctrl-C or SIGTERM meanwhile waits until that is written."""
        with signals_held():
            self._close(status)

    def _close(self, status: str) -> None:
        if self.record.get("runs"):
            self.record["runs"][-1].update(finished_at=now(), status=status)
            atomic_write_json(self.path, self.record)
        status_file = self.meta / "status.json"
        try:
            last = json.loads(status_file.read_text()) if status_file.is_file() else None
        except (OSError, json.JSONDecodeError):
            last = None
        if isinstance(last, dict) and self._lock is not None:
            # counted again: a unit may have finished after the last status was written
            done = len(self.done()) if isinstance(last.get("done"), int) else last.get("done")
            self.write_status({**last, "running": {}, "sweep": status, "done": done})
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # markers ---------------------------------------------------------------------------------

    def done(self) -> dict[str, dict[str, Any]]:
        """{unit id: marker content} of finished units."""
        out = {}
        for path in (self.meta / "done").glob("*.json"):
            try:
                info = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # markers are written atomically; a foreign file is ignored
            if isinstance(info, dict) and isinstance(info.get("id"), str):
                out[info["id"]] = info  # (else a foreign file too: its unit runs again)
        return out

    def drop_stale(self, units: list, reports: bool = False,
                   present: Callable[[Any, dict[str, Any]], bool] | None = None,
                   ) -> dict[str, dict[str, Any]]:
        """Forget the markers of units that were done before one of their dependencies was
        (re)made or added (a forgotten unit, a grid extended with seeds or tasks), with
        `reports`, of units done without writing theirs (an earlier --no-reports run), and
        of units whose output is gone (present(unit, marker) False: deleted or damaged by
        hand): they rerun, with what is built on them; the sweep's own report unit, which
        always writes its report, likewise. `units` in the grid's order (dependencies first).
        Returns done()."""
        done = self.done()
        self.missing = []
        for unit in units:
            if unit.id not in done:
                continue
            without_report = ((reports or unit.kind == "report")  # the sweep's: always
                              and done[unit.id].get("reports") is False)
            gone = present is not None and not present(unit, done[unit.id])
            if gone:
                self.missing.append(unit.id)
            if without_report or gone or any(d not in done for d in unit.deps):
                (self.meta / "done" / marker_name(unit.id)).unlink(missing_ok=True)
                del done[unit.id]
        return done

    def mark_done(self, unit_id: str, info: dict[str, Any]) -> None:
        (self.meta / "done").mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.meta / "done" / marker_name(unit_id),
                          {"id": unit_id, "finished_at": now(), "time": time.time(), **info})
        (self.meta / "failed" / marker_name(unit_id)).unlink(missing_ok=True)

    def write_status(self, status: dict[str, Any]) -> None:
        """.sweep/status.json: what runs where now (unit -> slot, device, worker pid or Ray
        task id)."""
        atomic_write_json(self.meta / "status.json", {"updated_at": now(), **status})

    def forget_failure(self, unit_id: str) -> None:
        """Remove a unit's failed marker (an earlier run's error: the unit is blocked now, by a
        dependency that failed in this run)."""
        (self.meta / "failed" / marker_name(unit_id)).unlink(missing_ok=True)

    def mark_failed(self, unit_id: str, info: dict[str, Any]) -> None:
        (self.meta / "failed").mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.meta / "failed" / marker_name(unit_id),
                          {"id": unit_id, "failed_at": now(), **info})
