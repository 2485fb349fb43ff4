"""Optimizer steps made visible to version counters.

Caches of weights derived from parameters (the live heads' weight slices of a masked block, the
compact weights of `sparsebert.accelerate`) are keyed on the parameters' in-place version
counters. Fused optimizer kernels (`AdamW(fused=True)`, which sparsebert.train uses, fused SGD)
write parameters without moving those counters, so such a cache would keep serving the weights
of before the step. `watch_optimizer_steps()` registers, once per process, a global torch.optim
step post-hook that moves the counters of every parameter the optimizer holds after each step
(a loop over the counters, no data touched): the same as a foreach or for-loop step does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_hook: list[object] = []  # the step post-hook's handle, once registered


def _bump_parameter_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer step post-hook: move the version counters of the parameters it updated."""
    params = [p for group in optimizer.param_groups for p in group["params"]
              if isinstance(p, Tensor) and not p.is_inference()]
    if params:
        torch.autograd.graph.increment_version(params)


def watch_optimizer_steps() -> None:
    """Make every optimizer step visible to version counters, fused kernels included (once per
    process; cheap to call again)."""
    if not _optimizer_hook:
        _optimizer_hook.append(register_optimizer_step_post_hook(_bump_parameter_versions))
