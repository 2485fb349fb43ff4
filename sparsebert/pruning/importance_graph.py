"""The importance pass replayed from CUDA graphs (`importance(..., cuda_graph=True)`).

An eager importance batch launches a few thousand small kernels from Python (forward, the
backward to the gate leaves, the accumulation); on a GPU the host, not the device, then sets
the pace (DESIGN.md §7). `GraphedScorer` captures the whole batch body of
`sparsebert.pruning.importance.BatchScorer` once per batch shape and replays it:

  * static inputs, labels and gate leaves per shape (the leaves hold the model's gate values,
    which do not change during a pass); a batch is copied into the inputs, then one replay runs
    the forward, the backward and the in-place accumulation into the pass's running sums;
  * two eager warm-up passes per new shape run on a side stream first (lazy initialisation,
    cuBLAS plans), accumulating into scratch sums, so they count nothing twice;
  * autocast runs without its weight cache (a captured graph cannot fill it); under bf16 the
    linears' weights are already bf16 copies made once for the pass (sparsebert.precision), so
    a graph holds no weight casts, and the copies outlive every replay of the pass;
  * during warm-up and capture transformers builds padding masks with the "sparsebert" mask
    function: a stride-0 view that the patched attention takes for a key padding mask without
    reading it. SDPA's mask function materialises (B, 1, S, S), which a capture cannot read
    (the attention would then run SDPA where the warm-up ran the masked-attention kernels);
  * all graphs share one memory pool: everything that outlives a replay (sums, inputs, leaves)
    lives outside it, and replays never overlap.
Shapes beyond `max_graphs` run eagerly. The gradients a replay returns are the graph's static
outputs: valid until the next batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsebert.graph_capture import capture
from sparsebert.hf.attention_backend import padding_masks_as_views
from sparsebert.pruning.importance import BatchScorer, GateGrads, ScoreSums, check_class_ids


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict  # static inputs the graph reads (non-tensor entries as given)
    labels: Tensor  # (B,) static labels
    leaves: list  # the gate leaves the graph differentiates to
    grads: GateGrads  # static gradients the graph writes


class GraphedScorer:
    """`scorer`'s batch body, one CUDA graph per batch shape, accumulating into `sums`.

    Call with a batch's inputs (on the model's device, labels removed) and its labels; returns
    (gradients, leaves) of that batch, as the eager body does. Raises ValueError for
    mode="michel" (its per-token hooks run eagerly) and for a model not on a CUDA device."""

    def __init__(self, scorer: BatchScorer, sums: ScoreSums, warmup_passes: int = 2,
                 max_graphs: int = 8) -> None:
        if scorer.mode == "michel":
            raise ValueError("importance: cuda_graph=True supports the gate-gradient modes "
                             "('paper', 'per_example', 'fisher'), not 'michel'")
        if scorer.device.type != "cuda":
            raise ValueError(f"importance: cuda_graph=True needs a model on a CUDA device, got "
                             f"one on {scorer.device}")
        if warmup_passes < 1:
            raise ValueError(f"GraphedScorer: 'warmup_passes' must be >= 1, got {warmup_passes}")
        scorer.autocast_cache = False
        self.scorer, self.sums = scorer, sums
        self.warmup_passes, self.max_graphs = warmup_passes, max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = None

    @staticmethod
    def _key(inputs: Mapping, labels: Tensor) -> tuple:
        """What a graph is specific to: every tensor's shape and dtype, other values as given."""
        def describe(value):
            return (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else repr(value)

        return (describe(labels),) + tuple((name, describe(value))
                                           for name, value in sorted(inputs.items()))

    def __call__(self, inputs: Mapping, labels: Tensor) -> tuple[GateGrads, list]:
        key = self._key(inputs, labels)
        entry = self.graphs.get(key)
        if entry is None and len(self.graphs) >= self.max_graphs:
            leaves = self.scorer.leaves(labels.shape[0])
            grads = self.scorer.gradients(inputs, labels, leaves)
            self.scorer.accumulate(grads, self.sums)
            return grads, leaves
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs, labels)
        else:  # (the capture checked its own batch's; a replay computes with .long() ids)
            check_class_ids(labels, self.scorer.num_labels)
        for name, value in inputs.items():
            if isinstance(value, Tensor):
                entry.inputs[name].copy_(value, non_blocking=True)
        entry.labels.copy_(labels, non_blocking=True)
        entry.graph.replay()
        return entry.grads, entry.leaves

    def _capture(self, inputs: Mapping, labels: Tensor) -> _Captured:
        device = self.scorer.device
        static = {name: value.clone() if isinstance(value, Tensor) else value
                  for name, value in inputs.items()}
        static_labels = labels.clone()
        leaves = self.scorer.leaves(labels.shape[0])
        scratch = self.sums.zeros_like()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        with padding_masks_as_views(self.scorer.model):
            with torch.cuda.stream(side):  # warm-up: lazy inits, cuBLAS plans; counts nothing
                for _ in range(self.warmup_passes):
                    grads = self.scorer.gradients(static, static_labels, leaves)
                    self.scorer.accumulate(grads, scratch)
            torch.cuda.current_stream(device).wait_stream(side)
            with capture(graph, device, pool=self.pool):
                grads = self.scorer.gradients(static, static_labels, leaves)
                self.scorer.accumulate(grads, self.sums)
        if self.pool is None:
            self.pool = graph.pool()
        return _Captured(graph, static, static_labels, leaves, grads)
