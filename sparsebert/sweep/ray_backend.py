"""The Ray backend: each unit a Ray task with its resource needs (num_cpus = the slot's
threads, num_gpus = 1 / --per-gpu on GPUs, memory = --unit-memory-gb), on a local Ray instance
that the sweep starts or on a running cluster (--ray-address). Every node must see the sweep
directory at the same path (a shared filesystem) and the GLUE data and model.

Ray reuses its worker processes between tasks, so a worker keeps its loaded models and data
warm (sparsebert.sweep.units) as local workers do. Retries are the sweep's (max_retries=0 on
the task), so a unit is counted and reported the same on both backends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from sparsebert.errors import Terminated
from sparsebert.sweep import ray_watchdog
from sparsebert.sweep.config import ClusterLost, SweepError
from sparsebert.sweep.local import Event, Slot, error_info

CONNECT_TIMEOUT_S = 5.0
# How often a sweep on a cluster it joined checks that the cluster still answers (also after
# every failed task): Ray ends a driver whose cluster is gone after 60 s, with no word of why.
HEALTH_CHECK_S = 5.0
PROBE_TIMEOUT_S = 30.0  # a child process connects to the cluster within this, or is killed
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # a terminal's colour and style codes
_PROBE = """
import json, sys
import ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False,
         logging_level="ERROR")
print("RESOURCES " + json.dumps(ray.cluster_resources()), flush=True)
print("NODES " + json.dumps([n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]),
      flush=True)
ray.shutdown()
"""


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--ray-address {address!r}: expected HOST:PORT (e.g. "
                         f"10.0.0.5:6379), ray://HOST:PORT or auto")
    return host, int(port)


def unreachable(host: str, port: int) -> str | None:
    """Why nothing listens at host:port (within CONNECT_TIMEOUT_S), or None if something does."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__
    return None


def check_reachable(address: str) -> None:
    """A clear error within seconds when nothing listens at HOST:PORT (ray.init would keep
    retrying for a long time)."""
    if address == "auto":
        return
    reason = unreachable(*_host_port(address))
    if reason is not None:
        raise SweepError(f"--ray-address {address}: no Ray cluster reachable there "
                         f"({reason}); start one (ray start --head) or use --backend local")


class Cluster(NamedTuple):
    """A running Ray cluster's resources: in all ({"CPU": n, "GPU": m, "memory": bytes, ...})
    and of each live node."""

    resources: dict[str, float]
    nodes: list[dict[str, float]]


def probe_cluster(address: str, timeout: float | None = None) -> Cluster:
    """The resources of the Ray cluster at `address` (in all and per live node), from a
    child process that connects to it: ray.init keeps retrying for minutes against a port
    where something else listens (or a stale `auto` address), so the child gets `timeout`
    seconds and is then killed with its process group (also when the wait itself is
    interrupted: the child runs in its own session, which Ctrl-C and SIGTERM of the driver do
    not reach); any failure is a SweepError."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    child = subprocess.Popen(
        [sys.executable, "-c", _PROBE, address], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "RAY_BACKEND_LOG_LEVEL": "error"})
    try:
        out, err = child.communicate(timeout=timeout)
    except BaseException as error:  # the timeout, or an interrupt of the driver
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        if not isinstance(error, subprocess.TimeoutExpired):
            raise
        raise SweepError(f"--ray-address {address}: no Ray cluster answered within "
                         f"{timeout:.0f} s (is it the head's GCS address, port 6379 by "
                         "default, not the dashboard's?); use --backend local") from None
    found = {key: json.loads(line[len(key) + 1:]) for line in out.splitlines()
             for key in ("RESOURCES", "NODES") if line.startswith(key + " ")}
    if len(found) == 2:
        return Cluster(found["RESOURCES"], found["NODES"])
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":", 1)[0]] or lines or ["no output"]
    # the root cause (e.g. an AuthenticationError) before the ConnectionError it led to
    auth = [ln for ln in errors if "AuthenticationError" in ln or "InvalidAuthToken" in ln]
    hint = ("; a cluster started with token authentication (`ray start` turns it on by "
            "default) needs RAY_AUTH_MODE=token and its token in this environment"
            if auth else "")
    cause = auth[0] if auth else errors[-1]
    raise SweepError(f"--ray-address {address}: cannot connect ({cause[:300]}){hint}; use "
                     "--backend local")


def preflight(address: str | None) -> Cluster | None:
    """Ray importable and (with an address) a cluster that answers there, else SweepError;
    returns the cluster's resources (None for the local instance the sweep starts)."""
    try:
        import ray  # noqa: F401, PLC0415
    except ImportError:
        raise SweepError("--backend ray needs Ray: pip install 'ray>=2.40' (the package's "
                         "'ray' extra)") from None
    if not address:
        return None
    check_reachable(address)
    return probe_cluster(address)


