"""Stops the processes of the local Ray instance a sweep started when the sweep's driver dies
without shutting it down (`kill -9`, the out-of-memory killer). Ray's raylet, GCS and workers then
exit on their own, but the raylet's agents (ray::DashboardAgent, ray::RuntimeEnvAgent, about
85 MB each with Ray 2.60) keep running, re-parented to init, until someone kills them.

The driver starts this file as a script (standard library only: no torch, no sparsebert import)
in its own session, with the instance's processes on the command line and a pipe as its stdin:

    python ray_watchdog.py RAYLET_PID PID:START [PID:START ...]

It reads the pipe until it closes. A driver that shuts its instance down writes "closed" first
and the watchdog ends; end of file without it means the driver died, and after a short grace
(for Ray's own exits) the watchdog terminates, then kills, every process still alive that is
either one it was given (same pid and start time: a reused pid is left alone) or was started by
that raylet (RAY_RAYLET_PID in its environment: the agents and any worker). Linux only (/proc);
elsewhere the driver does not start it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator

GRACE_S = 2.0  # after the driver's death, before the first signal
KILL_AFTER_S = 3.0  # SIGTERM, then SIGKILL for what is still alive this long after
CLOSED = b"closed"


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22), or
    None when no such process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # the fields after "pid (comm)" start at field 3, the state
    return None if fields[0] == b"Z" else int(fields[19])


def children(pid: int) -> list[int]:
    """The live child processes of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def descendants(pid: int) -> Iterator[int]:
    """Every live process below `pid` (children first)."""
    stack = children(pid)
    while stack:
        child = stack.pop()
        yield child
        stack.extend(children(child))


def started_by_raylet(raylet_pid: int) -> Iterator[int]:
    """Processes of this user whose environment names `raylet_pid` as their raylet."""
    marker = f"RAY_RAYLET_PID={raylet_pid}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if marker in environ.read().split(b"\0"):
                    yield int(entry)
        except OSError:  # gone, or another user's
            continue


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def ray_processes(driver_pid: int) -> tuple[int | None, list[str]]:
    """(the raylet's pid, "PID:START" of each process of the driver's local Ray instance): the
    driver's children that run Ray's installed programs (GCS, raylet, monitors, dashboard) and
    everything below them (the raylet's agents and workers). None when no raylet is there."""
    raylet, given = None, []
    for child in children(driver_pid):
        if f"{os.sep}ray{os.sep}".encode() not in _read(f"/proc/{child}/cmdline"):
            continue  # not one of Ray's
        for pid in (child, *descendants(child)):
            start = start_time(pid)
            if start is None:
                continue
            if raylet is None and _read(f"/proc/{pid}/comm").strip() == b"raylet":
                raylet = pid
            given.append(f"{pid}:{start}")
    return raylet, given


def leftovers(raylet_pid: int, given: Iterable[tuple[int, int]]) -> set[int]:
    """The live processes to stop: those given (same start time) and the raylet's."""
    alive = {pid for pid, start in given if start_time(pid) == start}
    return alive | set(started_by_raylet(raylet_pid))


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
    raylet_pid = int(argv[0])
    given = [tuple(int(x) for x in item.split(":")) for item in argv[1:]]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's
    received = b""
    while True:  # until the driver closes its end (or dies)
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
    stop(leftovers(raylet_pid, given))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
