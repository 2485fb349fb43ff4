"""Fixed 0/1 masks on individual weights (magnitude pruning), by parameter name.

`WeightMasks` holds (parameter, mask) pairs and keeps masked weights at exactly zero through
an optimizer step post-hook (never by patching optimizer.step). Masks travel as a
safetensors file of bool tensors keyed by parameter name, and have a fingerprint (sha256 of
names and bits) that run directories use as part of a run's identity.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from sparsebert.errors import SparsebertError


class WeightMaskError(SparsebertError):
    """A weight mask that does not fit its model (unknown name, wrong shape, unreadable file)."""


class WeightMasks:
    """Fixed 0/1 masks on parameters, enforced around optimizer steps.

    masks: (parameter, mask) pairs; each mask has the parameter's shape (bool or 0/1 float).
    `apply()` multiplies every parameter by its mask in place; `attach(optimizer)` masks the
    parameters' gradients and registers apply() as an optimizer step post-hook, so weights that
    start at zero stay exactly zero whatever AdamW's moments or weight decay do.
    """

    def __init__(self, masks: Sequence[tuple[nn.Parameter, torch.Tensor]],
                 names: Sequence[str] | None = None) -> None:
        """names: the parameters' names, for error messages (else masks are named by index)."""
        self.masks: list[tuple[nn.Parameter, torch.Tensor]] = []
        for i, (param, mask) in enumerate(masks):
            label = f"weight mask {names[i]!r}" if names is not None else f"weight mask {i}"
            if not isinstance(mask, torch.Tensor):
                raise WeightMaskError(f"{label}: expected a tensor, got {type(mask).__name__}")
            if tuple(mask.shape) != tuple(param.shape):
                raise WeightMaskError(f"{label}: shape {tuple(mask.shape)} does not match its "
                                      f"parameter {tuple(param.shape)}")
            _check_binary(mask, label)
            self.masks.append((param, mask.detach()))

    def __len__(self) -> int:
        return len(self.masks)

    @torch.no_grad()
    def apply(self) -> None:
        """param *= mask for every pair (mask cast to the parameter's device and dtype)."""
        for i, (param, mask) in enumerate(self.masks):
            if mask.device != param.device or mask.dtype != param.dtype:
                mask = mask.to(device=param.device, dtype=param.dtype)
                self.masks[i] = (param, mask)
            param.mul_(mask)

    def attach(self, optimizer: torch.optim.Optimizer) -> HookHandles:
        """Zero the masked weights now and after every optimizer.step(), and mask their
        gradients; returns the handles (remove() detaches both).

        Masking the gradients is what torch.nn.utils.prune's reparametrization (weight =
        weight_orig * mask, the authors' CustomFromMask) does: gradient clipping then sees the
        norm over the kept weights only, and AdamW's moments of masked weights stay zero.
        A frozen parameter (requires_grad=False) has no gradient to mask: it is zeroed only.
        """
        self.apply()  # also casts each mask to its parameter's device and dtype
        handles = [param.register_hook(functools.partial(_masked_grad, mask))
                   for param, mask in self.masks if param.requires_grad]
        handles.append(optimizer.register_step_post_hook(
            lambda _opt, _args, _kwargs: self.apply()))
        return HookHandles(handles)

    def named(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{parameter name in `model`: bool mask (CPU)}; every parameter must belong to model."""
        names = {id(p): name for name, p in model.named_parameters()}
        out = {}
        for param, mask in self.masks:
            if id(param) not in names:
                raise WeightMaskError("a weight mask's parameter is not a parameter of the model "
                                      "being trained (build masks from the same model object)")
            out[names[id(param)]] = mask.detach().to("cpu") != 0
        return out

    @classmethod
    def from_named(cls, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> WeightMasks:
        """Pairs for `model` from {parameter name: mask}; names and shapes are checked."""
        params = dict(model.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise WeightMaskError(f"weight masks name {len(unknown)} parameters the model does "
                                  f"not have (first: {unknown[0]!r})")
        return cls([(params[name], mask) for name, mask in masks.items()], names=list(masks))


class HookHandles:
    """Several hook handles removed together."""

    def __init__(self, handles: Sequence) -> None:
        self.handles = list(handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _masked_grad(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient with the masked entries zeroed (mask in the gradient's dtype)."""
    return grad * mask.to(device=grad.device, dtype=grad.dtype)


def _check_binary(mask: torch.Tensor, label: str) -> None:
    """A mask is bool or holds only 0 and 1: apply() runs after every optimizer step, so a 0.5
    would compound step after step and a NaN would spread."""
    if mask.dtype == torch.bool:
        return
    other = (mask != 0) & (mask != 1)
    if bool(other.any()):
        raise WeightMaskError(f"{label}: values must be 0 or 1 (or bool), found "
                              f"{mask[other].flatten()[0].item()}")


def mask_fingerprint(named: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, shapes and packed bits of {name: bool mask}."""
    digest = hashlib.sha256()
    for name in sorted(named):
        bits = named[name].detach().to("cpu").bool().flatten()
        digest.update(f"{name}:{tuple(named[name].shape)}:".encode())
        digest.update(bits.numpy().tobytes())
    return digest.hexdigest()


def mask_counts(named: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(kept, total) entries over all masks."""
    kept = sum(int(m.bool().sum()) for m in named.values())
    return kept, sum(m.numel() for m in named.values())


def save_weight_masks(path: str | os.PathLike, named: Mapping[str, torch.Tensor]) -> None:
    """{name: bool mask} to a safetensors file (bool tensors, 1 byte per entry), atomically."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from sparsebert.atomic import atomic_write_with  # noqa: PLC0415

    tensors = {name: m.detach().to("cpu").bool().contiguous() for name, m in named.items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp)))


def load_weight_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{name: bool mask} from save_weight_masks' file; a clear error if it is unreadable or its
    entries are not the bool 0/1 bytes it was written with (safetensors has no checksum: a
    damaged byte in the data would otherwise read as a kept entry)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(path)
    try:
        loaded = load_file(str(path))
    except Exception as error:  # safetensors raises several types for a damaged file
        raise WeightMaskError(f"{path}: not a readable weight-mask file ({error}); "
                              f"restore it or delete the run directory") from None
    for name, mask in loaded.items():
        if mask.dtype != torch.bool:
            raise WeightMaskError(f"{path}: damaged ({name!r} holds {mask.dtype}, a weight-mask "
                                  f"file holds bool masks); restore it or delete the run "
                                  f"directory")
        if mask.numel() and int(mask.view(torch.uint8).max()) > 1:
            raise WeightMaskError(f"{path}: damaged ({name!r} holds bytes other than 0 and 1); "
                                  f"restore it or delete the run directory")
    return dict(loaded)
