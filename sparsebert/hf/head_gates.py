"""Head gates of models on the "sparsebert" attention backend (sparsebert.hf.attention_backend).

Gates live on the self-attention modules that run their core through transformers'
AttentionInterface, one per layer, in model order (`attention_modules`):
* `module.head_gate` (H,) fp32 non-persistent buffer, H = config.num_attention_heads (query
  heads; with grouped-query attention a key/value head is shared by its group): attached by
  `use_sparse_attention` or the first `sparsebert.set_masks`; a module without it runs with every
  gate at 1. `sparsebert.set_masks(model, head_mask=(L, H))` writes them.
* `module.head_gate_override`: None, or an (H,) / per-example (B, H) tensor used instead of the
  buffer, e.g. a leaf with requires_grad (see `override_head_gates`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from sparsebert.hf.attention_backend import (
    ATTN_IMPLEMENTATION,
    AttentionBackendError,
    register_attention_backend,
)
from sparsebert.hf.checkpoint_replay import watch_checkpointing
from sparsebert.overrides import override_attributes

_INTERFACE_CALL = "ALL_ATTENTION_FUNCTIONS.get_interface("


@functools.cache
def _routes_through_interface(cls: type) -> bool:
    """True when cls.forward picks its attention core from transformers' AttentionInterface."""
    try:
        return _INTERFACE_CALL in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or (
        "CrossAttention" in type(module).__name__
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a model that run their core through AttentionInterface, in
    model (= layer) order; entry l holds the gates of row l of a (L, H) head mask. Modules
    that are cross-attention by class (`is_cross_attention`, "CrossAttention" in the name) are
    left out; encoder-decoder models whose attention class serves both (BART, T5) have their
    decoder's cross-attention modules listed too, each after its layer's self-attention.

    Raises AttentionBackendError when there is none (the model does not use the interface).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module (a Hugging Face model), got "
                        f"{type(model).__name__}")
    found = [
        m
        for m in model.modules()
        if _routes_through_interface(type(m)) and not _is_cross_attention(m)
    ]
    if not found:
        raise AttentionBackendError(
            f"'model' ({type(model).__name__}) has no attention module that uses transformers' "
            "AttentionInterface, so attn_implementation='sparsebert' cannot reach it; for BERT-"
            "family models use sparsebert.patch(model) instead"
        )
    return found


def shared_modules_note(model: nn.Module, modules: list[nn.Module]) -> str:
    """'' or, for a model with fewer attention modules than layers (ALBERT's layers run one
    shared module), what a row of its (L, H) head mask is: '; ...' to end an error about the
    mask's shape."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= len(modules):
        return ""
    return (f"; this model's {layers} layers share {len(modules)} attention module(s), so L "
            "counts the shared modules: a row gates its heads in every layer that runs it")


def uses_sparse_attention(model: nn.Module) -> bool:
    """True when the model's config selects attn_implementation="sparsebert"."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


def num_heads(model: nn.Module) -> int:
    """Query heads per layer, from the config (config.num_attention_heads or its alias)."""
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise AttentionBackendError(
            f"'model' ({type(model).__name__}) has no config.num_attention_heads; expected a "
            "Hugging Face PreTrainedModel"
        )
    return heads


_HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def module_heads(module: nn.Module) -> int | None:
    """The query heads an attention module computes, from its own attributes (num_heads,
    num_attention_heads, n_heads or n_head); None when it names none (e.g. Llama's, which
    take config.num_attention_heads)."""
    for name in _HEAD_COUNT_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _check_head_counts(model: nn.Module, modules: list[nn.Module], heads: int) -> None:
    """AttentionBackendError when an attention module computes another number of heads than
    `heads` (config.num_attention_heads)."""
    counts = [(m, module_heads(m)) for m in modules]
    other = [(m, count) for m, count in counts if count not in (None, heads)]
    if other:  # (module names looked up only for the message)
        names = {id(m): name for name, m in model.named_modules()}
        shown = ", ".join(f"{names[id(m)]}: {count}" for m, count in other[:4])
        more = ", ..." if len(other) > 4 else ""
        raise AttentionBackendError(
            f"'model' ({type(model).__name__}) has attention modules with another head count "
            f"than config.num_attention_heads = {heads} ({shown}{more}); head gates take one "
            "(L, H) mask, so models whose layers differ in head count are not supported"
        )


def attach_head_gates(model: nn.Module) -> list[nn.Module]:
    """Give every attention module of `model` a `head_gate` (H,) fp32 buffer of ones (kept where
    it already exists; made fp32 again after a cast of the model to fp16/bf16) and a
    `head_gate_override` attribute; returns the modules in layer order.
    AttentionBackendError when a module computes another number of heads than H (an
    encoder-decoder model whose encoder and decoder differ): a (L, H) head mask cannot
    describe it."""
    heads = num_heads(model)
    modules = attention_modules(model)
    _check_head_counts(model, modules, heads)
    for module in modules:
        gate = getattr(module, "head_gate", None)
        if not isinstance(gate, Tensor):
            param = next(module.parameters(), None)
            device = param.device if param is not None else None
            with torch.inference_mode(False):  # a normal tensor: set_masks writes it later
                ones = torch.ones(heads, device=device)
            module.register_buffer("head_gate", ones, persistent=False)
        elif tuple(gate.shape) != (heads,):
            raise AttentionBackendError(
                f"{type(module).__name__}.head_gate has shape {tuple(gate.shape)}; expected "
                f"(H,) = ({heads},) from config.num_attention_heads"
            )
        elif gate.is_inference() or (gate.is_floating_point() and gate.dtype.itemsize < 4):
            # the model was cast (its own modules' buffers follow it) to fp16/bf16, or under
            # inference mode: an ordinary fp32 (or fp64) tensor again, that set_masks can write
            # without rounding
            kept = gate.float() if gate.dtype.itemsize < 4 else gate
            with torch.inference_mode(False):
                module.register_buffer("head_gate", kept.clone(), persistent=False)
        if not hasattr(module, "head_gate_override"):
            module.head_gate_override = None
    return modules


