"""Knowing cheaply, on every call, whether a layer's compact weights are stale.

`LayerWatch.of(attn, mlp)` records, for one layer, every place the compact weights were read from:
each gate buffer, Linear weight/bias and LayerNorm (module, weight and bias) along its attribute
path (the dict slot that holds it: a module's _parameters, _buffers or _modules) and each tensor's
storage pointer and in-place version counter. `valid()` is True while all of them are unchanged; it
fails after set_masks / optimizer steps / copy_ (version counters), `.to()` (new storage, told
apart from the old even at the same address), a
replaced Parameter or module, or physical pruning (replaced Linear modules). Plain dict lookups
instead of nn.Module attribute access keep it to a few microseconds per layer, which matters under
CUDA-graph replay. Writes through `tensor.data` bypass version counters: invalidate explicitly after
those. Inference tensors (made or converted under torch.inference_mode) have no version counter: a
layer holding one is never known unchanged, so its compact weights are rebuilt on every call
(correct, slower; a warning says so once). Fused optimizer kernels (AdamW(fused=True), as
sparsebert.train uses) write parameters without moving their version counters either, so while a
watch exists every optimizer step moves them (`sparsebert.nn.optimizer_steps`: a global
torch.optim step post-hook, registered once).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from sparsebert.nn import SparseAttention, SparseMLP
from sparsebert.nn.common import in_shared_memory
from sparsebert.nn.optimizer_steps import watch_optimizer_steps

_warned_inference: list[bool] = []  # the inference-tensor warning, once per process
_warned_shared: list[bool] = []  # the shared-memory warning, once per process

INFERENCE_TENSORS_WARNING = (
    "sparsebert.accelerate: the model's gates or weights are inference tensors (made or "
    "converted under torch.inference_mode), which have no version counter, so the compact "
    "weights are rebuilt on every call; create, patch or convert the model outside "
    "inference_mode (calling it inside is fine) to keep them")

SHARED_TENSORS_WARNING = (
    "sparsebert.accelerate: the model's gates or weights are in shared memory "
    "(share_memory()), where another process's writes move no version counter, so the compact "
    "weights are rebuilt on every call; accelerate a copy (copy.deepcopy(model)) to keep them")


def _slot(owner: object, name: str) -> dict:
    """The dict that holds attribute `name` of `owner` (what getattr would read)."""
    state = owner.__dict__
    for table in ("_parameters", "_buffers", "_modules"):
        slots = state.get(table)
        if slots is not None and name in slots:
            return slots
    return state


@dataclass
class LayerWatch:
    """What one layer's compact weights were built from (see the module docstring)."""

    slots: list[tuple[dict, str, object]]  # (dict, key, the object it held)
    # (tensor, version or None, data_ptr, its storage (weakly)): a `.to()` round trip (half,
    # then float) gives a parameter new storage that the caching allocator may put at the old
    # address, with no version change; the storage object itself tells them apart
    tensors: list[tuple[Tensor, int | None, int, weakref.ref]]

    @classmethod
    def of(cls, attn: SparseAttention, mlp: SparseMLP) -> LayerWatch:
        watch_optimizer_steps()
        lay_a, lay_m = attn.layout, mlp.layout
        owner = mlp.host if mlp.host is not None else mlp
        paths: list[tuple[nn.Module, Sequence[str]]] = [(attn, ["head_gate"]),
                                                         (mlp, ["mlp_gate"]),
                                                         (mlp, ["neuron_gate"])]
        for name in (lay_a.query, lay_a.key, lay_a.value):
            paths += [(attn, [lay_a.self_attention, name, p]) for p in ("weight", "bias")]
        paths += [(attn, [lay_a.output, lay_a.output_dense, p]) for p in ("weight", "bias")]
        # LayerNorms: the module and its parameters (a replaced Parameter moves the storage a
        # captured CUDA graph reads)
        paths += [(attn, [lay_a.output, lay_a.output_layer_norm, p]) for p in ("weight", "bias")]
        for block, name in ((lay_m.intermediate, lay_m.intermediate_dense),
                            (lay_m.output, lay_m.output_dense)):
            paths += [(owner, [block, name, p]) for p in ("weight", "bias")]
        paths.append((owner, [lay_m.intermediate, lay_m.activation]))
        paths += [(owner, [lay_m.output, lay_m.output_layer_norm, p]) for p in ("weight", "bias")]
        slots: dict[tuple[int, str], tuple[dict, str, object]] = {}
        tensors: list[tuple[Tensor, int | None, int, weakref.ref]] = []
        for root, names in paths:
            node: object = root
            for name in names:
                if node is None:  # a removed part (pruned away): its None slot is watched
                    break
                table = _slot(node, name)
                node = table.get(name)
                slots[(id(table), name)] = (table, name, node)
            if isinstance(node, Tensor):
                # None: no counter to trust (an inference tensor has none; another process's
                # writes to shared memory move none here): rebuilt on every call
                version = (None if node.is_inference() or in_shared_memory(node)
                           else node._version)
                tensors.append((node, version, node.data_ptr(),
                                weakref.ref(node.untyped_storage())))
        untracked = [tensor for tensor, version, _, _ in tensors if version is None]
        if any(t.is_inference() for t in untracked) and not _warned_inference:
            _warned_inference.append(True)
            warnings.warn(INFERENCE_TENSORS_WARNING, stacklevel=4)
        if any(in_shared_memory(t) for t in untracked) and not _warned_shared:
            _warned_shared.append(True)
            warnings.warn(SHARED_TENSORS_WARNING, stacklevel=4)
        return cls(list(slots.values()), tensors)

    def valid(self) -> bool:
        """True while every watched slot holds the same object and every tensor is unchanged."""
        for table, name, obj in self.slots:
            if table.get(name) is not obj:
                return False
        for tensor, version, pointer, storage in self.tensors:
            if (version is None or tensor._version != version or tensor.data_ptr() != pointer
                    or storage() is not tensor.untyped_storage()):
                return False
        return True
