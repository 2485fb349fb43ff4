"""Helpers shared by SparseAttention and SparseMLP: child containers, gate checks, the
host-side all-zero test, whether a dropout draws random numbers, gate buffers summarised once per
change (and held fixed for a CUDA graph's capture) and kept fp32 through dtype casts, and
slicing a Linear for physical pruning; and `eval_mode`, which restores every submodule's
mode."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsebert.checks import is_finite_number, is_integer, is_number
from sparsebert.overrides import outside_blocks, override_attributes


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode; on exit (even on error) every submodule's own training flag is
    restored, so a part the caller had put in eval mode (frozen embeddings) stays so. Blocks on
    one model may overlap (evaluation in two threads): the flags return once every block has
    ended, in whatever order (sparsebert.overrides), not the eval mode of the block that ended
    last."""
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            stack.enter_context(override_attributes(module, training=False))
        yield model


class Container(nn.Module):
    """A parameter holder without a forward (keeps the HF child names, e.g. `self`, `output`)."""

    def __init__(self, **children: nn.Module | None) -> None:
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class GateBuffers(nn.Module):
    """An nn.Module whose gate buffers (the names in GATE_BUFFERS) keep at least fp32 through
    dtype casts of the module (.half(), .to(torch.bfloat16)), as a model patched after such a
    cast has them: soft gates are not rounded (a gate below fp16's range not made 0, a pruned
    head). Device moves, and casts to fp64, apply to them as to any buffer."""

    GATE_BUFFERS: tuple[str, ...] = ()
    # Attributes that `with` blocks override (gate overrides, the first-token readout): a copy
    # or pickle made inside such a block takes the module's own values, not the block's, which
    # no block would ever restore on the copy. (The training flag is left as every other
    # module's: a copy made in eval mode is in eval mode throughout.)
    BLOCK_ATTRIBUTES: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        return outside_blocks(self, super().__getstate__(), self.BLOCK_ATTRIBUTES)

    def _apply(self, fn, recurse=True):
        before = {name: self._buffers.get(name) for name in self.GATE_BUFFERS}
        result = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if (old is not None and new is not None and new.is_floating_point()
                    and new.dtype.itemsize < 4):  # cast below fp32: old values, new device
                kept = old if old.dtype.itemsize >= 4 else old.float()
                self._buffers[name] = kept.to(device=new.device)
        return result


