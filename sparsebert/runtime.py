"""Facts about the running machine for logs and results: device names, versions, git SHA."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """Human-readable name of `device`: the GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_label(device: torch.device | str) -> str:
    """device_name(), with the torch thread count on the CPU: 'Xeon ... (2 threads)'."""
    device = torch.device(device)
    if device.type == "cuda":
        return device_name(device)
    threads = torch.get_num_threads()
    return f"{device_name(device)} ({threads} thread{'' if threads == 1 else 's'})"


def versions() -> dict[str, str]:
    """Versions of python, torch, transformers and sparsebert (and CUDA when built with it)."""
    import transformers  # noqa: PLC0415

    import sparsebert  # noqa: PLC0415  (the code that runs, installed or not)

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "sparsebert": sparsebert.__version__}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def git_sha(path: str | Path | None = None) -> str | None:
    """HEAD commit of the repository holding `path`, or None. By default, of this package's
    source checkout: None for an installed copy (site-packages), even one inside some other
    repository (a project's .venv), whose HEAD says nothing about this code."""
    package = Path(__file__).resolve().parent
    return _head(Path(path)) if path else _head(package, package=package)


def _head(where: Path, package: Path | None = None) -> str | None:
    """HEAD (with -dirty) of the repository holding `where`; with `package`, only when that
    repository's top level holds `package` as its top-level folder."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD", "--show-toplevel"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != 2:
        return None
    sha, top = lines
    if package is not None and Path(top).resolve() / package.name != package:
        return None  # not this package's checkout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                           capture_output=True, text=True, timeout=10, check=False).stdout
    return sha + ("-dirty" if dirty.strip() else "")
