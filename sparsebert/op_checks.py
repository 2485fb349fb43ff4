"""Input checks of the sparsebert ops, with messages that name the argument and what was
expected (the native kernels check again, with terser messages).

    validate_masked_attention(q, k, v, head_gate, key_padding_mask, check_padding_rows)
        q, k, v (B, S, H, D) floating point; head_gate (H,) or (B, H); key_padding_mask (B, S)
        bool or None
    validate_kept_heads(kept_heads, q)     masked_attention_compact's (H_kept,) index
    reject_fully_padded_rows(key_padding_mask, q)  no fully padded row (reads the mask)
    attention_scale(op, scale, q)          the scores' scale as a float (default D ** -0.5)
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor

# The floating-point dtypes the kernels compute in (not fp8 or other float types).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def validate_masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_gate: Tensor,
    key_padding_mask: Tensor | None,
    check_padding_rows: bool = True,
) -> None:
    """Python-side checks with messages naming the argument (the kernels check again).

    check_padding_rows=False skips the one check that reads tensor values (a fully padded row
    in key_padding_mask), which on CUDA would synchronise the device.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"masked_attention: '{name}' must be a 4-d tensor (B, S, H, D), got {shape}"
            )
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"masked_attention: '{name}' must be {KERNEL_DTYPE_NAMES}, got {t.dtype}")
    batch, q_len, heads, head_dim = q.shape
    if head_dim < 1:
        raise ValueError(
            f"masked_attention: 'q' has head dim D = q.shape[-1] = {head_dim}; expected D >= 1 "
            f"(q is (B, S, H, D), got {tuple(q.shape)})"
        )
    sizes = (("q", "B", 0, batch), ("q", "S", 1, q_len), ("q", "H", 2, heads))
    for name, what, dim, size in (*sizes, ("k", "S", 1, k.shape[1])):
        if size < 1:
            raise ValueError(
                f"masked_attention: '{name}' has {what} = {name}.shape[{dim}] = {size}; expected "
                f"{what} >= 1 (q {tuple(q.shape)}, k {tuple(k.shape)})"
            )
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"masked_attention: 'k' must be (B={batch}, S, H={heads}, D={head_dim}) like q "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(
            f"masked_attention: 'v' must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(
                f"masked_attention: '{name}' must have q's dtype {q.dtype}, got {t.dtype}"
            )
        if t.device != q.device:
            raise ValueError(
                f"masked_attention: '{name}' must be on q's device {q.device}, got {t.device}"
            )
    if not isinstance(head_gate, Tensor):
        raise ValueError(
            "masked_attention: 'head_gate' must be a floating-point tensor (H,) or (B, H), got "
            f"{type(head_gate).__name__}"
        )
    if head_gate.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"masked_attention: 'head_gate' has dtype {head_gate.dtype}; expected a "
            f"{KERNEL_DTYPE_NAMES} gate (e.g. mask.float(): 1 = keep, 0 = pruned, "
            "fractions = soft gates)"
        )
    if head_gate.device != q.device:
        raise ValueError(
            f"masked_attention: 'head_gate' must be on q's device {q.device}, "
            f"got {head_gate.device}"
        )
    # (element by element: under torch.compile with dynamic shapes a tuple of symbolic sizes
    # never equals one of plain ints)
    if not ((head_gate.dim() == 1 and head_gate.shape[0] == heads) or (
            head_gate.dim() == 2 and head_gate.shape[0] == batch
            and head_gate.shape[1] == heads)):
        raise ValueError(
            f"masked_attention: 'head_gate' must have shape (H,) = ({heads},) or (B, H) = "
            f"({batch}, {heads}), got {tuple(head_gate.shape)}"
        )
    if key_padding_mask is None:
        return
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"masked_attention: 'key_padding_mask' must be bool (True = real token), got "
            f"{key_padding_mask.dtype}"
        )
    if tuple(key_padding_mask.shape) != (batch, k.shape[1]):
        raise ValueError(
            "masked_attention: 'key_padding_mask' must have shape "
            f"(B, S) = ({batch}, {k.shape[1]}), "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.device != q.device:
        raise ValueError(
            f"masked_attention: 'key_padding_mask' must be on q's device {q.device}, got "
            f"{key_padding_mask.device}"
        )
    if check_padding_rows:
        reject_fully_padded_rows(key_padding_mask, q)


def validate_kept_heads(kept_heads: Tensor, q: Tensor) -> None:
    """masked_attention_compact's index: 1-d int64/int32 on q's device (values unchecked)."""
    if kept_heads.dim() != 1 or kept_heads.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            "masked_attention_compact: 'kept_heads' must be a 1-d int64/int32 tensor, got "
            f"{kept_heads.dtype} {tuple(kept_heads.shape)}"
        )
    if kept_heads.device != q.device:
        raise ValueError(
            f"masked_attention_compact: 'kept_heads' must be on q's device {q.device}, got "
            f"{kept_heads.device}"
        )
    if q.dim() == 4 and kept_heads.shape[0] > q.shape[2]:
        raise ValueError(
            f"masked_attention_compact: 'kept_heads' must hold at most H = {q.shape[2]} "
            f"indices, got {kept_heads.shape[0]}"
        )


