"""Gate overrides that gradient checkpointing replays.

With Hugging Face gradient checkpointing, a checkpointed layer keeps no activations: the
backward pass calls the layer's function again. An override of its gates (a module attribute:
`head_gate_override`, and `head_gate_live` on patched modules) may have begun, ended or been
replaced by another by then, so the recomputation would use other gates than the forward did,
and the gradients would be wrong.

`watch_checkpointing(model, gated)` (called by `patch`, `use_sparse_attention` and every
`override_head_gates` block) gives each layer of `model` that can checkpoint (it has
transformers' `gradient_checkpointing` flag) and holds gated modules a forward pre-hook, and
`model` and its base model one for all of them, once (transformers before 5.2x reads the
function inside the layer's `__call__`, before the layer's hooks run). When a layer
checkpoints (the flag on, in training, with gradients), the hooks make sure its
`_gradient_checkpointing_func` (which transformers' layers call as `func(function, *args)`)
is a `ReplayingCheckpoint`: every call reads the gate attributes of the
layer's gated modules and hands the checkpoint a function that sets them to those values while
it runs, the forward and its recomputation alike, inside an override block or outside any. The
wrapper stays (turning checkpointing on again replaces it, and the next forward wraps the new
function), so torch.compile sees one object; while it traces, the wrapper calls the function as
is (the traced graph holds the forward's gates itself). Pickles and deep copies of the model
replay their own modules.

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
GATE_ATTRIBUTES = ("head_gate_override", "head_gate_live")  # those a module has are replayed
_LOCK = threading.Lock()  # installing wrappers
# model -> (ids of its gated modules, [weak references to its layers that can checkpoint and
# hold gated modules]), found once per set of gated modules (patching or pruning replaces them)
_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _gate_state(layer: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """The gated modules inside `layer`, each with the gate attributes it has."""
    state = []
    for module in layer.modules():
        names = tuple(name for name in GATE_ATTRIBUTES if name in module.__dict__)
        if names:
            state.append((module, names))
    return state


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


class ReplayingCheckpoint:
    """A layer's checkpointing function `inner` that makes it replay the gate attributes of the
    gated modules `gated` ((module, attribute names) pairs) as they were when the layer's
    forward called it."""

    def __init__(self, inner: Callable, gated: list[tuple[nn.Module, tuple[str, ...]]]):
        self.inner, self.gated = inner, gated

    def __call__(self, function: Callable, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.inner(function, *args, **kwargs)
        state = [(module, {name: getattr(module, name) for name in names})
                 for module, names in self.gated]
        return self.inner(_with_attributes(function, state), *args, **kwargs)

    def __reduce__(self):  # pickled with the modules of the same pickle (memoised there)
        return ReplayingCheckpoint, (self.inner, self.gated)

    def __deepcopy__(self, memo):  # a copy of the model replays the copy's modules
        return ReplayingCheckpoint(copy.deepcopy(self.inner, memo),
                                   copy.deepcopy(self.gated, memo))


def _checkpoints(layer: nn.Module) -> bool:
    """Whether transformers checkpoints the layer's forward now."""
    return bool(getattr(layer, "gradient_checkpointing", False) and layer.training
                and torch.is_grad_enabled() and callable(layer.__dict__.get(CHECKPOINT_FUNC)))


def _ensure_replaying(layer: nn.Module) -> None:
    """A layer about to checkpoint gets a ReplayingCheckpoint around its checkpointing function,
    for the gated modules it holds now (wrapped again when they changed: patched or pruned
    since)."""
    if not _checkpoints(layer):
        return
    state = _gate_state(layer)
    with _LOCK:
        current = layer.__dict__[CHECKPOINT_FUNC]
        if isinstance(current, ReplayingCheckpoint):
            if current.gated == state:
                return
            current = current.inner
        setattr(layer, CHECKPOINT_FUNC, ReplayingCheckpoint(current, state))


def replay_before_forward(layer: nn.Module, args) -> None:
    """Forward pre-hook of a layer that can checkpoint (transformers reads the checkpointing
    function after the hooks, from 5.2x; before, inside `__call__`, hence the model's hook)."""
    if not torch.compiler.is_compiling():
        _ensure_replaying(layer)


def replay_layers_before_forward(model: nn.Module, args) -> None:
    """Forward pre-hook of the model and its base model: each of the layers below it (found by
    watch_checkpointing, or here on a copy's first forward)."""
    if torch.compiler.is_compiling():
        return
    cached = _LAYERS.get(model)
    layers = [ref() for ref in cached[1]] if cached is not None else None
    if layers is None or any(layer is None for layer in layers):
        gated = [module for module in model.modules()
                 if any(name in module.__dict__ for name in GATE_ATTRIBUTES)]
        layers = _layers(model, gated)
    for layer in layers:
        _ensure_replaying(layer)


def _layers(model: nn.Module, gated: Sequence[nn.Module]) -> list[nn.Module]:
    """Modules of `model` that can checkpoint (they have a `gradient_checkpointing` flag) and
    hold some of the `gated` modules; found once per set of gated modules."""
    key = tuple(id(module) for module in gated)
    cached = _LAYERS.get(model)
    if cached is not None and cached[0] == key:
        layers = [ref() for ref in cached[1]]
        if all(layer is not None for layer in layers):
            return layers
    ids = set(key)
    layers = [owner for owner in model.modules() if hasattr(owner, "gradient_checkpointing")
              and any(id(module) in ids for module in owner.modules())]
    _LAYERS[model] = (key, [weakref.ref(layer) for layer in layers])  # (weak: the model may be
    return layers                                                      # one of its own layers)


def watch_checkpointing(model: nn.Module, gated: Sequence[nn.Module]) -> bool:
    """Gives each layer of `model` that can checkpoint and holds `gated` modules the forward
    pre-hook `replay_before_forward`, and `model` `replay_layers_before_forward`, once (see the
    module docstring); returns whether any of the layers checkpoints now."""
    layers = _layers(model, gated)
    base = getattr(model, "base_model", model)  # (called directly too: model.bert(...))
    tops = [model] if base is model or not isinstance(base, nn.Module) else [model, base]
    for top in tops[1:]:
        _layers(top, gated)
    for module, hook in [(layer, replay_before_forward) for layer in layers] + [
            (top, replay_layers_before_forward) for top in tops]:
        if hook not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(hook)
    return any(map(_checkpoints, layers))
