"""Process helpers shared by the sweep tests."""

from __future__ import annotations

from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie left by a killed parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