def _under_vmap() -> bool:
    """True inside torch.func.vmap (at any depth of transforms): tensor values cannot be read."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def reject_fully_padded_rows(key_padding_mask: Tensor, q: Tensor) -> None:
    """Reject a fully padded row of key_padding_mask (reads the mask: a device sync on CUDA).
    Skipped where values cannot be read (CUDA graph capture, torch.compile, torch.func.vmap,
    the meta device) and for malformed masks, which the shape/dtype checks reject with their
    own message."""
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        return
    if torch.compiler.is_compiling() or _under_vmap():  # (first: Dynamo cannot trace the
        return  # functorch stack _under_vmap reads)
    if key_padding_mask.device.type == "meta":  # shapes only: no values to read
        return
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and not bool(key_padding_mask.any(1).all()):
        raise ValueError(
            "masked_attention: 'key_padding_mask' has a fully padded row (no True); every row "
            "needs at least one real token"
        )


def attention_scale(op: str, scale, q: Tensor) -> float:
    """The scores' scale as a float: D ** -0.5 for None, else a finite real number (an int, a
    float, a numpy scalar or 0-d array, a one-element tensor that needs no grad; not a bool, a
    string or a complex number), or ValueError naming 'scale'. While torch.compile traces: a
    Python number as given (a scale that changes between calls is traced as a symbolic float,
    whose finiteness cannot be read), a tensor refused."""
    if scale is None:
        # D < 1 is rejected by the tensor checks with a message naming q's shape.
        return q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    if isinstance(scale, (torch.SymFloat, torch.SymInt)):
        return scale
    compiling = torch.compiler.is_compiling()
    if type(scale) is float and not compiling and math.isfinite(scale):  # the common case, fast
        return scale
    if isinstance(scale, Tensor):
        usable = (not compiling and not scale.requires_grad and scale.numel() == 1
                  and not scale.is_complex())
    else:
        usable = not isinstance(scale, (bool, str, bytes)) and not (
            isinstance(scale, numbers.Complex) and not isinstance(scale, numbers.Real))
    value = None
    if usable and compiling:  # (comparisons trace where math.isfinite and float() cannot)
        if -math.inf < scale < math.inf:
            return scale
    elif usable:
        with contextlib.suppress(TypeError, ValueError, RuntimeError, OverflowError):
            value = float(scale)
    if value is None or not math.isfinite(value):
        raise ValueError(f"{op}: 'scale' must be a finite real number (a Python float, or "
                         f"None for D ** -0.5), got {scale!r} ({type(scale).__name__})")
    return value
