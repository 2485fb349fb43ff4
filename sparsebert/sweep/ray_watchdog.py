"""Stops the processes of the local Ray instance a sweep started when the sweep's driver dies
without shutting it down (`kill -9`, the out-of-memory killer), also while the instance is still
starting. Ray's raylet, GCS and workers then exit on their own, but the raylet's agents
(ray::DashboardAgent, ray::RuntimeEnvAgent, about 85 MB each with Ray 2.60) keep running,
re-parented to init, until someone kills them.

The driver starts this file as a script (standard library only: no torch, no sparsebert import)
in its own session, before it starts the instance, with a pipe as its stdin:

    python ray_watchdog.py DRIVER_PID

Until the driver writes "started" (its instance is up), the watchdog looks every POLL_S at the
driver's children that run Ray's installed programs (GCS, raylet, monitors, dashboard) and
everything below them (the raylet's agents and workers), and records each (pid and start time)
and the instance's log folder (`<session dir>/logs/`, where Ray points the standard output of
every process of the instance), then once more. It reads the pipe until it closes. A driver
that shuts its instance down writes "closed" first and the watchdog ends; end of file without it
means the driver died, and after a short grace (for Ray's own exits) the watchdog terminates,
then kills, every process of the instance still alive (instance()), until none is left. The log
folder finds the processes it never saw: the agents of a raylet that started them, and died
with the driver, between two looks. Linux only (/proc); elsewhere the driver does not start it.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Iterator

GRACE_S = 2.0  # after the driver's death, before the first signal
KILL_AFTER_S = 3.0  # SIGTERM, then SIGKILL for what is still alive this long after
POLL_S = 0.2  # how often the instance's processes are looked at while it starts
ROUNDS = 5  # searches for the instance's processes after the driver's death, at most
STARTED = b"started"
CLOSED = b"closed"


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22), or
    None when no such process runs (a zombie, exited but not yet reaped, does not)."""
    fields = _stat(pid)
    # the fields after "pid (comm)" start at field 3, the state
    return None if fields is None or fields[0] == b"Z" else int(fields[19])


def session(pid: int) -> int | None:
    """The session id of process `pid` (/proc/PID/stat field 6), or None when it is gone."""
    fields = _stat(pid)
    return None if fields is None else int(fields[3])


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after "pid (comm)", or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def children_of() -> dict[int, list[int]]:
    """{pid: its live child processes} for every live process (one pass over /proc)."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                found.setdefault(int(fields[1]), []).append(int(entry))
    return found


def descendants(pid: int, children: dict[int, list[int]]) -> Iterator[int]:
    """Every live process below `pid` (children first), from children_of()'s map."""
    stack = list(children.get(pid, ()))
    while stack:
        child = stack.pop()
        yield child
        stack.extend(children.get(child, ()))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def open_files(pid: int) -> list[str]:
    """The paths of the files process `pid` has open ([] when it is gone or another user's)."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return found


def log_folders(pid: int) -> set[str]:
    """The Ray log folders (".../session_*/logs/") process `pid` has files open in."""
    found = set()
    for path in open_files(pid):
        parts = path.split("/")
        for i in range(1, len(parts) - 2):
            if parts[i].startswith("session_") and parts[i + 1] == "logs":
                found.add("/".join(parts[:i + 2]) + "/")
                break
    return found


def ray_processes(driver_pid: int) -> Iterator[int]:
    """The driver's children that run Ray's installed programs and everything below them."""
    children = children_of()  # (looked at every POLL_S: one pass over /proc, not one a process)
    for child in children.get(driver_pid, ()):
        if f"{os.sep}ray{os.sep}".encode() in _read(f"/proc/{child}/cmdline"):
            yield child
            yield from descendants(child, children)


def record(driver_pid: int, seen: dict[int, int], logs: set[str]) -> None:
    """Add the driver's Ray processes (pid -> start time) to `seen`, their log folders to
    `logs`."""
    for pid in ray_processes(driver_pid):
        start = start_time(pid)
        if start is not None and pid != os.getpid():
            seen[pid] = start
            logs |= log_folders(pid)


def instance(seen: dict[int, int], logs: set[str], driver_session: int | None,
             since: int | None) -> set[int]:
    """The live processes of the instance: those `seen` (same start time: a reused pid is left
    alone), and those of the driver's session (`driver_session`) started at or after clock
    tick `since` (when the watchdog began, before the instance) with a file open in one of its
    log folders (`logs`)."""
    found = {pid for pid, start in seen.items() if start_time(pid) == start}
    if not logs or driver_session is None or since is None:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        if session(pid) != driver_session or (start_time(pid) or -1) < since:
            continue
        if any(path.startswith(folder) for path in open_files(pid) for folder in logs):
            found.add(pid)
    return found


def stop(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL for those still there after KILL_AFTER_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + KILL_AFTER_S
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            pids = {pid for pid in pids if start_time(pid) is not None}
            if not pids:
                return
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    driver_pid = int(argv[0])
    since, driver_session = start_time(os.getpid()), session(driver_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's
    seen: dict[int, int] = {}
    logs: set[str] = set()
    received, watching = b"", True
    while True:  # until the driver closes its end (or dies)
        if watching:
            record(driver_pid, seen, logs)
            if STARTED in received:  # (its processes recorded once more, now it runs)
                watching = False
            elif not select.select([0], [], [], POLL_S)[0]:
                continue
        try:
            chunk = os.read(0, 64)
        except InterruptedError:
            continue
        if not chunk:
            break
        received += chunk
    if CLOSED in received:
        return 0  # the driver shut its instance down
    time.sleep(GRACE_S)
    for _ in range(ROUNDS):  # again after each stop: a process may have been started since
        found = instance(seen, logs, driver_session, since)
        if not found:
            break
        stop(found)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
