"""The variants `sparsebert speed` times, each a zero-argument callable over one fixed batch.

    hf_eager   the stock Hugging Face model (its default attention implementation), eager
    hf_graph   the same, its whole forward captured in one CUDA graph (CUDA only)
    dense      sparsebert.accelerate on the patched model with every gate on
    masked     sparsebert.accelerate with the masks (compact kept heads / neurons)
    patched    the full model patched (every gate on), its own padded forward: the baseline
               of `pruned`, which runs the same forward (so its speed-up is the pruning's)
    pruned     the physically pruned model (sparsebert.prune), its own forward
dense and masked unpad padded batches; with padding they are also timed without unpadding
(`unpad: false` rows). Model copies share nothing, so each variant's caches stay warm.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import sparsebert
from sparsebert.graph_capture import capture
from sparsebert.speed.accelerate import accelerate
from sparsebert.speed.workload import MaskSet


@dataclass
class Variant:
    """One timed callable and what it is."""

    variant: str  # hf_eager | hf_graph | dense | masked | patched | pruned
    fn: Callable[[], torch.Tensor]  # returns logits (B, C)
    masks: MaskSet | None  # None = every head and neuron
    unpad: bool = False
    subnetwork: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        parts = [self.variant, self.subnetwork, "" if self.unpad else "padded"]
        return " ".join(p for p in parts if p)


def _logits(model: nn.Module, batch: dict) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).logits

    return run


def cuda_graph(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """fn captured once in a CUDA graph (its inputs are fixed tensors); returns replay()."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capture(graph, device):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def patched_copy(model: nn.Module, masks: MaskSet | None) -> nn.Module:
    """A deep copy of `model`, patched, with `masks` set (None: all gates on)."""
    patched = sparsebert.patch(copy.deepcopy(model))
    if masks is not None:
        sparsebert.set_masks(patched, head_mask=masks.head_mask, mlp_mask=masks.mlp_mask,
                             neuron_mask=masks.neuron_mask)
    return patched.eval()


def stock_variants(model: nn.Module, batch: dict, device: torch.device) -> list[Variant]:
    """hf_eager, and hf_graph on CUDA (a note instead when the forward cannot be captured, or
    when the replay does not give the eager logits: a host-side decision baked into the graph)."""
    eager = _logits(model, batch)
    out = [Variant("hf_eager", eager, None)]
    if device.type != "cuda":
        return out
    try:
        replay = cuda_graph(eager, device)
    except RuntimeError as error:  # e.g. a host sync inside the model's mask handling
        torch.cuda.synchronize(device)
        out[0].notes.append(f"hf_graph: the stock forward cannot be captured ({error})"[:200])
        return out
    expected, got = eager().float(), replay().float()
    tolerance = 1e-3 * (1.0 + float(expected.abs().max()))
    if not torch.allclose(got, expected, rtol=0, atol=tolerance):
        out[0].notes.append("hf_graph: left out, its replay differs from the eager forward by "
                            f"{float((got - expected).abs().max()):.1e}")
        return out
    out.append(Variant("hf_graph", replay, None))
    return out


def fast_variants(name: str, model: nn.Module, masks: MaskSet | None, batch: dict,
                  padded: bool, subnetwork: str = "") -> tuple[list[Variant], nn.Module]:
    """dense/masked on the fast path (unpadded, and padded when the batch has padding);
    returns the variants and the patched (masked) model they share."""
    patched = patched_copy(model, masks)
    variants = [Variant(name, _logits(accelerate(patched), batch), masks, unpad=True,
                        subnetwork=subnetwork)]
    if padded:
        variants.append(Variant(name, _logits(accelerate(patched, unpad=False), batch), masks,
                                unpad=False, subnetwork=subnetwork))
    return variants, patched


def patched_full_variant(model: nn.Module, batch: dict) -> Variant:
    """The full model patched (all gates on), its own (padded) forward: `pruned`'s baseline."""
    return Variant("patched", _logits(patched_copy(model, None), batch), None, unpad=False)


def pruned_variant(patched: nn.Module, masks: MaskSet, batch: dict,
                   subnetwork: str = "") -> Variant:
    """The physically pruned copy of a masked patched model, its own forward."""
    pruned = sparsebert.prune(copy.deepcopy(patched)).eval()
    return Variant("pruned", _logits(pruned, batch), masks, unpad=False, subnetwork=subnetwork)