def _gcs_address(ray) -> tuple[str, int] | None:
    """(host, port) of the GCS of the cluster this process is connected to, or None where
    this Ray does not say."""
    try:
        return _host_port(ray.get_runtime_context().gcs_address)
    except (AttributeError, SweepError, TypeError):
        return None


def start_marker(spec: dict[str, Any]) -> Path:
    """OUT/.sweep/started/<unit id>: written by the task when its unit begins (a task may wait
    in Ray's queue first, for resources other jobs hold or an autoscaler has yet to add)."""
    return Path(spec["out"]) / ".sweep" / "started" / spec["id"].replace("/", "__")


@functools.cache
def code_identity() -> dict[str, str | None]:
    """The sparsebert this process imports: its version, the commit of its checkout (None for
    an installed copy) and its folder."""
    import sparsebert  # noqa: PLC0415
    from sparsebert.runtime import git_sha  # noqa: PLC0415

    return {"version": sparsebert.__version__, "git_sha": git_sha(),
            "path": str(Path(sparsebert.__file__).resolve().parent)}


def check_same_code(driver: dict[str, str | None]) -> None:
    """RuntimeError when this worker's sparsebert is not the driver's (another version, or
    another commit where both run from checkouts): a cluster's nodes import their own
    environment's copy, and a unit run by other code would mix results silently."""
    mine = code_identity()
    shas = (driver.get("git_sha"), mine["git_sha"])
    if driver.get("version") != mine["version"] or (all(shas) and shas[0] != shas[1]):
        def shown(code):
            return (f"sparsebert {code.get('version')}"
                    + (f" ({code['git_sha']})" if code.get("git_sha") else "")
                    + f" from {code.get('path')}")

        raise RuntimeError(f"this Ray worker ({socket.gethostname()}) runs {shown(mine)}, the "
                           f"sweep's driver {shown(driver)}: install the driver's version on "
                           "every node (or share its checkout at the same path)")


def _run_unit(spec: dict[str, Any], runner: Callable[[dict[str, Any]], dict[str, Any]] | None
              = None) -> dict[str, Any]:
    """The Ray task: check that this worker runs the driver's sparsebert, mark the unit
    started (on the shared filesystem), then run it."""
    spec = dict(spec)
    driver = spec.pop("driver_code", None)
    if driver is not None:
        check_same_code(driver)
    if "out" in spec:
        marker = start_marker(spec)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    if runner is not None:
        return runner(spec)
    from sparsebert.sweep.units import run_unit  # noqa: PLC0415 (in the Ray worker)

    return run_unit(spec)


def _shown(resources: dict[str, float], keys) -> str:
    """'CPU 2, memory 3.0 GB' for the `keys` of a Ray resource dict."""
    return ", ".join(f"{k} {resources.get(k, 0) / 2**30:.1f} GB" if k == "memory"
                     else f"{k} {resources.get(k, 0):g}" for k in keys)


def unit_needs(slot: Slot, per_gpu: int, memory_gb: float) -> dict[str, float]:
    """The Ray resources one unit on `slot` requests."""
    needs = {"CPU": float(slot.threads)}
    if slot.device != "cpu":
        needs["GPU"] = 1 / per_gpu
    if memory_gb:
        needs["memory"] = memory_gb * 2**30
    return needs


