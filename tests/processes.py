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


def write_shared_tensors(weights: list, gates: list) -> None:
    """In another process: scale `weights` by 3 and set `gates` to 1, in place (tensors in
    shared memory, as a Hogwild worker writes a model's parameters)."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        for weight in weights:
            weight.mul_(3)
        for gate in gates:
            gate.fill_(1)
