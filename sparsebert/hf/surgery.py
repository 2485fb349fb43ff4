"""Physical pruning: remove gated-off heads, MLPs and FFN neurons for real.

prune(model) keeps, per layer, the heads with gate != 0 (slicing q/k/v rows and output-dense
columns) and the neurons with gate != 0 (slicing intermediate-dense rows and output-dense columns);
an MLP with gate 0 (or no neuron left) is removed, as is the attention of a layer with no head left
(the paper's `self.self = None`, `output.dense = None`, LayerNorm kept). Kept soft gates stay in
the buffers, so the pruned model computes what the masked model computes (fp32: < 1e-5).
Per-layer sizes then differ; the config keeps the original sizes and each module its own.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsebert.hf.patching import sparse_blocks
from sparsebert.hf.structure import UnsupportedModelError
from sparsebert.nn.common import quantized_linears


def prune(model: nn.Module) -> nn.Module:
    """Remove masked heads / MLPs / neurons of a patched model in place; returns the model."""
    blocks = sparse_blocks(model)
    for layer, (attn, mlp) in enumerate(blocks):
        if (
            attn.head_gate_override is not None
            or mlp.mlp_gate_override is not None
            or mlp.neuron_gate_override is not None
        ):
            raise ValueError(
                f"sparsebert.prune: layer {layer} has an active gate override; prune outside it"
            )
        parts = [attn, mlp] if mlp.host is None else [mlp.host]  # (the host holds both)
        quantized = [name for part in parts for name in quantized_linears(part)]
        if quantized:  # checked for every layer before any is sliced: all or nothing
            raise UnsupportedModelError(
                f"sparsebert.prune: layer {layer} has quantized linears ({', '.join(quantized)}), "
                f"which cannot be sliced: prune the float model, then quantize it")
    for attn, mlp in blocks:
        # Step 1: heads.
        keep_heads = torch.nonzero(attn.head_gate != 0).flatten().tolist()
        if len(keep_heads) < attn.num_heads:
            attn.select_heads(keep_heads)
        # Step 2: the MLP as a whole, then its neurons.
        if mlp.intermediate_size:
            keep = (
                []
                if float(mlp.mlp_gate) == 0
                else torch.nonzero(mlp.neuron_gate != 0).flatten().tolist()
            )
            if len(keep) < mlp.intermediate_size:
                mlp.select_neurons(keep)
    return model


def layer_sizes(model: nn.Module) -> list[dict[str, int]]:
    """Per-layer sizes of a patched model: [{"num_heads", "head_dim", "intermediate_size"}]."""
    return [
        {
            "num_heads": attn.num_heads,
            "head_dim": attn.head_dim,
            "intermediate_size": mlp.intermediate_size,
        }
        for attn, mlp in sparse_blocks(model)
    ]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
