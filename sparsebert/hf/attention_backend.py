"""The "sparsebert" attention backend for transformers: gated attention for any Hugging Face model
whose attention modules call `ALL_ATTENTION_FUNCTIONS.get_interface(...)` (BERT, RoBERTa, XLM-R,
ELECTRA, DistilBERT, Llama, Qwen2, GPT-2, ... in transformers 5).

    model = AutoModel.from_pretrained(path, attn_implementation="sparsebert")
    sparsebert.set_masks(model, head_mask=head_mask)      # (L, H): 1 = keep, 0 = pruned

Importing sparsebert registers the backend, as soon as transformers loads, under
`attn_implementation="sparsebert"`: `sparsebert_attention_forward` in transformers'
AttentionInterface and `sparsebert_mask` (SDPA's masks) in its AttentionMaskInterface, so masks
reach the backend as SDPA's: None, or 4-d bool with True = attend; pure causal masks arrive as
None plus is_causal. The gates themselves (per layer, per head) live on the attention modules:
see sparsebert.hf.head_gates.

Per head h of a layer, the backend returns out[:, :, h] = gate[h] * attention_h, and:
* gate[h] == 0: head h is never computed (the op skips it, or it is left out of the gathered
  heads) and out[:, :, h] is exactly 0. Its gate gradient is 0 as well (d gate = 0 at gate 0,
  the sparsebert op's convention): pruned heads cost nothing, forward or backward.
* otherwise d out / d gate[h] = attention_h, so gates learn and importance scores flow.

Two attention cores:
1. The sparsebert masked-attention op (`sparsebert.ops.masked_attention`) when the mask is a
   padding mask (None, or a bool mask that repeats over heads and query rows, as
   `sparsebert_mask` builds it for bidirectional attention), no attention dropout is active and
   every query head has its own key/value head: encoders, and single-token decoding steps of
   multi-head models. The op skips gated-off heads itself.
2. Otherwise (causal, sliding-window or other 4-d masks, additive float masks, dropout in
   training, grouped-query attention): the active heads are gathered (key/value heads follow
   their query heads; none copied where every head is active, on CUDA only without a mask), run
   through torch SDPA with the same mask and causal rule as transformers' "sdpa" backend, gated,
   and scattered back next to exact zeros for the pruned heads.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention

from sparsebert.errors import SparsebertError
from sparsebert.hf.post_import import when_imported
from sparsebert.nn.attention import can_read_on_host, to_key_padding_mask
from sparsebert.nn.optimizer_steps import watch_optimizer_steps
from sparsebert.ops import masked_attention

ATTN_IMPLEMENTATION = "sparsebert"
"""The `attn_implementation` name of the backend."""

_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


class AttentionBackendError(SparsebertError):
    """A model, gate or call the sparsebert attention backend cannot handle."""


# --------------------------------------------------------------------------------------------
# Registration and the mask builder
# --------------------------------------------------------------------------------------------
def _register_function(modeling_utils) -> None:
    modeling_utils.AttentionInterface.register(ATTN_IMPLEMENTATION, sparsebert_attention_forward)


def _register_mask(masking_utils) -> None:
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparsebert_mask)


def register_attention_backend() -> None:
    """Register attn_implementation="sparsebert" now: `sparsebert_attention_forward` in
    transformers' AttentionInterface and `sparsebert_mask` in its AttentionMaskInterface (so
    models build masks for the backend). Idempotent."""
    import transformers.masking_utils  # noqa: PLC0415 (transformers is heavy)
    import transformers.modeling_utils  # noqa: PLC0415

    _register_function(transformers.modeling_utils)
    _register_mask(transformers.masking_utils)


@functools.cache
def register_on_import() -> None:
    """Register the backend as soon as transformers loads the two interfaces (at once if it
    already has), without importing transformers here: `import sparsebert` stays light. Called
    by sparsebert.hf on import; idempotent."""
    when_imported("transformers.modeling_utils", _register_function)
    when_imported("transformers.masking_utils", _register_mask)


def sparsebert_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    **kwargs,
) -> Tensor | None:
    """transformers AttentionMaskInterface function "sparsebert": SDPA's masks (`sdpa_mask`), except
    that a plain padding mask (bidirectional attention with a 2-d padding mask) comes as a
    (B, 1, Sq, Sk) bool view of the (B, 1, 1, Sk) key mask (stride 0 over queries): equal to
    SDPA's for SDPA, and recognisably the op's key padding mask for the backend."""
    from transformers.masking_utils import (  # noqa: PLC0415
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )

    mask_function = causal_mask_function if mask_function is None else mask_function
    padding_only = (
        mask_function is bidirectional_mask_function
        and attention_mask is not None
        and attention_mask.dim() == 2
        and local_size is None
        and not use_vmap
    )
    if not padding_only:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            allow_is_causal_skip=allow_is_causal_skip,
            allow_is_bidirectional_skip=allow_is_bidirectional_skip,
            use_vmap=use_vmap,
            **kwargs,
        )
    padding = prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)
    padding = padding[:, kv_offset : kv_offset + kv_length]  # (B, Sk), True = real token
    # Nothing masked: as sdpa_mask, no mask at all (a read on the host: skipped while
    # torch.compile traces or a CUDA graph is captured, as sdpa_mask does).
    if allow_is_bidirectional_skip and can_read_on_host() and bool(padding.all()):
        return None
    return padding[:, None, None, :].expand(batch_size, 1, q_length, kv_length)


@contextlib.contextmanager
def padding_masks_as_views(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs, the model's config names the "sparsebert" attention implementation,
    whose mask function gives a padding mask as a (B, 1, Sq, Sk) bool view of the (B, Sk) key
    mask (stride 0 over queries); restored on exit. Only the masks change: a patched model's
    attention modules do not go through transformers' attention interface. The CUDA-graph
    captures of patched models use it (importance(cuda_graph=True), CudaGraphStep with fixed
    gates): SDPA's mask function materialises (B, 1, S, S), which a capture cannot read, so the
    attention would run SDPA rather than the masked-attention kernels."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if config is None or previous == ATTN_IMPLEMENTATION:
        yield
        return
    register_attention_backend()
    config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous


# --------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------
def _module_gate(module: nn.Module, batch: int, heads: int) -> Tensor | None:
    """The gate in use: override, else buffer, else None (all ones). (H,) or (B, H)."""
    gate = getattr(module, "head_gate_override", None)
    if gate is None:
        gate = getattr(module, "head_gate", None)
    if gate is None:
        return None
    if tuple(gate.shape) not in ((heads,), (batch, heads)):
        raise AttentionBackendError(
            f"{type(module).__name__}: head gate has shape {tuple(gate.shape)}; expected (H,) = "
            f"({heads},) or (B, H) = ({batch}, {heads})"
        )
    return gate


def _active_heads(module: nn.Module, gate: Tensor) -> tuple[Tensor | None, bool]:
    """(indices (k,) of heads with a nonzero gate in any example, or None when all are active;
    whether every gate is exactly 1).

    On the CPU the gate is read on every call. On an accelerator reading it costs a device
    sync, so the answer is cached on the module until the gate changes: other memory or
    geometry (the cache holds a detached view, so the memory cannot be recycled for another
    tensor meanwhile) or an in-place write (the version counter, shared by views, moves). A
    write that bypasses the version counter (through `.data` or a NumPy view) is not seen
    there: change gates with set_masks, in-place ops on the gate itself or an optimizer step
    (sparsebert.nn.optimizer_steps).

    While torch.compile traces, nothing is read on the host (that would break the graph, or
    fail with fullgraph=True): every head is computed and gated (pruned heads still give exact
    zeros and a zero gate gradient, but cost their share)."""
    if torch.compiler.is_compiling():
        return None, False
    cached = getattr(module, "_sparsebert_active_heads", None)
    # (an inference tensor has no version counter: read every time, never cached)
    # (nor a torch.func-wrapped gate: it has no storage to compare)
    cacheable = (gate.device.type != "cpu" and not gate.is_inference()
                 and not torch._C._functorch.is_functorch_wrapped_tensor(gate))
    if (
        cacheable
        and cached is not None
        and cached[0].data_ptr() == gate.data_ptr()
        and cached[0].shape == gate.shape
        and cached[0].stride() == gate.stride()
        and cached[0].device == gate.device
        and cached[1] == gate._version
    ):
        return cached[2]
    values = gate.detach()
    nonzero = values != 0
    if nonzero.dim() == 2:
        nonzero = nonzero.any(dim=0)  # (B, H) -> (H,)
    active = None if bool(nonzero.all()) else torch.nonzero(nonzero).flatten()
    answer = (active, bool((values == 1).all()))
    if cacheable and not (active is not None and active.is_inference()):
        watch_optimizer_steps()  # a gate trained by a fused optimizer step moves no counter
        module._sparsebert_active_heads = (values, gate._version, answer)
    return answer


def _is_padding_mask(mask: Tensor | None) -> bool:
    """True for None or a bool (B, 1, Sq, Sk) mask that is the same for every query row (size 1 or
    stride 0 over Sq, as SDPA's mask builder expands a padding mask): the op's key padding form."""
    if mask is None:
        return True
    return (
        mask.dtype == torch.bool
        and mask.dim() == 4
        and mask.shape[1] == 1
        and (mask.shape[2] == 1 or mask.stride(2) == 0)
    )


def _gate_as(gate: Tensor, like: Tensor) -> Tensor:
    """(k,) or (B, k) gate -> (1|B, k, 1, 1) in like's dtype, to scale (B, k, S, D)."""
    g = gate.to(like.dtype)
    return g.view(1, -1, 1, 1) if g.dim() == 1 else g[:, :, None, None]


def _sdpa_active_heads(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    gate: Tensor | None,
    active: Tensor | None,
    dropout: float,
    scale: float,
    causal: bool,
    exact_zero_gate_grad: bool = False,
) -> Tensor:
    """General path. query (B, H, Sq, D), key (B, Hkv, Sk, D), value (B, Hkv, Sk, Dv) -> gated
    (B, H, Sq, Dv). exact_zero_gate_grad: plain gate * ctx (pass every head as active), so a
    gate at 0 gets its true gradient."""
    batch, heads, q_len, _ = query.shape
    head_dim = value.shape[-1]  # the output's: Dv
    groups = heads // key.shape[1]
    # Step 1: gather the active query heads and the key/value head of each (with every head
    # active, SDPA shares the key/value heads itself, as transformers' sdpa does: on CUDA only
    # without a mask).
    index = torch.arange(heads, device=query.device) if active is None else active  # (k,)
    kv_index = index // groups
    # (with a mask on CUDA SDPA falls back to its math kernel for shared heads: gathered there)
    gqa = active is None and groups > 1 and (mask is None or query.device.type == "cpu")
    if active is None and (groups == 1 or gqa):
        q, k, v = query, key, value
    else:
        q = query.index_select(1, index)  # (B, k, Sq, D)
        k, v = key.index_select(1, kv_index), value.index_select(1, kv_index)  # (B, k, Sk, D)
    if mask is not None and mask.dim() == 4 and mask.shape[1] == heads:
        mask = mask.index_select(1, index)  # per-head masks follow their heads
    if causal and k.shape[2] > q_len:  # as transformers' sdpa: an empty static cache's prefill
        k, v = k[:, :, :q_len], v[:, :, :q_len]
    # Step 2: attention over the active heads only.
    if index.numel() == 0:
        ctx = query.new_zeros(batch, 0, q_len, head_dim)
    else:
        extra = {"enable_gqa": True} if gqa else {}
        ctx = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=causal, **extra
        )  # (B, k, Sq, D)
    if gate is None:
        return ctx
    # Step 3: gate (exact zeros where a per-example gate is 0) and scatter next to zero heads.
    g = _gate_as(gate.index_select(-1, index), ctx)  # (1|B, k, 1, 1)
    if exact_zero_gate_grad:
        gated = ctx * g
    else:
        gated = torch.where(g != 0, ctx * g, torch.zeros((), dtype=ctx.dtype, device=ctx.device))
    if active is None:
        return gated
    out = ctx.new_zeros(gated.shape[0], heads, q_len, head_dim)
    return out.index_copy(1, index, gated)  # (B, H, Sq, D)


