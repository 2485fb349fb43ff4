"""Reused buffers for the fast path's large per-layer intermediates on the CPU.

One encoder layer of the fast path makes three large intermediates: the fused QKV projection
(T, 3*k*D), the FFN's up projection (T, f) and the hidden-size projections (T, hidden) before
each residual add. Allocated afresh on every call, blocks that size come from the C allocator,
which returns them to the operating system between uses (glibc trims the heap top and maps big
blocks with mmap), so each forward pays page faults and zero-filling for tens of MB. On the
default model (B=16, S=128, fp32), `python bench/bench_speed.py --threads 2,1` measured the
fast path's dense forward at 1.02x (2 threads) and 1.01x (1 thread) of stock Hugging Face's
before this workspace and 0.85x-0.87x / 0.90x with it (two runs; bench/results/speed-cpu.md
holds the second). Stock Hugging Face itself gains about as much when the whole process's
allocator keeps freed memory (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set high): the
saving is the allocator's, which the workspace gets without changing the process's settings.

Workspace.view(role, rows, cols, like) -> a contiguous (rows, cols) view of the front of one
flat buffer per role (grown when too small, never shrunk until `release()`), per thread: two
threads running the same model each get their own buffers. Nothing a layer returns is a
workspace view (its outputs come from LayerNorm), so results a caller holds are never
overwritten by a later call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Workspace:
    """Per-thread flat buffers, one per role, served as (rows, cols) views."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __reduce__(self):
        """Copies and pickles start empty: the buffers are a cache, not state (and a
        threading.local cannot be copied)."""
        return (Workspace, ())

    def _buffers(self) -> dict[str, Tensor]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        return buffers

    def view(self, role: str, rows: int, cols: int, like: Tensor) -> Tensor:
        """A contiguous (rows, cols) tensor of like's dtype and device, from role's buffer."""
        buffers = self._buffers()
        need = rows * cols
        buffer = buffers.get(role)
        if (buffer is None or buffer.numel() < need or buffer.dtype != like.dtype
                or buffer.device != like.device
                # made under torch.inference_mode(): not writable outside it
                or (buffer.is_inference() and not torch.is_inference_mode_enabled())):
            buffer = buffers[role] = torch.empty(need, dtype=like.dtype, device=like.device)
        return buffer[:need].view(rows, cols)

    def nbytes(self) -> int:
        """Bytes this thread's buffers hold."""
        return sum(b.numel() * b.element_size() for b in self._buffers().values())

    def release(self) -> None:
        """Drop every thread's buffers (the next call allocates them again)."""
        self._local = threading.local()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, workspace: Workspace | None,
           role: str) -> Tensor:
    """F.linear(x (T, in), weight (out, in), bias (out,)) -> (T, out), written into
    workspace's `role` buffer when a workspace is given (the same addmm as F.linear's)."""
    if workspace is None:
        return F.linear(x, weight, bias)
    out = workspace.view(role, x.shape[0], weight.shape[0], x)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def inplace_activation(activation: Callable[[Tensor], Tensor]
                       ) -> Callable[[Tensor], Tensor] | None:
    """The in-place form of a known activation module (exactly the same values), else None:
    nn.GELU, nn.ReLU, and transformers' GELUActivation / ReLU entries of ACT2FN."""
    if isinstance(activation, nn.GELU):
        approximate = activation.approximate
        return lambda h: torch.ops.aten.gelu_(h, approximate=approximate)
    if isinstance(activation, nn.ReLU):
        return torch.relu_
    act = getattr(activation, "act", None)  # transformers.activations.GELUActivation
    if type(activation).__name__ == "GELUActivation" and act is F.gelu:
        return torch.ops.aten.gelu_
    return None
