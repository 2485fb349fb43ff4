"""Gate overrides that gradient checkpointing replays.

With Hugging Face gradient checkpointing, a checkpointed layer keeps no activations: the
backward pass calls the layer's function again. An override of its gates (a module attribute
such as `head_gate_override`) may have ended, or been replaced by another, by then, so the
recomputation would use other gates than the forward did, and the gradients would be wrong.

`replay_overrides(model, gated, names)` (called as an override block begins) finds the layers
of `model` that checkpoint now (`gradient_checkpointing` on, holding the
`_gradient_checkpointing_func` that transformers' layers call as `func(function, *args)`) and
gives each a `ReplayingCheckpoint` around that function, once: every call reads the attributes
`names` of the layer's gated modules and hands the checkpoint a function that sets them to
those values while it runs, the forward and its recomputation alike (outside any block it
replays "no override"). The wrapper stays, so that a function handed to the checkpoint inside a
block replays after it, whatever order blocks end in, and torch.compile sees one object (while
it traces, the wrapper calls the function as is: the traced graph holds the forward's gates
itself). Turning checkpointing on again replaces it (the next block wraps the new function);
checkpointing first turned on inside a block is not replayed: turn it on before. Pickles and
deep copies of the model hold the plain function.

A `torch.utils.checkpoint` call of a user's own, outside transformers' layers, is not seen.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from sparsebert.overrides import override_attributes

CHECKPOINT_FUNC = "_gradient_checkpointing_func"  # set on each layer by transformers
_LOCK = threading.Lock()  # finding layers and installing wrappers
# model -> (ids of its gated modules, [(layer that can checkpoint, gated modules inside)]): found
# once per set of gated modules (patching or pruning replaces them)
_CANDIDATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _candidates(model: nn.Module, gated: Sequence[nn.Module]
                ) -> list[tuple[nn.Module, tuple[nn.Module, ...]]]:
    """Modules of `model` that can checkpoint (they have a `gradient_checkpointing` flag) and
    hold gated modules, each with those modules."""
    key = tuple(id(module) for module in gated)
    cached = _CANDIDATES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    ids = set(key)
    found = []
    for owner in model.modules():
        if hasattr(owner, "gradient_checkpointing"):
            inside = tuple(module for module in owner.modules() if id(module) in ids)
            if inside:
                found.append((owner, inside))
    _CANDIDATES[model] = (key, found)
    return found


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


def _plain(function: Callable) -> Callable:
    return function


class ReplayingCheckpoint:
    """A layer's checkpointing function `inner` that makes it replay the attributes `names` of
    the gated modules as they were when the layer's forward called it."""

    def __init__(self, inner: Callable, gated: tuple[nn.Module, ...], names: tuple[str, ...]):
        self.inner, self.gated, self.names = inner, gated, names

    def __call__(self, function: Callable, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.inner(function, *args, **kwargs)
        state = [(module, {name: getattr(module, name) for name in self.names})
                 for module in self.gated]
        return self.inner(_with_attributes(function, state), *args, **kwargs)

    def __reduce__(self):  # a pickled model holds the plain function
        return _plain, (self.inner,)

    def __deepcopy__(self, memo):  # so does a copy (these modules are not the copy's)
        return copy.deepcopy(self.inner, memo)


def replay_overrides(model: nn.Module, gated: Sequence[nn.Module], names: Sequence[str]) -> bool:
    """Makes each layer of `model` that checkpoints now replay the attributes `names` of the
    `gated` modules inside it in its recomputation (see the module docstring); returns whether
    any layer checkpoints."""
    names = tuple(names)
    found = False
    with _LOCK:
        for owner, inside in _candidates(model, gated):
            current = owner.__dict__.get(CHECKPOINT_FUNC)
            if not getattr(owner, "gradient_checkpointing", False) or not callable(current):
                continue
            found = True
            if isinstance(current, ReplayingCheckpoint):
                if current.gated == inside and current.names == names:
                    continue
                current = current.inner
            setattr(owner, CHECKPOINT_FUNC, ReplayingCheckpoint(current, inside, names))
    return found
