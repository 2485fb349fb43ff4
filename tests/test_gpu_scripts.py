"""The prepared GPU scripts (bench/gpu_*.sh) run where no test can: what can be checked here is
checked here. They parse; a mistyped step name stops them before anything runs; a step cut at
its time limit gets SIGINT first (pytest then still prints its failures)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("gpu_*.sh"))


def _bash(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"out={tmp_path}; {script}"], cwd=BENCH.parent,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


@pytest.mark.parametrize("steps, ok", [("", True), ("build,trace", True), ("build, trace", False),
                                       ("bulid", False)])
def test_unknown_step_names_stop_the_script(tmp_path, steps, ok):
    done = _bash(f"steps='{steps}'; source bench/gpu_common.sh; check_steps build trace; "
                 "echo checked", tmp_path)
    assert (done.returncode == 0 and "checked" in done.stdout) == ok, done
    if not ok:
        assert done.returncode == 2 and "unknown step" in done.stderr


def test_a_step_at_its_limit_is_interrupted_then_logged(tmp_path):
    log = tmp_path / "step.log"
    command = "trap 'echo interrupted; exit 130' INT; sleep 30 & wait"
    done = _bash(f"steps=''; source bench/gpu_common.sh; step slow 1 {log} bash -c \"{command}\"",
                 tmp_path)
    assert done.returncode == 124 and "slow: exit 124" in done.stdout
    assert "interrupted" in log.read_text()
    assert "slow: exit 124" in (tmp_path / "summary.txt").read_text()


def _limits(script: Path) -> dict[str, int]:
    """{step name: its time limit in seconds} from the script's `step NAME LIMIT ...` lines."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^\s*(?:if ! )?(?:\S+=\S+ )*step ([\w-]+) (\d+) ",
                                 script.read_text(), re.M)}


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_speed.sh"])
def test_every_documented_call_fits_one_device_call(script):
    """Each call the header documents (GPU_*_STEPS=...) fits the 600 s a device call may run even
    when every step runs to its limit plus the 15 s before SIGKILL, and starts with the build
    (a fresh machine has no extension; a warm one rebuilds nothing)."""
    path = BENCH / script
    limits = _limits(path)
    calls = re.findall(r"^#\s+GPU_\w+_STEPS=([\w,-]+)", path.read_text(), re.M)
    assert len(calls) >= 2, calls
    for call in calls:
        names = call.split(",")
        assert names[0] == "build" and set(names) <= set(limits), (call, limits)
        assert sum(limits[n] + 15 for n in names) <= 600, (call, limits)