def use_sparse_attention(model: nn.Module) -> nn.Module:
    """Switch a loaded Hugging Face model to attn_implementation="sparsebert" and attach gates at
    1 (same outputs as SDPA); returns the model. Set gates with `sparsebert.set_masks`.

    Same as loading with `attn_implementation="sparsebert"` (plus the gates, which set_masks
    would otherwise attach on first use). Raises AttentionBackendError for models whose attention
    does not go through transformers' AttentionInterface.
    """
    from transformers import PreTrainedModel  # noqa: PLC0415

    if not isinstance(model, PreTrainedModel):
        raise AttentionBackendError(
            f"'model' must be a transformers PreTrainedModel, got {type(model).__name__}"
        )
    # raises with the fix when the interface is not used, or when a (L, H) mask cannot fit
    _check_head_counts(model, attention_modules(model), num_heads(model))
    if not model._can_set_attn_implementation():
        raise AttentionBackendError(
            f"'model' ({type(model).__name__}) cannot switch its attention implementation; load "
            "it with attn_implementation='sparsebert' instead"
        )
    register_attention_backend()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if not uses_sparse_attention(model):
        raise AttentionBackendError(
            f"'model' ({type(model).__name__}) kept attn_implementation="
            f"{model.config._attn_implementation!r}; load it with attn_implementation='sparsebert'"
        )
    watch_checkpointing(model, attach_head_gates(model))
    return model


def _heads_of(gate: Tensor, head_ids: list[int], checkpointing: bool) -> Tensor:
    """gate (..., H) -> (..., len(head_ids)), the entries head_ids: gate itself when head_ids is
    every head in order; under gradient checkpointing by slices of consecutive ids, which save no
    tensors for backward, so the result can be differentiated through again and again, as a
    reentrant checkpoint of every forward that used it does (gate[..., head_ids] could not)."""
    if head_ids == list(range(gate.shape[-1])):
        return gate
    if not checkpointing:
        return gate[..., head_ids]
    runs: list[list[int]] = []  # [start, length] of each run of consecutive ids
    for head in head_ids:
        if runs and runs[-1][0] + runs[-1][1] == head:
            runs[-1][1] += 1
        else:
            runs.append([head, 1])
    if not runs:
        return gate.narrow(-1, 0, 0)
    return torch.cat([gate.narrow(-1, start, length) for start, length in runs], dim=-1)


@contextlib.contextmanager
def override_head_gates(model: nn.Module, gates: Tensor) -> Iterator[Tensor]:
    """Within the block, layer l uses gates[l] instead of its `head_gate` buffer.

    gates: (L, H), or per example (L, B, H); floating point, may require grad (its gradient is
    d loss / d gate, 0 at gates equal to 0). Yields `gates`. Works on models on the "sparsebert"
    attention backend and on patched models (there in the original head numbering: a layer
    whose heads were pruned reads the entries of its remaining heads). Under Hugging Face
    gradient checkpointing, a layer's recomputation in the backward pass uses the gates its
    forward used, even after the block has ended (sparsebert.hf.checkpoint_replay). A copy or
    pickle of a patched model made inside the block takes the model's own gates; on the
    backend, whose override is an attribute of transformers' attention modules, it keeps the
    block's (copy outside the block there).
    """
    from sparsebert.hf.patching import is_patched, sparse_blocks  # noqa: PLC0415 (cycle)

    patched = is_patched(model)
    if not patched and not uses_sparse_attention(model):
        inner = getattr(model, "module", None)  # DistributedDataParallel, DataParallel
        if isinstance(inner, nn.Module) and (is_patched(inner) or uses_sparse_attention(inner)):
            raise AttentionBackendError(
                f"override_head_gates: 'model' is a {type(model).__name__} wrapper; pass the "
                f"model it wraps ({type(model).__name__}.module), whose gates its forward uses")
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise AttentionBackendError(
            f"override_head_gates: 'model' ({type(model).__name__}) is neither patched nor on "
            f"attn_implementation='sparsebert' (it uses {impl!r}), so its attention would "
            "ignore the gates; call sparsebert.patch(model) (BERT-family models) or "
            "sparsebert.hf.use_sparse_attention(model) first"
        )
    modules = [attn for attn, _ in sparse_blocks(model)] if patched else attach_head_gates(model)
    heads = num_heads(model)
    if not isinstance(gates, Tensor) or not gates.is_floating_point():
        raise AttentionBackendError(
            f"'gates' must be a floating-point tensor (L, H) or (L, B, H), got "
            f"{type(gates).__name__}" + (f" {gates.dtype}" if isinstance(gates, Tensor) else "")
        )
    if gates.dim() not in (2, 3) or gates.shape[0] != len(modules) or gates.shape[-1] != heads:
        raise AttentionBackendError(
            f"'gates' must have shape (L, H) = ({len(modules)}, {heads}) or (L, B, H), got "
            f"{tuple(gates.shape)}{shared_modules_note(model, modules)}"
        )
    # checkpointed layers recompute with the gates their forward used, wherever backward runs
    checkpointing = watch_checkpointing(model, modules)
    with contextlib.ExitStack() as stack:
        for module, gate in zip(modules, gates, strict=True):
            stack.enter_context(
                module.override_head_gate(_heads_of(gate, module.head_ids, checkpointing))
                if patched else override_attributes(module, head_gate_override=gate))
        yield gates
