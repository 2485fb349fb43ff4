"""Swap SparseAttention / SparseMLP into a Hugging Face model, in place.

After `patch(model)`, for every encoder layer (names from sparsebert.hf.structure):
* `layer.<attention>` is a SparseAttention built around the original q/k/v, output dense,
  LayerNorm and dropout modules (same Parameter objects, same names: `attention.self.query.weight`,
  `attention.output.dense.weight`, ...);
* `layer.sparse_mlp` is a SparseMLP attached to the layer's own `intermediate` / `output` children
  (which stay where they are, so their names do not change) and `layer.<ffn_entry>` (the method
  BertLayer calls on the attention output) is routed to it through an instance attribute
  (`_FFNEntry`).
State dicts, parameter names and shapes are those of the unpatched model; gates are non-persistent
buffers. With all gates at 1 the outputs equal the unpatched model's (fp32: < 1e-5).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from sparsebert.hf.checkpoint_replay import watch_checkpointing
from sparsebert.hf.structure import (
    ModelStructure,
    UnsupportedModelError,
    config_size,
    encoder_layers,
    structure_for,
)
from sparsebert.nn import SparseAttention, SparseMLP
from sparsebert.nn.common import quantized_linears

MLP_ATTR = "sparse_mlp"
"""Name under which a patched layer registers its SparseMLP (our name, not the model's)."""


class _FFNEntry:
    """Stands in for a layer's FFN method (e.g. BertLayer.feed_forward_chunk): calls the layer's
    SparseMLP (with module hooks). A plain object with a one-argument __call__, because HF's
    apply_chunking_to_forward inspects the callable's signature on every layer's every call: the
    signature is given as __signature__ (inspect.signature returns it at once, about 2 us, where
    working it out from __call__ takes about 20). It deep-copies and pickles along with the
    model."""

    __signature__ = inspect.Signature(
        [inspect.Parameter("hidden_states", inspect.Parameter.POSITIONAL_OR_KEYWORD)])

    def __init__(self, mlp: SparseMLP) -> None:
        self.mlp = mlp

    def __call__(self, hidden_states):
        return self.mlp(hidden_states)


def _check_config(model: nn.Module, row: ModelStructure) -> None:
    for flag in row.unsupported_flags:
        if getattr(model.config, flag, False):
            raise UnsupportedModelError(
                f"sparsebert.patch: config.{flag}=True is not supported "
                "(encoder self-attention only)"
            )


def _check_layers(layers: nn.ModuleList) -> None:
    """Refuse encoder layers a patched model cannot gate one by one: a module with parameters
    (a whole layer, its attention, its FFN denses, ...) or a parameter that runs at two places of
    the encoder (shared weights, as ALBERT's), whose one set of gates would merge the places'
    masks and whose slicing by `prune` would cut the other place too; and quantized linears,
    which cannot be sliced. (Modules without parameters, an activation, may be shared.)"""
    first_at: dict[int, tuple[int, str]] = {}  # id -> (layer, name) where it first runs
    for index, layer in enumerate(layers):
        parts = [(name or type(layer).__name__, module) for name, module in layer.named_modules()
                 if name == "" or any(True for _ in module.parameters(recurse=False))]
        parts += list(layer.named_parameters())
        for name, part in parts:
            earlier, earlier_name = first_at.setdefault(id(part), (index, name))
            if earlier != index:
                raise UnsupportedModelError(
                    f"sparsebert.patch: encoder layers {earlier} and {index} share one "
                    f"{type(part).__name__} ({earlier_name} of layer {earlier}, {name} of layer "
                    f"{index}; shared weights): patched blocks would hold one set of gates for "
                    f"both places, so their masks would merge, and pruning one would cut the "
                    f"other; load the model with attn_implementation='sparsebert' instead (one "
                    f"gate row per shared module)")
        quantized = quantized_linears(layer)
        if quantized:
            raise UnsupportedModelError(
                f"sparsebert.patch: encoder layer {index} has quantized linears "
                f"({', '.join(quantized)}), which cannot be sliced or differentiated: patch, "
                f"mask, prune and score the float model, then quantize it")


def _carry_backend_gates(replaced: nn.Module, sparse: SparseAttention) -> None:
    """Gates that the "sparsebert" attention backend attached to the replaced self-attention
    module (set_masks, set_zero_gate_grad) carry over to its SparseAttention."""
    gate = getattr(replaced, "head_gate", None)
    if isinstance(gate, torch.Tensor):
        if gate.shape != sparse.head_gate.shape:
            raise ValueError(
                f"patch: the attention backend's head_gate {tuple(gate.shape)} does not match "
                f"the layer's {sparse.num_heads} heads"
            )
        with torch.no_grad():
            sparse.head_gate.copy_(gate)
        if not bool(gate.any()):
            warnings.warn(
                "patch: a layer whose head gates are all 0 on the attention backend (which still "
                "adds the output projection's bias) now follows the paper's convention: the "
                "block adds nothing, bias included, so that layer's outputs change",
                stacklevel=4)
    sparse.exact_zero_gate_grad = bool(getattr(replaced, "exact_zero_gate_grad", False))


def _attention_dropout(projections: nn.Module, model: nn.Module,
                       row: ModelStructure) -> nn.Dropout | float:
    """The block's own dropout module on the attention probabilities (kept: its p stays live),
    else the config's rate."""
    module = getattr(projections, row.attention_layout.attention_dropout, None)
    if isinstance(module, nn.Dropout):
        return module
    return float(getattr(model.config, row.config.attention_dropout, 0.0))


def _patch_layer(layer: nn.Module, model: nn.Module, row: ModelStructure) -> None:
    """Step 1: attention block -> SparseAttention; Step 2: FFN -> attached SparseMLP."""
    lay = row.attention_layout
    block = getattr(layer, row.attention)
    if not isinstance(block, SparseAttention):
        projections, output = getattr(block, lay.self_attention), getattr(block, lay.output)
        sparse = SparseAttention.from_modules(
            query=getattr(projections, lay.query),
            key=getattr(projections, lay.key),
            value=getattr(projections, lay.value),
            dense=getattr(output, lay.output_dense),
            layer_norm=getattr(output, lay.output_layer_norm),
            dropout=getattr(output, lay.output_dropout),
            num_heads=config_size(model, row, "num_heads"),
            attention_dropout=_attention_dropout(projections, model, row),
            layout=lay,
        )
        sparse.train(block.training)
        _carry_backend_gates(projections, sparse)
        setattr(layer, row.attention, sparse)
    if not isinstance(getattr(layer, MLP_ATTR, None), SparseMLP):
        mlp = SparseMLP.attach(layer, layout=row.mlp_layout)
        mlp.train(layer.training)
        setattr(layer, MLP_ATTR, mlp)  # registered: .to(), .train(), state moves reach the gates
        setattr(layer, row.ffn_entry, _FFNEntry(mlp))  # instance attribute shadows the method


_ATTENTIONS_WARNING = (
    "patched layers never form attention probabilities: config.output_attentions=True returns no "
    "attention weights for them (run an unpatched copy with attn_implementation='eager' to get "
    "them)"
)


def _warn_output_attentions(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a patched model: config.output_attentions=True (which transformers
    does not pass down to the layers, so SparseAttention cannot see it) warns as the call
    argument does."""
    if kwargs.get("output_attentions") is None and getattr(model.config, "output_attentions",
                                                           False):
        warnings.warn(_ATTENTIONS_WARNING, stacklevel=3)


def patch(model: nn.Module) -> nn.Module:
    """Swap gated SparseAttention / SparseMLP blocks into a HF model in place; returns it.

    Supported model types: see `sparsebert.hf.structure.STRUCTURES` (bert, roberta, ...).
    Idempotent. Gates start at 1 (set them with `sparsebert.set_masks`), except on a model that
    runs on the "sparsebert" attention backend, whose head gates (and set_zero_gate_grad choice)
    carry over.
    """
    row = structure_for(model)
    _check_config(model, row)
    if not encoder_layers(model, row):
        raise ValueError(f"patch: the {type(model).__name__} has no encoder layers "
                         f"(num_hidden_layers 0): nothing to gate or prune")
    # Gate buffers made as ordinary tensors even under torch.inference_mode (inference tensors
    # have no version counter, which tells the blocks and accelerate that a gate changed).
    _check_layers(encoder_layers(model, row))
    with torch.inference_mode(False):
        for layer in encoder_layers(model, row):
            _patch_layer(layer, model, row)
    if _warn_output_attentions not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_warn_output_attentions, with_kwargs=True)
    watch_checkpointing(model, [attention for attention, _ in sparse_blocks(model)])
    return model


def is_patched(model: nn.Module) -> bool:
    """True when every encoder layer of a supported HF model carries the sparse blocks."""
    try:
        row = structure_for(model)
        layers = encoder_layers(model, row)
    except (TypeError, ValueError, AttributeError):
        return False
    return len(layers) > 0 and all(
        isinstance(getattr(layer, row.attention), SparseAttention)
        and isinstance(getattr(layer, MLP_ATTR, None), SparseMLP)
        for layer in layers
    )


def sparse_blocks(model: nn.Module) -> list[tuple[SparseAttention, SparseMLP]]:
    """[(attention, mlp)] per encoder layer of a patched model, in layer order.

    The entry point for code that reads or drives gates (masks, importance, surgery).
    Raises ValueError naming the fix if the model is not patched.
    """
    row = structure_for(model)
    if not is_patched(model):
        raise ValueError(
            f"{type(model).__name__} is not patched: call sparsebert.patch(model) first"
        )
    return [
        (getattr(layer, row.attention), getattr(layer, MLP_ATTR))
        for layer in encoder_layers(model, row)
    ]