def can_read_on_host() -> bool:
    """False while torch.compile traces or a CUDA graph is captured (no data-dependent branch)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class FixedGates:
    """`with FixedGates() as fixed:` around the warm-up and capture of a CUDA graph that its
    owner replays only while the gate buffers it relied on are unchanged (`CudaGraphStep`).

    Within the block, a BufferSummary that cannot read its buffer because a CUDA graph is being
    captured answers with the summary it read last, when the buffer is still the same tensor at
    the same version, and `fixed` records that buffer; the captured graph then leaves out what
    the gates mask (a masked MLP, the masked heads' products) instead of computing it and
    multiplying by zero. Within the block the attention blocks also leave masked heads out in
    training on a GPU (the slicing's host cost is paid once, at capture). Outside a capture,
    summaries are read as always; under torch.compile nothing changes (its graphs carry no
    such check).

    The owner calls `fixed.settle()` once the capture's own writes are done (restoring a
    snapshot bumps the version counters) and, before each replay, `fixed.unchanged()`: False
    after an in-place write to a recorded buffer (set_masks, for one), and the graph must be
    captured anew. Writes through `.data` bypass the version counter and are not seen.

    One entry of the block holds one capture: work the capture records once and every layer
    reads (the key-padding form of the attention mask, `shared`) is kept from entry to exit,
    so a block entered around two captures would hand the second a tensor of the first."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[Tensor, int]] = {}  # id -> (buffer, version)
        self._kept: dict[int, object] = {}  # id -> what captured work reads (index tensors)
        self._shared: dict[tuple, tuple[Tensor, int, Tensor]] = {}  # see `shared`

    def __enter__(self) -> FixedGates:
        _entered_fixed_gates().append(self)
        return self

    def __exit__(self, *exc) -> None:
        _entered_fixed_gates().remove(self)
        self._shared.clear()  # those tensors belong to the capture that just ended

    def shared(self, kind: str, source: Tensor, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        """`make()` (a tensor computed from `source`), made once per capture: while the block is
        entered, a later call with the same kind, the same `source` tensor at the same version
        and the same key returns the first call's tensor, which the graph being captured
        computes before any of its readers. For the capture only: outside one, a result would
        not be recomputed on replay."""
        entry = self._shared.get((kind, id(source), key))
        if entry is not None and entry[0] is source and entry[1] == source._version:
            return entry[2]
        value = make()
        self._shared[(kind, id(source), key)] = (source, source._version, value)
        return value

    def record(self, gate: Tensor) -> None:
        self._buffers[id(gate)] = (gate, gate._version)

    def keep(self, value: object) -> None:
        """Keep `value` (tensors a captured graph reads) alive as long as this record: a block
        that replaces it must not free memory that a replay still reads."""
        self._kept[id(value)] = value

    @property
    def buffers(self) -> list[Tensor]:
        """The buffers whose summaries the captured work relied on."""
        return [gate for gate, _ in self._buffers.values()]

    def settle(self) -> None:
        """Take the recorded buffers' versions as they are now."""
        self._buffers = {key: (gate, gate._version) for key, (gate, _) in self._buffers.items()}

    def unchanged(self) -> bool:
        """Every recorded buffer is at the version `settle` (or the capture) saw."""
        return all(gate._version == version for gate, version in self._buffers.values())


_FIXED_GATES = threading.local()  # .entered: this thread's FixedGates blocks, innermost last


def _entered_fixed_gates() -> list[FixedGates]:
    return _FIXED_GATES.__dict__.setdefault("entered", [])


def fixed_gates() -> FixedGates | None:
    """The innermost FixedGates block this thread has entered, or None (a capture on another
    thread is not affected by this one's block)."""
    entered = _FIXED_GATES.__dict__.get("entered")
    return entered[-1] if entered else None


@dataclass(frozen=True)
class GateSummary:
    """What a gate buffer's values mean for its block's work. live: indices of the non-zero
    entries of a 1-d gate (for a 0-d gate, (0,) or ()); size: its number of entries."""

    live: tuple[int, ...]
    size: int
    all_ones: bool  # every entry exactly 1: multiplying by the gate changes nothing
    live_ones: bool  # every non-zero entry exactly 1 (a 0/1 mask)

    @property
    def any_live(self) -> bool:
        return len(self.live) > 0

    @property
    def all_live(self) -> bool:
        return len(self.live) == self.size


def layer_linears(attn: nn.Module, mlp: nn.Module, *, attention: bool = True,
                  ffn: bool = True) -> dict[str, nn.Linear | None]:
    """A layer's projections by the role errors name them with: the SparseAttention's query,
    key, value and output (`attn.linears()`) and the SparseMLP's intermediate and FFN output;
    None where removed. attention / ffn: whether to include that block's."""
    linears = dict(attn.linears()) if attention else {}
    if ffn:
        linears.update({"intermediate": mlp.intermediate_dense(),
                        "FFN output": mlp.output_dense()})
    return linears


def quantized_linears(module: nn.Module) -> list[str]:
    """Names of the linear layers within `module` whose weight is no tensor: torch.ao's quantized
    Linear (`quantize_dynamic`), whose `weight` is a method returning packed int8 values. Nothing
    can slice them, and autograd cannot differentiate through them (no gate gradient)."""
    return [name or type(module).__name__ for name, child in module.named_modules()
            if hasattr(child, "in_features") and hasattr(child, "weight")
            and not isinstance(child.weight, Tensor)]


def in_shared_memory(tensor: Tensor) -> bool:
    """Whether `tensor` lives in CPU shared memory (`model.share_memory()`): other processes may
    write it, and their writes move no version counter in this one, so nothing derived from its
    values may be kept across calls."""
    return tensor.device.type == "cpu" and tensor.untyped_storage().is_shared()


class BufferSummary:
    """The GateSummary of a gate buffer, read on the host once per change of the buffer (another
    tensor, or an in-place write, which bumps its version counter), so that a forward need not
    work out per call what the gate means (on a GPU: one device sync per change instead of
    kernels on every call). Returns None where it cannot know without reading now: while
    torch.compile traces or a CUDA graph is captured (what the graph computes must follow the
    gate's values on every replay; within a FixedGates block, the capture gets the last summary
    instead, when it is still current), and for tensors without a version counter (inference
    tensors). A gate in shared memory (`share_memory()`; another process may write it) is read
    on every call. Writes through `.data` bypass the version counter: they are not seen."""

    def __init__(self) -> None:
        self._last: tuple[Tensor, int, GateSummary] | None = None

    def __call__(self, gate: Tensor) -> GateSummary | None:
        if torch.compiler.is_compiling():  # (before is_inference(), which dynamo cannot trace)
            return None
        if gate.is_inference() or gate.dim() > 1:
            return None
        if not can_read_on_host():
            return self._fixed(gate)
        last = self._last
        if (last is not None and last[0] is gate and last[1] == gate._version
                and not in_shared_memory(gate)):
            return last[2]
        flat = gate.detach().reshape(-1)
        values = flat.tolist() if flat.device.type == "cpu" else flat.cpu().tolist()  # one sync
        live = tuple(i for i, value in enumerate(values) if value != 0)
        summary = GateSummary(live=live, size=len(values),
                              all_ones=all(value == 1 for value in values),
                              live_ones=all(values[i] == 1 for i in live))
        if last is not None and last[2] == summary:
            summary = last[2]  # the same meaning: the same object (work keyed on it is kept)
        self._last = (gate, gate._version, summary)
        return summary

    def _fixed(self, gate: Tensor) -> GateSummary | None:
        """While a CUDA graph is captured in a FixedGates block: the last summary, when it is
        still current (recorded in the block); None otherwise."""
        fixed, last = fixed_gates(), self._last
        if (fixed is None or torch.compiler.is_compiling() or last is None
                or last[0] is not gate or last[1] != gate._version):
            return None
        fixed.record(gate)
        return last[2]

    def __deepcopy__(self, memo) -> BufferSummary:
        return BufferSummary()  # a copy's buffers are other tensors: read them afresh


def draws_random_numbers(module: nn.Module | Callable) -> bool:
    """Whether a block's dropout part draws random numbers when called: an nn.Dropout in
    training mode with p > 0; nn.Identity and an inactive nn.Dropout draw none, and any other
    module or callable counts as drawing (the safe answer)."""
    if isinstance(module, nn.Identity):
        return False
    if isinstance(module, nn.Dropout):
        return module.training and module.p > 0
    return True


def check_block_args(block: str, layer_norm_eps: object, dropouts: dict[str, object],
                     **sizes: object) -> None:
    """ValueError naming the argument unless every size is an int >= 1, layer_norm_eps a
    finite number > 0 and each dropout a probability in [0, 1) (a block's constructor)."""
    for name, size in sizes.items():
        if not is_integer(size) or size < 1:
            raise ValueError(f"{block}: {name} must be an int >= 1, got {size!r}")
    if not is_finite_number(layer_norm_eps) or layer_norm_eps <= 0:
        raise ValueError(f"{block}: layer_norm_eps must be a finite number > 0, got "
                         f"{layer_norm_eps!r}")
    for name, p in dropouts.items():
        if not is_number(p) or not 0 <= p < 1:
            raise ValueError(f"{block}: {name} must be a probability in [0, 1), got {p!r}")


def check_output_rows(block: str, rows: object) -> None:
    """ValueError unless a block's `output_rows` is None or an int >= 1."""
    if rows is not None and (not is_integer(rows) or rows < 1):
        raise ValueError(f"{block}: output_rows must be None or an int >= 1, got {rows!r}")


def known_all_zero(gate: Tensor) -> bool:
    """True when `gate` is all zeros and that is known without a device sync or a graph break
    (a CPU tensor that needs no grad, outside torch.compile); False means "compute"."""
    if gate.is_cuda or gate.requires_grad or torch.compiler.is_compiling():
        return False
    return gate.numel() == 0 or not bool(gate.any())


def slice_linear(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim=0: output features, bias too) or columns (dim=1: input
    features) `index` of `linear`'s weight; copies, keeps dtype/device/requires_grad."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).clone()
    bias = linear.bias
    if bias is not None:
        bias = (
            bias.detach().clone()
            if dim == 1
            else bias.detach().index_select(0, index.to(bias.device)).clone()
        )
    out_features, in_features = weight.shape
    new = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


def check_gate(name: str, gate: Tensor, size: int, batch_dims: bool = True) -> None:
    """Validate a gate override: floating point, shape (size,) or (B, size)."""
    if not isinstance(gate, Tensor) or not gate.is_floating_point():
        raise TypeError(
            f"'{name}' must be a floating-point torch.Tensor, got {type(gate).__name__}"
            + (f" of dtype {gate.dtype}" if isinstance(gate, Tensor) else "")
        )
    if gate.dim() == 1 and gate.shape[0] == size:
        return
    if batch_dims and gate.dim() == 2 and gate.shape[1] == size:
        return
    raise ValueError(f"'{name}' must have shape ({size},) or (B, {size}), got {tuple(gate.shape)}")