def check_feasible(slots: list[Slot], nodes: list[dict[str, float]], per_gpu: int,
                   memory_gb: float) -> None:
    """SweepError when none of the live `nodes` (their Ray resources) can hold a unit's
    request (Ray would keep such a task waiting forever, and the sweep with it)."""
    for slot in slots:
        needs = unit_needs(slot, per_gpu, memory_gb)
        if any(all(node.get(k, 0) >= v for k, v in needs.items()) for node in nodes):
            continue
        have = "; ".join(_shown(node, needs) for node in nodes) or "no live node"
        raise SweepError(f"no node of the Ray cluster can run a unit: each needs "
                         f"{_shown(needs, needs)} (--threads, --per-gpu, "
                         f"--unit-memory-gb), the nodes have {have}")


def check_local_memory(memory_gb: float) -> None:
    """SweepError when --unit-memory-gb exceeds this machine's physical memory, so the local
    Ray instance the sweep would start could never hold a unit (the exact limit, Ray's
    share of the memory, is checked when the instance starts)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") \
        if hasattr(os, "sysconf") else None
    if total and memory_gb * 2**30 > total:
        raise SweepError(f"--unit-memory-gb {memory_gb:g}: more than this machine's memory "
                         f"({total / 2**30:.1f} GB), so its Ray instance cannot run a unit")


def _task_error_info(error: BaseException) -> dict[str, Any]:
    """error_info of a failed Ray task: the one-line error of the unit's own exception (the
    cause), and the traceback as the worker formatted it (the cause's frames do not survive
    pickling). ray.get raises a RayTaskError that is also an instance of the cause's class
    (as_instanceof_cause), whose attributes are the cause's: there the worker's traceback is
    only in its text (its first line names the worker's process, pid and ip), shown without
    its colour codes."""
    info = error_info(getattr(error, "cause", None) or error)
    remote = getattr(error, "traceback_str", None)
    if not (isinstance(remote, str) and remote.strip()) and _is_task_error(error):
        remote = _ANSI_ESCAPE.sub("", str(error)).rstrip("\n") + "\n"  # (as error_info's)
    if isinstance(remote, str) and remote.strip():
        info["traceback"] = remote[-4000:]
    return info


def _is_task_error(error: BaseException) -> bool:
    """Whether `error` is Ray's RayTaskError (False where Ray does not import)."""
    try:
        from ray.exceptions import RayTaskError  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(error, RayTaskError)


class Watchdog:
    """The watchdog of the local Ray instance this process starts (ray_watchdog.py): started
    before the instance, it stops the instance's processes if this process dies without
    shutting it down, also while the instance starts. started() once the instance runs;
    close() after ray.shutdown() ends it."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    @classmethod
    def start(cls) -> Watchdog | None:
        """A watchdog for an instance about to start below this process; None off Linux (no
        /proc)."""
        if not sys.platform.startswith("linux"):
            return None
        # its own session: a terminal's Ctrl-C or a kill of the command's process group reaches
        # the driver, which then shuts its instance down and closes the pipe
        return cls(subprocess.Popen(
            [sys.executable, "-I", ray_watchdog.__file__, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))

    def started(self) -> None:
        """The instance runs: the watchdog records its processes once more and stops looking
        for new ones (its log folder finds any started later)."""
        with contextlib.suppress(OSError):
            self.process.stdin.write(ray_watchdog.STARTED)
            self.process.stdin.flush()

    def close(self, shut_down: bool = True) -> None:
        """End the watchdog: at once when the instance was shut down (`shut_down`), else after
        it stopped the instance's processes (it is not waited for)."""
        if shut_down:
            with contextlib.suppress(OSError):
                self.process.stdin.write(ray_watchdog.CLOSED)
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        if not shut_down:
            return
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RayBackend:
    """Units as Ray tasks; at most one per slot at a time (slots bound the sweep's width)."""

    name = "ray"

    def __init__(self, slots: list[Slot], address: str | None, per_gpu: int,
                 memory_gb: float, runner: Callable[[dict[str, Any]], dict[str, Any]] | None
                 = None) -> None:
        """`runner`: the function each task runs its unit spec with (default
        sparsebert.sweep.units.run_unit)."""
        import ray  # noqa: PLC0415 (preflight, before the sweep directory was opened, checked
        # that Ray imports and that the cluster at `address` answers)

        self.ray, self.slots = ray, slots
        self.per_gpu, self.memory_gb = per_gpu, memory_gb
        self.started = not ray.is_initialized()
        # started before the instance: a kill -9 while it starts would leave its agents running
        self.watchdog = Watchdog.start() if self.started and not address else None
        options = {"include_dashboard": False, "log_to_driver": False,
                   "logging_level": "WARNING"}  # no connection banners in the sweep's output
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            if self.started and address:
                ray.init(address=address, **options)
            elif self.started:  # a new local instance as wide as the slots (not a cluster
                # that RAY_ADDRESS or the machine's last `ray start` names: Ray's default)
                ray.init(address="local", num_cpus=sum(s.threads for s in slots), **options)
        except BaseException as error:  # e.g. SIGTERM while the instance starts
            shut_down = False
            try:
                if self.started and ray.is_initialized():
                    ray.shutdown()  # an instance started half-way: its processes go with it
                    shut_down = True
            finally:  # else the watchdog stops what the failed start left running
                self._end_watchdog(shut_down)
            if isinstance(error, ConnectionError):
                raise SweepError(f"--ray-address {address}: {error}; use --backend local") \
                    from None
            if isinstance(error, SystemExit) and error.code == signal.SIGTERM:
                raise Terminated from None  # Ray's handler exits: report it as the command's
            raise
        finally:  # ray.init installs its own SIGTERM handler: keep the command's (as Ctrl-C)
            if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
                signal.signal(signal.SIGTERM, on_sigterm)
        if self.watchdog is not None:
            self.watchdog.started()
        self.pending: dict[Any, Slot] = {}
        # A cluster joined (not an instance of this sweep's own): where to check, while units
        # run, that it still answers, and the address to name when it stops. The address
        # given, which answered before the sweep began (HOST:PORT of the GCS, or of the Ray
        # Client server for ray://); for `auto` or a Ray this process had already joined, the
        # GCS address Ray reports, if it answers from here now (a GCS bound to an address the
        # driver cannot reach would read as a lost cluster: not checked then).
        self.joined = address or "the Ray instance this process had already joined"
        if self.started and not address:
            self.gcs = None
        elif self.started and address and address != "auto":  # (joined just now)
            self.gcs = _host_port(address)
        else:
            gcs = _gcs_address(ray)
            self.gcs = gcs if gcs is not None and unreachable(*gcs) is None else None
        self.checked_at, self.lost = time.monotonic(), False
        try:
            self._check_feasible()
        except SweepError:
            self.close()
            raise
        self.remote, self.runner = ray.remote(_run_unit), runner
        self.began: set[str] = set()  # units whose task has started (its marker seen)

    def _end_watchdog(self, shut_down: bool) -> None:
        """End the watchdog of the instance this sweep started, if any (Watchdog.close)."""
        if self.watchdog is not None:
            self.watchdog.close(shut_down)
            self.watchdog = None

    def _needs(self, slot: Slot) -> dict[str, float]:
        return unit_needs(slot, self.per_gpu, self.memory_gb)

    def _check_feasible(self) -> None:
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        check_feasible(self.slots, nodes, self.per_gpu, self.memory_gb)

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.busy is None]

    def submit(self, slot: Slot, spec: dict[str, Any], warm_key: Any) -> None:
        gpu = slot.device != "cpu"
        if gpu:
            spec = {**spec, "device": "cuda"}  # Ray gives the task its GPU as cuda:0
        needs = self._needs(slot)
        options: dict[str, Any] = {"num_cpus": slot.threads, "max_retries": 0}
        if "GPU" in needs:
            options["num_gpus"] = needs["GPU"]
        if "memory" in needs:
            options["memory"] = int(needs["memory"])
        if "out" in spec:  # a marker from an earlier attempt says nothing of this one
            start_marker(spec).unlink(missing_ok=True)
        spec = {**spec, "driver_code": code_identity()}
        task = self.remote.options(**options)
        ref = task.remote(spec) if self.runner is None else task.remote(spec, self.runner)
        slot.busy, slot.warm_key, slot.task = spec["id"], warm_key, ref.task_id().hex()
        slot.spec = spec
        self.began.discard(spec["id"])
        self.pending[ref] = slot

    def begun(self, unit_id: str) -> bool:
        """Whether the running unit `unit_id` has begun (its task left Ray's queue): its
        marker is on the shared filesystem. Units without a sweep directory count as begun."""
        if unit_id in self.began:
            return True
        slot = next((s for s in self.pending.values() if s.busy == unit_id), None)
        spec = None if slot is None else slot.spec
        if spec is None or "out" not in spec or start_marker(spec).exists():
            self.began.add(unit_id)
            return True
        return False

    def _check_cluster(self, now: bool = False, running: int | None = None) -> None:
        """ClusterLost when the joined cluster's GCS stopped answering (every HEALTH_CHECK_S,
        or now): the sweep stops with its address named, before Ray's own 60 s exit.
        running: the units that were running (default: those still pending)."""
        if self.gcs is None or (not now and time.monotonic() - self.checked_at < HEALTH_CHECK_S):
            return
        self.checked_at = time.monotonic()
        reason = unreachable(*self.gcs)
        if reason is not None:
            self.lost = True
            raise ClusterLost(f"--ray-address {self.joined}: the Ray cluster stopped answering "
                              f"({reason} at {self.gcs[0]}:{self.gcs[1]}) with "
                              f"{len(self.pending) if running is None else running} unit(s) "
                              "running; rerun the same command "
                              "once it is back (finished units are kept)")

    def poll(self, timeout: float) -> list[Event]:
        self._check_cluster()
        if not self.pending:
            time.sleep(timeout)
            return []
        # Return as soon as one unit ends (its slot is refilled at once), with every other
        # unit that has ended by then.
        refs = list(self.pending)  # (the units running now)
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and len(refs) > 1:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        events = [self._collect(ref) for ref in ready]
        if any(not event.ok for event in events):  # a dead node or worker: is the cluster?
            self._check_cluster(now=True, running=len(refs))
        return events

    def _collect(self, ref) -> Event:
        """The event of the finished task `ref`, whose slot is free again."""
        slot = self.pending.pop(ref)
        self._forget(slot)
        unit_id, slot.busy, slot.task = slot.busy, None, None
        try:
            return Event(unit_id, True, self.ray.get(ref))
        except Exception as error:  # noqa: BLE001 (a task error, a dead worker or node)
            return Event(unit_id, False, _task_error_info(error))

    def stop(self, unit_id: str, info: dict[str, Any]) -> list[Event]:
        """Stop the running unit `unit_id` (past its timeout): its task is force-cancelled
        (Ray kills the worker running it) and the unit reported failed with `info`; a result
        that came just before counts instead. [] when no slot runs it."""
        ref = next((r for r, s in self.pending.items() if s.busy == unit_id), None)
        if ref is None:
            return []
        ready, _ = self.ray.wait([ref], num_returns=1, timeout=0)
        if ready:
            return [self._collect(ref)]
        slot = self.pending.pop(ref)
        self._forget(slot)
        slot.busy, slot.task = None, None
        try:
            self.ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 (it has just finished, or its worker is gone)
            pass
        return [Event(unit_id, False, info)]

    def _forget(self, slot: Slot) -> None:
        """The ended unit of `slot`: its start marker and begun flag go."""
        spec = slot.spec
        if spec is not None and "out" in spec:
            with contextlib.suppress(OSError):
                start_marker(spec).unlink(missing_ok=True)
        self.began.discard(slot.busy)
        slot.spec = None

    def close(self) -> None:
        """Stop the units still running (an interrupted or failed sweep: on a cluster the
        caller keeps using, they would otherwise run on), then Ray if the sweep started it.
        An instance the sweep started is shut down with its workers and nothing is cancelled
        first: a force-cancel racing a unit's reply can abort the driver inside Ray's core
        worker ("Tried to complete task that was not pending", seen with Ray 2.60)."""
        if self.lost:  # nothing answers to cancel with; the units go with this driver
            self.pending.clear()
            return
        if self.started:
            self.pending.clear()
            shut_down = False
            try:
                self.ray.shutdown()
                shut_down = True
            finally:  # a shutdown cut short (a second Ctrl-C): the watchdog stops what is left
                self._end_watchdog(shut_down)
            return
        for ref in list(self.pending):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 (already finished, or its worker already gone)
                pass
        self.pending.clear()
