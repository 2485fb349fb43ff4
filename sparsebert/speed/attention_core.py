"""Attention over packed tokens: qkv (T_pad, 3, k, D) of the kept heads -> ctx (T_pad, k*D).

Three ways, one result (the softmax attention of each sequence over its own real tokens):
* `full`: every position computed: one SDPA call over (B, k, S, D) (with a key padding mask
  when the batch is padded and unpadding is off);
* `varlen`: CUDA with fp16/bf16 and torch's `varlen_attn` (FlashAttention over cumulative
  sequence lengths): no padding computed at all;
* `repad`: re-pad only around the attention core: scatter the packed q/k/v into a (B, L, ...)
  grid with L = the longest sequence rounded up to a multiple of 16 (not S), SDPA with a key
  padding mask, gather the real rows
  back. The linear layers, LayerNorms and FFN around it still see only the T real tokens.
`choose_core(device, dtype)` picks varlen where available, else repad. On the CPU, one SDPA call
per sequence (no grid, no mask) measured the same as repad with 1 thread and far slower with 2
threads on a busy machine (default model, 50% masked, B=16, S=128, uniform lengths: 157 vs 153 ms
and 1449 vs 522 ms); grouping sequences by length could save only attention FLOPs, 4*S*hidden
per token against 24*hidden^2 in the linear layers (about 6% at S=128), so neither is used.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsebert.speed.tokens import Packing

Core = Callable[[Tensor, Packing, float], Tensor]


def full_core(qkv: Tensor, packing: Packing, scale: float) -> Tensor:
    """qkv (B*S, 3, k, D), every position computed -> ctx (B*S, k*D); keys masked by
    packing.key_mask (B, S) when set (padded execution)."""
    batch, seq = packing.batch, packing.seq
    _, _, heads, dim = qkv.shape
    q, k, v = qkv.view(batch, seq, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B,k,S,D)
    mask = None if packing.key_mask is None else packing.key_mask[:, None, None, :]
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, k, S, D)
    return ctx.transpose(1, 2).reshape(batch * seq, heads * dim)


def repad_core(qkv: Tensor, packing: Packing, scale: float) -> Tensor:
    """qkv (T_pad, 3, k, D) packed -> ctx (T_pad, k*D), via a (B, L) grid, L = packing.grid_len
    (the longest sequence rounded up to a multiple of 16; from S for a CUDA graph's static
    packing)."""
    batch, length = packing.batch, packing.grid_len
    tokens, _, heads, dim = qkv.shape
    index, rows, rank, keys = packing.grid()
    # Step 1: scatter into the grid (the spare row takes a bucket's dummy slots).
    buffer = packing.grid_buffer(3 * heads * dim, qkv)  # (B*L [+1], 3*k*D)
    buffer.index_copy_(0, index, qkv.reshape(tokens, 3 * heads * dim))
    grid = buffer[: batch * length].view(batch, length, 3, heads, dim)
    q, k, v = grid.permute(2, 0, 3, 1, 4).unbind(0)  # (B, k, L, D)
    # Step 2: attention over each row's real keys.
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :], scale=scale)
    # Step 3: gather the packed rows back in one indexing op -> (T_pad, k, D), contiguous.
    return ctx.transpose(1, 2)[rows, rank].reshape(tokens, heads * dim)


@functools.cache
def _varlen() -> tuple[Callable | None, bool]:
    """(torch's varlen_attn or None, whether it takes `scale`). Imported on first use: the
    module pulls in torch._dynamo (about 1.5 s), which CPU-only users never need."""
    try:  # recent torch; older releases lack it, and their signature has no `scale` argument
        from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415
    except ImportError:  # pragma: no cover - depends on the torch build
        return None, False
    return varlen_attn, "scale" in inspect.signature(varlen_attn).parameters


def varlen_core(qkv: Tensor, packing: Packing, scale: float) -> Tensor:
    """qkv (T_pad, 3, k, D) packed -> ctx (T_pad, k*D) with FlashAttention varlen (CUDA); rows
    past cu_seqlens[-1] (a bucket's dummy slots) are left undefined and never read."""
    tokens, _, heads, dim = qkv.shape
    length = packing.max_len
    q, k, v = qkv.unbind(1)  # (T_pad, k, D) views, last dim contiguous
    cu = packing.cu_seqlens
    varlen_attn, takes_scale = _varlen()
    if takes_scale:
        out = varlen_attn(q, k, v, cu, cu, length, length, scale=scale)  # (T_pad, k, D)
    else:  # its default scale, D ** -0.5, is the only one choose_core sends here
        out = varlen_attn(q, k, v, cu, cu, length, length)
    return out.reshape(tokens, heads * dim)


def varlen_available(device: torch.device, dtype: torch.dtype, scale: float | None = None,
                     head_dim: int | None = None) -> bool:
    """torch's varlen attention runs here (CUDA, fp16/bf16, a torch build with it, and either a
    `scale` argument or the default scale D ** -0.5)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    varlen_attn, takes_scale = _varlen()
    if varlen_attn is None:
        return False
    return takes_scale or scale is None or head_dim is None or abs(
        scale - head_dim**-0.5) < 1e-12


def choose_core(device: torch.device, dtype: torch.dtype) -> Core:
    """The packed-attention implementation for padded batches on this device and dtype (every
    BERT-family layer scales by D ** -0.5, which any varlen_attn version applies)."""
    return varlen_core if varlen_available(device, dtype) else repad_core
