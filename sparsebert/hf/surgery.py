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
from sparsebert.nn.common import layer_linears


def _sliceable(linear: nn.Module) -> bool:
    """Whether prune can put a sliced nn.Linear in `linear`'s place and lose nothing: an
    nn.Linear itself (not a subclass, a parametrized one, an adapter such as peft's LoRA layer
    wrapping one, or a quantized one), with no hooks of its own (the new module would not
    carry them; torch.nn.utils.prune's mask is one) and its class's forward."""
    return (type(linear) is nn.Linear and "forward" not in linear.__dict__
            and not linear._forward_hooks and not linear._forward_pre_hooks
            and not linear._backward_hooks and not linear._backward_pre_hooks)


def prune(model: nn.Module) -> nn.Module:
    """Remove masked heads / MLPs / neurons of a patched model in place; returns the model.
    Everything is checked before any layer changes: a projection that would be sliced must be a
    plain nn.Linear (merge adapters first, e.g. peft's `merge_and_unload`; remove hooks and
    parametrizations; quantize after pruning), or nothing is pruned."""
    blocks = sparse_blocks(model)
    plans = []  # per layer: (heads to keep or None, neurons to keep or None); None = as is
    for layer, (attn, mlp) in enumerate(blocks):
        if (
            attn.head_gate_override is not None
            or mlp.mlp_gate_override is not None
            or mlp.neuron_gate_override is not None
        ):
            raise ValueError(
                f"sparsebert.prune: layer {layer} has an active gate override; prune outside it"
            )
        # Step 1: heads.
        keep_heads = torch.nonzero(attn.head_gate != 0).flatten().tolist()
        heads = keep_heads if len(keep_heads) < attn.num_heads else None
        # Step 2: the MLP as a whole, then its neurons.
        neurons = None
        if mlp.intermediate_size:
            keep = ([] if float(mlp.mlp_gate) == 0
                    else torch.nonzero(mlp.neuron_gate != 0).flatten().tolist())
            neurons = keep if len(keep) < mlp.intermediate_size else None
        # the projections that would be sliced (not removed)
        sliced = layer_linears(attn, mlp, attention=bool(heads), ffn=bool(neurons))
        for name, linear in sliced.items():
            if linear is not None and not _sliceable(linear):
                raise UnsupportedModelError(
                    f"sparsebert.prune: layer {layer}'s {name} projection "
                    f"({type(linear).__module__}.{type(linear).__name__}) is not a plain "
                    f"nn.Linear (an adapter, a quantized, parametrized or hooked linear), which "
                    f"slicing would drop: merge adapters first (peft: merge_and_unload), remove "
                    f"hooks and parametrizations, or prune first and add them (or quantize) "
                    f"after; nothing was pruned")
        plans.append((heads, neurons))
    for (attn, mlp), (heads, neurons) in zip(blocks, plans):
        if heads is not None:
            attn.select_heads(heads)
        if neurons is not None:
            mlp.select_neurons(neurons)
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
