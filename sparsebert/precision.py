"""Numerics of a forward: fp32, or bf16 autocast; passes that change no weight (an importance
pass, an evaluation) cast the linears' weights to bf16 once rather than on every batch.

    with weights_cast_once(model, "bf16", device):     # the whole pass
        for batch in batches:
            with autocast(device, "bf16"):             # each batch's forward
                logits = model(**batch).logits

bf16 autocast runs every matrix product with bf16 inputs (fp32 accumulation). It casts an fp32
weight to bf16 on every use; its cache of those casts lasts one autocast region and keeps only
weights that require grad, which an importance pass's frozen weights do not: every batch would
cast every weight and bias of every linear again (148 casts per batch on BERT-base's 74
linears). `bf16_linears` casts them once for the whole pass instead; the products see exactly
the values autocast would have made, so the results are bitwise the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")


def resolve(precision: str, device: torch.device | str) -> str:
    """"fp32" or "bf16": "auto" is bf16 on CUDA, fp32 elsewhere. Measured by CPU emulation on the
    default model (512 SST-2 sentences): bf16 keeps the head ranking (Spearman 0.9999 vs fp32,
    same bottom 18 and 36 heads); fp16 would need loss scaling, so it is not offered."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str, cache_enabled: bool = True):
    """The forward's context: bf16 autocast (matmul inputs in bf16, fp32 accumulation) for
    precision bf16 ("auto": on CUDA), else none: fp32, also inside a caller's own autocast
    region (switched off for the block). cache_enabled=False: no cache of weights' bf16 copies
    (a CUDA graph cannot capture it)."""
    device = torch.device(device)
    if resolve(precision, device) == "fp32":
        return outside_autocast(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          cache_enabled=cache_enabled)


def outside_autocast(device: torch.device | str):
    """A block that runs as outside any autocast region: a caller's own autocast on `device` is
    switched off for it (a backward taken in such a region would run its products in the
    region's dtype), else nothing changes."""
    device = torch.device(device)
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def bf16_linears(model: nn.Module) -> Iterator[int]:
    """Within the block, the fp32 weight and bias of every nn.Linear in `model` are replaced by
    bf16 copies that require no grad (a parameter shared by several linears gets one copy); the
    original Parameter objects are put back on exit, also on error. Yields the number of
    parameters replaced. For passes that change no weight, under bf16 autocast: the copies are
    what autocast would make on each use, and nothing trains them."""
    copies: dict[int, nn.Parameter] = {}  # id(original) -> its bf16 copy
    replaced: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        # Ordinary tensors even under torch.inference_mode (whose tensors have no version
        # counter, which caches of weight slices key on).
        with torch.no_grad(), torch.inference_mode(False):
            for module in model.modules():
                if not isinstance(module, nn.Linear):
                    continue
                for name in ("weight", "bias"):
                    param = module._parameters.get(name)
                    if param is None or param.dtype != torch.float32:
                        continue
                    copy = copies.get(id(param))
                    if copy is None:
                        copy = copies[id(param)] = nn.Parameter(param.to(torch.bfloat16),
                                                                requires_grad=False)
                    module._parameters[name] = copy
                    replaced.append((module, name, param))
        yield len(replaced)
    finally:
        for module, name, param in reversed(replaced):
            module._parameters[name] = param


def weights_cast_once(model: nn.Module, precision: str, device: torch.device):
    """The pass-wide part of `precision` for a pass that changes no weight: bf16_linears under
    bf16, else nothing. (The autocast region itself is entered per batch: `autocast`.)"""
    if resolve(precision, device) == "fp32":
        return contextlib.nullcontext(0)
    return bf16_linears(model)
