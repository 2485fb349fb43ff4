"""CUDA-graph replay of a FastEncoder, one graph per shape bucket.

A bucket is (B, S, T_pad, every_position, padded keys, dtype): T_pad is the number of real tokens
rounded up to the encoder's `bucket` (tokens.Packing pads the rest with dummy slots), so batches
with slightly different lengths replay the same graph. Each graph reads static input buffers (hidden
states, token positions, cumulative lengths, the attention grid) that `run` fills before the replay;
the attention grid is S long so it fits every batch of the bucket. All graphs share one memory pool.
The FastEncoder drops this cache whenever its compact weights are rebuilt (the graphs captured their
addresses).

`GraphCache(encoder, capture=False)` runs the same static-buffer bucket logic eagerly, without
CUDA (tests check the buckets on CPU that way).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsebert.graph_capture import capture
from sparsebert.speed.attention_core import choose_core, full_core
from sparsebert.speed.tokens import Packing


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None without capture: `body` runs eagerly
    body: Callable[[], Tensor]
    hidden: Tensor  # (B, S, hidden) static input
    packing: Packing  # static packing (its tensors are static inputs)
    out: Tensor  # (B, S, hidden) static output


def _with_grid_length(packing: Packing, length: int) -> Packing:
    """The same packing with its attention grid S long (one grid shape per bucket)."""
    if packing.every_position:
        return packing
    copy = dataclasses.replace(packing, max_len=length)
    copy.__dict__.pop("_grid", None)
    return copy


class GraphCache:
    """Captured graphs of one FastEncoder by bucket."""

    def __init__(self, encoder, capture: bool = True, max_graphs: int = 32) -> None:
        self.encoder = encoder
        self.capture = capture
        self.max_graphs = max_graphs  # least recently used graphs beyond this are dropped
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    @staticmethod
    def key(hidden: Tensor, packing: Packing) -> tuple:
        """The bucket: shapes, packing, dtype, device and the autocast state on that device (a
        graph captured under autocast computes in its dtype on every replay)."""
        kind = hidden.device.type
        autocast = (torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind)
                    else None)
        return (*hidden.shape, packing.padded_tokens, packing.every_position,
                packing.key_mask is not None, hidden.dtype, hidden.device, autocast)

    def run(self, hidden: Tensor, packing: Packing) -> Tensor:
        """(B, S, hidden) -> (B, S, hidden) by replaying (capturing first) the bucket's graph."""
        packing = _with_grid_length(packing, packing.seq)
        key = self.key(hidden, packing)
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            captured = self.graphs[key] = self._capture(hidden, packing)
        else:
            self.graphs.move_to_end(key)
            self._fill(captured, hidden, packing)
        if captured.graph is None:
            return captured.body().clone()
        captured.graph.replay()
        return captured.out.clone()

    # Static inputs ---------------------------------------------------------------------------
    @staticmethod
    def _static_packing(packing: Packing) -> Packing:
        static = dataclasses.replace(
            packing,
            indices=packing.indices.clone(),
            cu_seqlens=packing.cu_seqlens.clone(),
            key_mask=None if packing.key_mask is None else packing.key_mask.clone(),
            tokens=packing.padded_tokens,  # the graph writes every slot (dummies to a spare row)
        )
        static.__dict__.pop("_buffers", None)
        if not packing.every_position:
            static.__dict__["_grid"] = tuple(t.clone() for t in packing.grid())
        return static

    @staticmethod
    def _fill(captured: _Captured, hidden: Tensor, packing: Packing) -> None:
        static = captured.packing
        captured.hidden.copy_(hidden)
        static.indices.copy_(packing.indices)
        static.cu_seqlens.copy_(packing.cu_seqlens)
        if packing.key_mask is not None:
            static.key_mask.copy_(packing.key_mask)
        if not packing.every_position:
            for dst, src in zip(static.grid(), packing.grid()):
                dst.copy_(src)

    def _capture(self, hidden: Tensor, packing: Packing) -> _Captured:
        encoder = self.encoder
        static_hidden, static = hidden.clone(), self._static_packing(packing)
        core = full_core if packing.every_position else choose_core(hidden.device, hidden.dtype)

        def body() -> Tensor:
            from sparsebert.speed.encoder import layer_forward  # noqa: PLC0415

            x = static.pack(static_hidden)
            for c in encoder._compact:
                x = layer_forward(c, x, static, core)
            return static.unpack(x)

        if not self.capture:
            return _Captured(None, body, static_hidden, static, static_hidden)
        # Step 1: warm up on a side stream (lazy initialisation, workspaces) outside the capture.
        side = torch.cuda.Stream(device=hidden.device)
        side.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream(hidden.device).wait_stream(side)
        # Step 2: capture into the shared pool; a bucket that cannot be captured runs eagerly.
        graph = torch.cuda.CUDAGraph()
        try:
            with capture(graph, hidden.device, pool=self.pool):
                out = body()
        except RuntimeError as error:
            warnings.warn(f"sparsebert.accelerate: CUDA-graph capture failed for bucket "
                          f"{self.key(hidden, packing)[:3]}, running it eagerly ({error})",
                          stacklevel=3)
            torch.cuda.synchronize(hidden.device)
            return _Captured(None, body, static_hidden, static, static_hidden)
        return _Captured(graph, body, static_hidden, static, out)
