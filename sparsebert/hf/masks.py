"""Set and read the gates of a patched model as whole-model masks.

Masks are always in the original (unpruned) numbering: head_mask (L, H), mlp_mask (L,) for whole
MLPs (as in the paper) and neuron_mask (L, F) for FFN neurons, with L, H, F from the config.
1 = keep, 0 = pruned, values in between are soft gates. On a physically pruned model the entries
of removed heads/neurons read 0, and setting them to anything but 0 is an error.

Models that run the "sparsebert" attention backend (attn_implementation="sparsebert", any
architecture whose attention uses transformers' AttentionInterface) have head gates only:
head_mask (L, H) with L = the attention modules `sparsebert.hf.attention_modules` lists, in
order: the self-attention modules, and for encoder-decoder models whose attention class serves
both (BART, T5) each decoder layer's cross-attention too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from sparsebert.errors import SparsebertError
from sparsebert.hf.head_gates import (
    attach_head_gates,
    attention_modules,
    num_heads,
    shared_modules_note,
    uses_sparse_attention,
)
from sparsebert.hf.patching import is_patched, sparse_blocks
from sparsebert.hf.structure import config_size, structure_for


class MaskError(SparsebertError):
    """A mask of the wrong shape, with values outside [0, 1], or for gates the model lacks."""


def _as_mask(name: str, value, allowed: dict[str, tuple[int, ...]]) -> tuple[str, Tensor]:
    """Validate one mask; returns (which allowed shape matched, fp32 CPU tensor).

    allowed: {label: shape}. Raises TypeError (type/dtype) or ValueError (shape/values).
    """
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"'{name}' must be a torch.Tensor or numpy array, got {type(value).__name__}"
        )
    if not (value.dtype == torch.bool or value.is_floating_point()):
        raise TypeError(
            f"'{name}' must be floating point (1 = keep, 0 = pruned, fractions = soft gates) or "
            f"bool, got {value.dtype}"
        )
    shape = tuple(value.shape)
    matches = [label for label, expected in allowed.items() if shape == expected]
    if not matches:
        wanted = " or ".join(f"{label} {expected}" for label, expected in allowed.items())
        raise MaskError(f"'{name}' must have shape {wanted}, got {shape}")
    mask = value.detach().to(device="cpu", dtype=torch.float32)
    if bool(torch.isnan(mask).any()) or bool((mask < 0).any()) or bool((mask > 1).any()):
        bad = mask[torch.isnan(mask) | (mask < 0) | (mask > 1)]
        raise MaskError(f"'{name}' values must lie in [0, 1]; found {bad[:5].tolist()}")
    return matches[0], mask


def _check_removed(name: str, mask: Tensor, kept_ids: list[list[int]], what: str) -> None:
    """Entries of physically removed heads/neurons must be 0. mask: (L, N)."""
    for layer, ids in enumerate(kept_ids):
        removed = torch.ones(mask.shape[1], dtype=torch.bool)
        removed[ids] = False
        row = mask[layer]  # (N,)
        if bool((row[removed] != 0).any()):
            index = int(torch.nonzero(removed & (row != 0))[0])
            raise MaskError(
                f"'{name}' sets layer {layer} {what} {index} to {float(row[index])}, but it was "
                "removed by sparsebert.prune (removed entries must be 0)"
            )


def _backend_model(model: nn.Module) -> bool:
    """True for a model on the "sparsebert" attention backend (and not patched: patched blocks
    replace the attention modules the backend would gate)."""
    return uses_sparse_attention(model) and not is_patched(model)


def _set_backend_head_gates(model: nn.Module, head_mask, mlp_mask, neuron_mask) -> None:
    """set_masks for the attention backend: head gates of every self-attention module."""
    for name, value in (("mlp_mask", mlp_mask), ("neuron_mask", neuron_mask)):
        if value is not None:
            raise MaskError(
                f"'{name}': a model on attn_implementation='sparsebert' has head gates only; "
                "for MLP and neuron gates use sparsebert.patch(model) (BERT-family models)"
            )
    modules = attention_modules(model)
    heads = None
    if head_mask is not None:
        try:
            _, heads = _as_mask("head_mask", head_mask,
                                {"(L, H) =": (len(modules), num_heads(model))})
        except MaskError as error:
            raise MaskError(f"{error}{shared_modules_note(model, modules)}") from None
    modules = attach_head_gates(model)  # gates at 1 where missing: outputs unchanged
    if heads is None:
        return
    with torch.no_grad():
        for layer, module in enumerate(modules):
            _write_gate(module, "head_gate", heads[layer])


def _write_gate(module: nn.Module, name: str, values: Tensor) -> None:
    """module.<name>.copy_(values). A gate that a cast under torch.inference_mode made an
    inference tensor takes no in-place write outside that mode: an ordinary copy of it takes its
    place first (the blocks see another tensor and read it afresh)."""
    gate = getattr(module, name)
    if gate.is_inference() and not torch.is_inference_mode_enabled():
        copy = gate.clone()  # (outside inference mode: an ordinary tensor)
        if isinstance(gate, nn.Parameter):  # a gate made trainable stays a parameter
            copy = nn.Parameter(copy, requires_grad=gate.requires_grad)
        setattr(module, name, copy)
        gate = copy
    gate.copy_(values)


def set_masks(
    model: nn.Module,
    head_mask: Tensor | np.ndarray | None = None,
    mlp_mask: Tensor | np.ndarray | None = None,
    neuron_mask: Tensor | np.ndarray | None = None,
) -> None:
    """Write masks into the gates of a patched model (None = leave that gate unchanged).

    head_mask: (L, H); mlp_mask: (L,) whole MLPs, or (L, F) FFN neurons (same as neuron_mask);
    neuron_mask: (L, F). float or bool, values in [0, 1]. Everything is validated before any gate
    is written, so a bad mask changes nothing.

    On a model loaded with attn_implementation="sparsebert" (or `use_sparse_attention`), only
    head_mask applies, with L = the modules `sparsebert.hf.attention_modules(model)` lists (for
    BART/T5 the decoder's cross-attention too); gates are attached on first use.
    """
    if _backend_model(model):
        _set_backend_head_gates(model, head_mask, mlp_mask, neuron_mask)
        return
    blocks = sparse_blocks(model)  # raises if not patched / unsupported
    row = structure_for(model)
    n_layers, n_heads = len(blocks), config_size(model, row, "num_heads")
    n_neurons = config_size(model, row, "intermediate_size")
    # Step 1: validate everything.
    heads = None
    if head_mask is not None:
        _, heads = _as_mask("head_mask", head_mask, {"(L, H) =": (n_layers, n_heads)})
        _check_removed("head_mask", heads, [attn.head_ids for attn, _ in blocks], "head")
    mlps = neurons = None
    neuron_name = "neuron_mask"
    if mlp_mask is not None:
        kind, mask = _as_mask(
            "mlp_mask", mlp_mask, {"(L,) =": (n_layers,), "(L, F) =": (n_layers, n_neurons)}
        )
        if kind == "(L,) =":
            mlps = mask
        else:
            if neuron_mask is not None:
                raise MaskError(
                    "pass neuron masks once: either mlp_mask of shape (L, F) or neuron_mask"
                )
            neurons, neuron_name = mask, "mlp_mask"
    if neuron_mask is not None:
        _, neurons = _as_mask("neuron_mask", neuron_mask, {"(L, F) =": (n_layers, n_neurons)})
    if neurons is not None:
        _check_removed(neuron_name, neurons, [mlp.neuron_ids for _, mlp in blocks], "neuron")
    if mlps is not None:
        for layer, (_, mlp) in enumerate(blocks):
            if mlp.intermediate_size == 0 and float(mlps[layer]) != 0:
                raise MaskError(
                    f"'mlp_mask' sets layer {layer} to {float(mlps[layer])}, but its MLP was "
                    "removed by sparsebert.prune (removed entries must be 0)"
                )
    # Step 2: write the gates (kept entries only, in each module's current numbering).
    with torch.no_grad():
        for layer, (attn, mlp) in enumerate(blocks):
            if heads is not None:
                _write_gate(attn, "head_gate", heads[layer, attn.head_ids])
            if mlps is not None:
                _write_gate(mlp, "mlp_gate", mlps[layer])
            if neurons is not None:
                _write_gate(mlp, "neuron_gate", neurons[layer, mlp.neuron_ids])


def set_zero_gate_grad(model: nn.Module, exact: bool = True) -> None:
    """Choose the head-gate gradient at a gate of exactly 0 for every attention module.

    exact=False (the default of every module): pruned heads cost nothing and their gate gradient
    is 0. exact=True: the true gradient, sum over positions of ctx . dout with ctx the head's
    ungated attention, computed in the backward only (for straight-through or movement-style
    gate learning: a pruned head can come back). Works on patched models and on models that run
    the "sparsebert" attention backend.
    """
    if not isinstance(exact, bool):
        raise TypeError(f"'exact' must be a bool, got {type(exact).__name__}")
    if _backend_model(model):
        modules = attach_head_gates(model)
    else:
        modules = [attn for attn, _ in sparse_blocks(model)]  # raises if not patched
    for module in modules:
        module.exact_zero_gate_grad = exact


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """The gates of a patched model as masks in the original numbering (fp32, CPU):
    {"head_mask": (L, H), "mlp_mask": (L,), "neuron_mask": (L, F)}; removed entries read 0.
    A model on the "sparsebert" attention backend has head gates only: {"head_mask": (L, H)}."""
    if _backend_model(model):
        modules = attach_head_gates(model)
        return {"head_mask": torch.stack([m.head_gate.detach().float().cpu() for m in modules])}
    blocks = sparse_blocks(model)
    row = structure_for(model)
    n_layers = len(blocks)
    heads = torch.zeros(n_layers, config_size(model, row, "num_heads"))
    mlps = torch.zeros(n_layers)
    neurons = torch.zeros(n_layers, config_size(model, row, "intermediate_size"))
    for layer, (attn, mlp) in enumerate(blocks):
        heads[layer, attn.head_ids] = attn.head_gate.detach().float().cpu()
        neurons[layer, mlp.neuron_ids] = mlp.neuron_gate.detach().float().cpu()
        mlps[layer] = mlp.mlp_gate.detach().float().cpu() if mlp.intermediate_size else 0.0
    return {"head_mask": heads, "mlp_mask": mlps, "neuron_mask": neurons}
