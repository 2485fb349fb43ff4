"""CUDA-graph capture on the device the work runs on.

`torch.cuda.graph(g)` without a stream captures on a side stream that torch creates once per
process on the *current* device (cuda:0 unless something calls set_device). Work on cuda:N
(N > 0) then goes to cuda:N's own stream, outside the capture: it runs once, eagerly, and the
graph replays nothing. `capture(graph, device, pool)` captures on a stream of `device` with that
device current; the stream is one per device, so every capture sharing a pool uses the same
stream, as torch asks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device | str | int) -> torch.cuda.Stream:
    """The capture stream of a CUDA device (created on first use)."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"capture_stream: 'device' must be a CUDA device, got {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, device: torch.device | str | int,
            pool: object | None = None) -> Iterator[None]:
    """`with capture(graph, device, pool):` records the block's CUDA work on `device` into
    `graph` (torch.cuda.graph on that device's capture stream, the device made current)."""
    stream = capture_stream(device)
    with torch.cuda.device(stream.device), torch.cuda.graph(graph, pool=pool, stream=stream):
        yield
