"""Gate overrides that gradient checkpointing replays.

With Hugging Face gradient checkpointing, a checkpointed layer keeps no activations: the
backward pass calls the layer's function again. An override of its gates (a module attribute
such as `head_gate_override`) may have ended, or been replaced by another, by then, so the
recomputation would use other gates than the forward did, and the gradients would be wrong.

Within `replay_in_recomputation(model, gated, names)`, every module of `model` that checkpoints
(it holds the `_gradient_checkpointing_func` that transformers' layers call as
`func(function, *args)`) and contains a gated module gets a wrapper of that function: each call
reads the attributes `names` of its gated modules, and hands the checkpoint a function that sets
them to those values while it runs, the forward and its recomputation alike. The wrapper goes
when the block ends; functions handed to the checkpoint before then keep replaying.

A `torch.utils.checkpoint` call of a user's own, outside transformers' layers, is not seen.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

from torch import nn

from sparsebert.overrides import override_attributes

CHECKPOINT_FUNC = "_gradient_checkpointing_func"  # set on each layer by transformers


def _with_attributes(function: Callable, state: list[tuple[nn.Module, dict[str, object]]]
                     ) -> Callable:
    """`function` run with each module's attributes set to the saved values."""

    @functools.wraps(function)
    def replayed(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for module, values in state:
                stack.enter_context(override_attributes(module, **values))
            return function(*args, **kwargs)

    return replayed


def _replaying(checkpoint_func: Callable, gated: list[nn.Module], names: Sequence[str]
               ) -> Callable:
    """A checkpointing function that makes `checkpoint_func` replay the gated modules'
    attributes `names` as they were when the layer's forward called it."""

    @functools.wraps(checkpoint_func)
    def checkpoint_with_gates(function: Callable, *args, **kwargs):
        state = [(module, {name: getattr(module, name) for name in names}) for module in gated]
        return checkpoint_func(_with_attributes(function, state), *args, **kwargs)

    return checkpoint_with_gates


@contextlib.contextmanager
def replay_in_recomputation(model: nn.Module, gated: Sequence[nn.Module],
                            names: Sequence[str]) -> Iterator[None]:
    """Within the block, checkpointed layers of `model` recompute with the attributes `names`
    of the modules `gated` as their forward saw them (see the module docstring)."""
    gated_ids = {id(module) for module in gated}
    with contextlib.ExitStack() as stack:
        for owner in model.modules():
            checkpoint_func = owner.__dict__.get(CHECKPOINT_FUNC)
            if not callable(checkpoint_func):
                continue
            inside = [module for module in owner.modules() if id(module) in gated_ids]
            if inside:
                stack.enter_context(override_attributes(
                    owner, **{CHECKPOINT_FUNC: _replaying(checkpoint_func, inside, names)}))
        yield