def sparsebert_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers AttentionInterface function "sparsebert": gated attention with `module`'s gates.

    query (B, H, Sq, D), key/value (B, Hkv, Sk, D) with H a multiple of Hkv (grouped-query
    attention); attention_mask None or 4-d (bool, True = attend, or additive float),
    (B|1, 1|H, Sq, Sk). Returns (out (B, Sq, H, D), None): out[:, :, h] = gate[h] * head h's
    attention, exactly 0 (and never computed) where gate[h] == 0. Differentiable in the gate:
    d out[:, :, h] / d gate[h] = head h's attention, and the gate gradient is 0 where gate[h] == 0
    (as the op's). Attention weights are never materialised. The causal rule is transformers'
    sdpa backend's: causal when Sq > 1, no mask is given and is_causal (else module.is_causal,
    default True) says so.
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise AttentionBackendError(
                f"attn_implementation='sparsebert' does not support the '{name}' argument of "
                f"{type(module).__name__}; use attn_implementation='eager' for this model"
            )
    if kwargs.get("head_mask") is not None:  # passed on by models that take **kwargs
        raise AttentionBackendError(
            "attn_implementation='sparsebert': head_mask is not applied by the backend; set "
            "the heads' gates with sparsebert.set_masks(model, head_mask=...) (per-example "
            "gates: sparsebert.hf.override_head_gates)"
        )
    if kwargs.get("output_attentions"):
        warnings.warn(
            "attn_implementation='sparsebert' computes no attention weights: "
            "output_attentions=True returns none (load the model with "
            "attn_implementation='eager' to get them)",
            stacklevel=2,
        )
    batch, heads, q_len, head_dim = query.shape
    if key.shape[1] < 1 or heads % key.shape[1]:
        raise AttentionBackendError(
            f"{type(module).__name__}: query heads {heads} are not a multiple of key/value heads "
            f"{key.shape[1]}"
        )
    gate = _module_gate(module, batch, heads)  # (H,), (B, H) or None
    scale = head_dim**-0.5 if scaling is None else float(scaling)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and is_causal)

    same_dims = value.shape[-1] == head_dim  # (the op's; e.g. DeepSeek's MLA differs)
    # Grouped-query attention takes the general path: the op would need each key/value head
    # repeated for its query heads, a copy of the layer's whole cache at every decoding step
    # (SDPA shares them; the general path gathers the active heads' only where it must).
    shared_kv = key.shape[1] != heads
    if (dropout == 0.0 and not causal and same_dims and not shared_kv
            and _is_padding_mask(attention_mask)):
        # Op path: (B, S, H, D) views.
        op_gate = query.new_ones(heads, dtype=torch.float32) if gate is None else gate
        if op_gate.dtype not in (torch.float32, torch.float64):
            op_gate = op_gate.float()
        key_padding_mask = to_key_padding_mask(  # (B, Sk); _is_padding_mask holds already (a
            attention_mask, batch, key.shape[2], known_padding=True)  # torch.compile traces it)
        out = masked_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            op_gate,
            key_padding_mask,
            scale,
            check_padding_rows=False,  # to_key_padding_mask leaves no row empty
            exact_zero_gate_grad=getattr(module, "exact_zero_gate_grad", False),
        )  # (B, Sq, H, D)
        return out, None

    active, unit = (None, True) if gate is None else _active_heads(module, gate)
    if unit and gate is not None and not gate.requires_grad:
        gate = None  # every gate is 1 and needs no gradient: plain attention, nothing to scale
    exact = (gate is not None and gate.requires_grad
             and getattr(module, "exact_zero_gate_grad", False))
    if exact:
        active = None  # gates at 0 need their heads' attention for the true gradient
    ctx = _sdpa_active_heads(
        query, key, value, attention_mask, gate, active, dropout, scale, causal, exact
    )  # (B, H, Sq, D)
    return ctx.transpose(1, 2).contiguous(), None
