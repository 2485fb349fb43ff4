"""SparseAttention: a BERT attention block (self-attention + output projection) with head gates.

Replaces e.g. Hugging Face `BertAttention` (`self.{query,key,value}` + `output.{dense,LayerNorm,
dropout}`) with the same parameter names and shapes, so state dicts load unchanged. The gate
placement follows the paper (PAPER.md §1.1): the head gate multiplies each head's context
(equivalent to multiplying its attention probabilities).

Conventions (exact, and identical in masked and physically pruned modules):
* gate[h] == 0: head h is never computed (sparsebert.ops.masked_attention skips it) and adds 0.
* Every head of an example gated to 0 (or num_heads == 0 after pruning): the block returns
  LayerNorm(hidden_states); the output dense, its bias included, contributes nothing. This is the
  paper's code for a physically pruned layer (`self.self = None`, `output.dense = None`, LayerNorm
  still applied to the residual), which its "pruned" evaluation uses. Its masked model (the
  search's dev scores) keeps the bias there instead, LayerNorm(b_O + hidden_states): a search
  step that masks a whole layer scores the layer as pruned here, so the step's score can differ.
* Training with attention dropout p > 0 runs torch SDPA (with dropout) and multiplies its output by
  the gate; eval / p == 0 runs the sparsebert op. A 4-d attention mask that is not a padding mask
  (causal, packed sequences, soft additive biases: `is_padding_mask`) also runs through SDPA,
  gated the same way.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsebert.nn.common import (
    BufferSummary,
    Container,
    GateBuffers,
    GateSummary,
    can_read_on_host,
    check_block_args,
    check_gate,
    check_output_rows,
    fixed_gates,
    in_shared_memory,
    known_all_zero,
    slice_linear,
)
from sparsebert.nn.optimizer_steps import watch_optimizer_steps
from sparsebert.ops import masked_attention
from sparsebert.overrides import override_attributes


@dataclass(frozen=True)
class AttentionLayout:
    """Child names of an attention block: `<self_attention>.<query|key|value|attention_dropout>`
    and `<output>.<output_dense|output_layer_norm|output_dropout>` (BERT names by default)."""

    self_attention: str = "self"
    query: str = "query"
    key: str = "key"
    value: str = "value"
    attention_dropout: str = "dropout"  # nn.Dropout on the attention probabilities
    output: str = "output"
    output_dense: str = "dense"
    output_layer_norm: str = "LayerNorm"
    output_dropout: str = "dropout"


# (mask, its version counter, verdict) of the last materialised 4-d mask checked: HF hands every
# layer the same mask tensor, so a forward reads its contents once (a device sync on an
# accelerator), not once per layer. Holding the (detached) mask keeps its memory from being
# recycled for another mask while the verdict is cached.
_last_mask_verdict: tuple[Tensor, int, bool] | None = None
# The last conversion of to_key_padding_mask: (mask, its version, batch, seq, key padding mask).
# Every layer of a forward gets the same mask object; the first converts it (four small
# kernels), the others reuse the result.
_last_key_padding: tuple[Tensor, int, int, int, Tensor] | None = None
# An additive mask value at or below this masks its key exactly (exp underflows to 0 in every
# floating dtype); transformers uses finfo.min, older code -10000.
HARD_MASK_BIAS = -1e4


def _unsupported_mask(attention_mask: object) -> TypeError:
    return TypeError(
        f"SparseAttention: unsupported attention_mask type {type(attention_mask).__name__}; "
        "use attn_implementation='eager' or 'sdpa' (flex-attention BlockMasks are not supported)")


def is_padding_mask(attention_mask: Tensor | None) -> bool:
    """True when a Hugging Face attention mask only masks keys, the same for every head and
    query row, and only hard-masks them (None, (B, S), or a (B, 1|H, Sq, S) mask whose rows all
    repeat row 0 and, when additive (float), hold only 0 = attend and <= -1e4 = masked): what
    `to_key_padding_mask` converts without changing the attention. False for causal, packed
    (block-diagonal) or other custom 4-d masks, and for soft additive biases (-1.0, +0.5, ...).

    A bool or integer 4-d mask with size 1 or stride 0 over heads and queries (an expanded
    padding mask) is one by construction; any other 4-d mask is read (the verdict is cached
    for the same tensor until it is written to; not for inference tensors, which have no
    version counter). While torch.compile traces or a CUDA graph is captured a mask cannot be
    read: such masks are then not taken for padding masks (SDPA runs them, exactly); the same
    for a mask batched by torch.func.vmap. Masks of torch.func transforms are never cached.
    """
    global _last_mask_verdict
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise _unsupported_mask(attention_mask)
    if attention_mask is None or attention_mask.dim() != 4:
        return True
    hard = not attention_mask.is_floating_point()  # bool/int: attend or masked, nothing between
    repeats = all(attention_mask.shape[d] == 1 or attention_mask.stride(d) == 0 for d in (1, 2))
    if repeats and hard:
        return True
    if not can_read_on_host():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(attention_mask):  # under torch.func
        try:  # (grad: readable; vmap: a batched mask's values cannot steer Python)
            return _padding_verdict(attention_mask, repeats, hard)
        except RuntimeError:
            return False  # SDPA runs it, exactly
    # Inference tensors (made under torch.inference_mode) have no version counter: not cached.
    version = None if attention_mask.is_inference() else attention_mask._version
    cached = _last_mask_verdict
    if (version is not None and cached is not None
            and cached[0].data_ptr() == attention_mask.data_ptr()
            and cached[0].shape == attention_mask.shape
            and cached[0].stride() == attention_mask.stride()
            and cached[0].dtype == attention_mask.dtype
            and cached[0].device == attention_mask.device
            and cached[1] == version):
        return cached[2]
    verdict = _padding_verdict(attention_mask, repeats, hard)
    if version is not None:
        _last_mask_verdict = (attention_mask.detach(), version, verdict)
    return verdict


def _padding_verdict(attention_mask: Tensor, repeats: bool, hard: bool) -> bool:
    """is_padding_mask's reading of a (B, 1 or H, S or 1, S) mask's values."""
    first_row = attention_mask[:, :1, :1, :]  # (B, 1, 1, S)
    verdict = repeats or bool(torch.equal(attention_mask, first_row.expand_as(attention_mask)))
    if verdict and not hard:  # additive: 0 = attend, <= -1e4 = masked (exp underflows to 0)
        verdict = bool(((first_row == 0) | (first_row <= HARD_MASK_BIAS)).all())
    return verdict


def _read_is_padding_mask(attention_mask: Tensor) -> bool:
    """is_padding_mask, reading the mask's values also while torch.compile traces (the check
    then runs outside the graph, a graph break), for callers that need the (B, S) form."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(is_padding_mask)(attention_mask)
    return is_padding_mask(attention_mask)


def to_key_padding_mask(attention_mask: Tensor | None, batch: int, seq: int, *,
                        known_padding: bool = False) -> Tensor | None:
    """Convert the attention masks Hugging Face passes to attention modules into the op's
    key_padding_mask (B, S) bool, True = real token.

    Accepted: None; (B, S) bool/int/float with 1/True = real token (flash-attention style);
    (B, 1|H, Sq, S) bool with True = attend (SDPA style); (B, 1|H, Sq, S) float additive with
    0 = attend and a large negative value = masked (eager style). 4-d masks must be padding masks
    (the same for every head and query row, and hard: `is_padding_mask`); others (causal,
    packed sequences, soft additive biases) raise ValueError. A fully padded row attends to
    every key (its output is meaningless either way) because the op needs one real token per
    row. known_padding=True:
    the caller has established is_padding_mask already (not checked again).
    """
    global _last_key_padding
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise _unsupported_mask(attention_mask)
    # The same tensor, not written to since (inference tensors have no version counter), gives
    # the same result. While torch.compile traces or a CUDA graph is captured a result from
    # outside the capture would not be recomputed on replay: not kept then, except within the
    # capture of a FixedGates block (one capture per entry), where the first layer's conversion
    # is recorded once and the others read it.
    if torch.compiler.is_compiling():  # (before is_inference(), which dynamo cannot trace)
        return _convert_to_key_padding(attention_mask, batch, seq, known_padding)
    version = None if attention_mask.is_inference() else attention_mask._version
    if not can_read_on_host():
        fixed = fixed_gates()
        if fixed is not None and version is not None:
            return fixed.shared("key_padding_mask", attention_mask, (batch, seq), lambda: (
                _convert_to_key_padding(attention_mask, batch, seq, known_padding)))
        return _convert_to_key_padding(attention_mask, batch, seq, known_padding)
    cached = _last_key_padding
    if (version is not None and cached is not None and cached[0] is attention_mask
            and cached[1] == version and cached[2:4] == (batch, seq)):
        return cached[4]
    mask = _convert_to_key_padding(attention_mask, batch, seq, known_padding)
    if version is not None:
        _last_key_padding = (attention_mask, version, batch, seq, mask)
    return mask


def _convert_to_key_padding(attention_mask: Tensor, batch: int, seq: int,
                            known_padding: bool) -> Tensor:
    """to_key_padding_mask's conversion of a tensor mask (no caching): (B, S) bool."""
    if attention_mask.dim() == 2:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    elif attention_mask.dim() == 4:
        if not known_padding and not _read_is_padding_mask(attention_mask):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} is not a padding mask: its rows "
                "differ between heads or query positions (a causal, packed-sequence or other "
                "custom mask) or it adds soft biases (additive values other than 0 and <= -1e4), "
                "so it has no (B, S) key-padding form; SparseAttention runs such masks through "
                "SDPA, sparsebert.accelerate takes padding masks only"
            )
        row = attention_mask[:, 0, 0, :]  # (B, S): padding masks repeat over heads and queries
        if row.dtype == torch.bool:
            mask = row  # (the rows' fix below makes a new tensor: the caller's is not aliased)
        elif not attention_mask.is_floating_point():
            mask = row != 0
        else:
            mask = row == 0  # additive: 0 = attend, finfo.min (or -1e4) = masked
    else:
        raise ValueError(
            "SparseAttention: attention_mask must be (B, S) or (B, 1, Sq, S), got "
            f"{tuple(attention_mask.shape)}"
        )
    if mask.shape[-1] != seq or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"SparseAttention: attention_mask {tuple(attention_mask.shape)} does not match "
            f"batch {batch} and sequence length {seq}"
        )
    mask = mask.expand(batch, seq)
    return mask | ~mask.any(dim=-1, keepdim=True)  # fully padded rows attend everywhere (no sync)


def unhooked(module: nn.Module) -> bool:
    """No forward hooks or pre-hooks (its own or global ones) and its class's own forward
    (accelerate's offloading, for one, replaces a module's forward): calling it runs nothing
    but its class's forward, so code that skips the call skips nothing."""
    return ("forward" not in module.__dict__
            and not module._forward_hooks and not module._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks
            and not nn.modules.module._global_forward_pre_hooks)


def plain_linear(linear: nn.Module | None) -> bool:
    """An nn.Linear itself (not a subclass, a parametrized or wrapped one) that is unhooked."""
    return type(linear) is nn.Linear and unhooked(linear)


def _all_heads(x: Tensor, heads: Tensor, num_heads: int) -> Tensor:
    """(B, S, K, D) of heads `heads` (K,) -> (B, S, num_heads, D), zeros at the other heads."""
    batch, seq, _, dim = x.shape
    return x.new_zeros(batch, seq, num_heads, dim).index_copy(2, heads, x)


def _tensor_state(t: Tensor) -> tuple[weakref.ref, int, int, weakref.ref]:
    """What tells a tensor's contents apart from a later state (_same_tensors): the object (a
    weak reference), its version counter, its storage address (`param.data = other` moves it
    without a version change) and its storage object (weakly: a `.to()` round trip, half then
    float, may put new storage at the old address)."""
    return weakref.ref(t), t._version, t.data_ptr(), weakref.ref(t.untyped_storage())


def _same_tensors(kept: list[tuple[weakref.ref, int, int, weakref.ref]],
                  tensors: list[Tensor]) -> bool:
    """Whether `tensors` are the very tensors `kept` describes (alive), unmodified since."""
    return len(kept) == len(tensors) and all(
        ref() is t and version == t._version and ptr == t.data_ptr()
        and storage() is t.untyped_storage()
        for (ref, version, ptr, storage), t in zip(kept, tensors))


class _LiveHeads:
    """The live heads of a gate buffer that masks some (K of H) and the slices of the block's
    linears they use: q/k/v weight rows, gathered into one (3 * K * D, hidden) weight so that
    one product projects all three, and output-dense columns. heads (K,), rows (K * D,),
    qkv_rows (3 * K * D,): int64 on the weights' device. With gradients on, `weights` slices anew
    on every call (the slices' gradients reach the full weights, zeros at masked heads); without
    (evaluation) it keeps them while the parameters are unchanged (the same tensor objects, still
    alive, with the same version counters and storage: a parameter replaced by a new one, even
    one the allocator put at the freed one's address, or given new storage through `.data =`, is
    sliced anew), except while a CUDA graph is captured (its replays slice the weights as they
    are then), or while a parameter is in shared memory (`share_memory()`: another process's
    writes move no version counter here). Optimizer steps are seen, fused ones included
    (sparsebert.nn.optimizer_steps).
    In-place writes through `.data` (`param.data.mul_(2)`) bypass the version counter and are
    not seen: write under torch.no_grad() instead (`param.mul_(2)`)."""

    def __init__(self, summary: GateSummary, num_heads: int, head_dim: int,
                 device: torch.device) -> None:
        self.summary = summary
        self.heads = torch.tensor(summary.live, dtype=torch.long, device=device)  # (K,)
        offsets = torch.arange(head_dim, device=device)
        self.rows = (self.heads[:, None] * head_dim + offsets).flatten()  # (K * D,)
        width = num_heads * head_dim  # rows of each of q, k, v
        self.qkv_rows = torch.cat([self.rows, self.rows + width, self.rows + 2 * width])  # (3KD,)
        self._kept: tuple[list, tuple] | None = None

    def weights(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, out: nn.Linear,
                ) -> tuple[tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
        """((qkv_weight (3 * K * D, hidden), qkv_bias (3 * K * D,) or None), (out_weight
        (hidden, K * D), out_bias)): the live rows of q, k and v stacked in that order, and the
        output dense's live columns with its whole bias."""
        keep = not torch.is_grad_enabled() and can_read_on_host()  # a graph slices in replay
        if keep:
            params = [p for linear in (q, k, v, out) for p in (linear.weight, linear.bias)
                      if p is not None]
            # Inference tensors (e.g. bf16 copies made under torch.inference_mode) have no
            # version counter: sliced anew on every call.
            keep = not any(p.is_inference() for p in params)
        if keep:
            if self._kept is not None and _same_tensors(self._kept[0], params):
                return self._kept[1]
            # Another process's writes to shared memory move no version counter here: never
            # kept (checked when storing only: share_memory() moves the storage, so slices kept
            # before it no longer match).
            keep = not any(in_shared_memory(p) for p in params)
        projections = (q, k, v)
        weight = torch.cat([linear.weight for linear in projections]).index_select(
            0, self.qkv_rows)  # (3 * K * D, hidden): one gather, one product
        bias = None
        if any(linear.bias is not None for linear in projections):
            bias = torch.cat([linear.weight.new_zeros(linear.out_features)
                              if linear.bias is None else linear.bias
                              for linear in projections]).index_select(0, self.qkv_rows)
        sliced = ((weight, bias), (out.weight.index_select(1, self.rows), out.bias))
        if keep:  # weak references: the slices keep no replaced parameter alive
            watch_optimizer_steps()  # a fused optimizer step moves no version counter itself
            self._kept = ([_tensor_state(p) for p in params], sliced)
        return sliced

    def __deepcopy__(self, memo) -> None:
        return None  # a copied block rebuilds it for its own weights (and keeps no slices)

    def __getstate__(self) -> dict:
        # pickled without the kept slices (weak references do not pickle): sliced anew
        return {**self.__dict__, "_kept": None}


def _sdpa_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A 4-d HF mask (B, 1|H, Sq, S) in SDPA's terms: bool with True = attend (a row that
    attends nowhere attends everywhere instead, as in to_key_padding_mask, rather than giving
    NaN), or additive in the queries' dtype. An integer mask counts nonzero as attend."""
    if attention_mask.is_floating_point():
        return attention_mask.to(dtype)
    mask = attention_mask != 0  # (B, 1|H, Sq, S) bool
    return mask | ~mask.any(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# SparseAttention
# --------------------------------------------------------------------------------------------
class SparseAttention(GateBuffers):
    """Self-attention + output projection + residual + LayerNorm with per-head gates.

    forward(hidden_states (B, S, hidden), attention_mask=None, **ignored)
        -> (out (B, S, hidden), None)
    (the tuple matches HF's BertAttention; attention weights are never materialised).

    Buffers and attributes:
    * `head_gate` (num_heads,) fp32 buffer (non-persistent: masks are saved separately; kept
      fp32 when the module is cast to fp16/bf16); 1 = keep, 0 = pruned, fractions are soft
      gates. Set it with `sparsebert.set_masks` or in place.
    * `head_gate_override`: None, or a tensor (num_heads,) or per-example (B, num_heads) used
      instead of the buffer (e.g. a leaf with requires_grad for importance scores; the op's
      backward returns its gradient). Use `with module.override_head_gate(t): ...`.
    * `head_gate_live`: None, or True while an override is known to have a non-zero entry in
      every row (`override_head_gate(t, live=True)`): forward then adds the output projection
      to the residual as is, instead of computing per call which rows have an active head (three
      small kernels and a product in the backward, per layer and call).
    * `num_heads`, `head_dim` (per module: pruned layers differ), `head_ids`: original index of
      each current head (kept in sync by `select_heads`).
    * `exact_zero_gate_grad` (default False): when True, a head whose gate is exactly 0 still gets
      its true gate gradient (its attention computed in the backward only; the forward still skips
      it), for straight-through or movement-style gate learning. False: pruned heads cost nothing
      and get d_gate 0. Set it model-wide with `sparsebert.hf.set_zero_gate_grad`. A block whose
      heads are all at 0 adds nothing to the residual (the paper's convention), so its gates get 0
      either way.
    * `output_rows` (default None): n to return only the first n positions, (B, n, hidden): their
      queries attend to every key, and only their rows are projected, attended and normalised.
      In training mode every row is still computed and returned, so that the dropouts here and
      in the SparseMLP after it draw the random numbers they draw without it (that SparseMLP,
      set alike, keeps the first n). Set on a model's last layer by
      `sparsebert.hf.first_token_readout`.

    Parts, whatever the layout names them: `query_linear()`, `key_linear()`, `value_linear()`
    (hidden -> H*D), `output_dense()` (H*D -> hidden), `output_layer_norm()`, `output_dropout()`,
    and `linears()` (the four weight matrices by role). The projections and output dense are None
    once every head was removed.
    """

    GATE_BUFFERS = ("head_gate",)
    BLOCK_ATTRIBUTES = ("head_gate_override", "head_gate_live", "output_rows",
                        "exact_zero_gate_grad")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        layout: AttentionLayout = AttentionLayout(),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_block_args("SparseAttention", layer_norm_eps,
                         {"attention_dropout": attention_dropout,
                          "hidden_dropout": hidden_dropout},
                         hidden_size=hidden_size, num_heads=num_heads,
                         **({} if head_dim is None else {"head_dim": head_dim}))
        if not isinstance(layout, AttentionLayout):
            raise ValueError(f"SparseAttention: layout must be an AttentionLayout, got "
                             f"{layout!r}")
        hidden_size, num_heads = int(hidden_size), int(num_heads)  # (numpy integers too)
        head_dim = None if head_dim is None else int(head_dim)
        attention_dropout, hidden_dropout = float(attention_dropout), float(hidden_dropout)
        layer_norm_eps = float(layer_norm_eps)
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"SparseAttention: hidden_size {hidden_size} is not a multiple of num_heads "
                    f"{num_heads}; pass head_dim"
                )
            head_dim = hidden_size // num_heads
        if num_heads < 1 or head_dim < 1:
            raise ValueError(
                f"SparseAttention: num_heads and head_dim must be >= 1, got num_heads={num_heads}, "
                f"head_dim={head_dim}"
            )
        inner = num_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        self._init_from_parts(
            query=nn.Linear(hidden_size, inner, **kw),
            key=nn.Linear(hidden_size, inner, **kw),
            value=nn.Linear(hidden_size, inner, **kw),
            dense=nn.Linear(inner, hidden_size, **kw),
            layer_norm=nn.LayerNorm(hidden_size, eps=layer_norm_eps, **kw),
            dropout=nn.Dropout(hidden_dropout),
            num_heads=num_heads,
            head_dim=head_dim,
            hidden_size=hidden_size,
            attention_dropout=attention_dropout,
            layout=layout,
        )

    @classmethod
    def from_modules(
        cls,
        *,
        query: nn.Linear,
        key: nn.Linear,
        value: nn.Linear,
        dense: nn.Linear,
        layer_norm: nn.Module,
        dropout: nn.Module,
        num_heads: int,
        attention_dropout: float | nn.Dropout = 0.0,
        layout: AttentionLayout = AttentionLayout(),
    ) -> SparseAttention:
        """Build around existing modules (no copies: the same Parameter objects are reused).
        attention_dropout: a rate, or the replaced block's own nn.Dropout module (kept, so that
        setting its p, as one does on the stock model, keeps acting)."""
        if num_heads < 1 or query.out_features < num_heads:
            raise ValueError(
                f"SparseAttention.from_modules: num_heads must be in [1, query out_features "
                f"{query.out_features}], got {num_heads}"
            )
        if query.out_features % num_heads:
            raise ValueError(
                f"query out_features {query.out_features} is not a multiple of num_heads "
                f"{num_heads}"
            )
        module = cls.__new__(cls)
        module._init_from_parts(
            query=query,
            key=key,
            value=value,
            dense=dense,
            layer_norm=layer_norm,
            dropout=dropout,
            num_heads=num_heads,
            head_dim=query.out_features // num_heads,
            hidden_size=query.in_features,
            attention_dropout=attention_dropout,
            layout=layout,
        )
        return module

    def _init_from_parts(
        self,
        *,
        query,
        key,
        value,
        dense,
        layer_norm,
        dropout,
        num_heads,
        head_dim,
        hidden_size,
        attention_dropout,
        layout,
    ) -> None:
        nn.Module.__init__(self)
        self.layout = layout
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.hidden_size = hidden_size
        self.scaling = head_dim**-0.5
        self.head_ids: list[int] = list(range(num_heads))
        self.original_num_heads = num_heads  # before any physical pruning (per-head masks)
        self.head_gate_override: Tensor | None = None
        self.head_gate_live: bool | None = None
        self.exact_zero_gate_grad = False
        self.output_rows: int | None = None
        probs_dropout = (attention_dropout if isinstance(attention_dropout, nn.Dropout)
                         else nn.Dropout(float(attention_dropout)))
        projections = Container(**{layout.query: query, layout.key: key, layout.value: value,
                                   layout.attention_dropout: probs_dropout})
        output = Container(
            **{
                layout.output_dense: dense,
                layout.output_layer_norm: layer_norm,
                layout.output_dropout: dropout,
            }
        )
        setattr(self, layout.self_attention, projections)
        setattr(self, layout.output, output)
        device = query.weight.device if query is not None else None
        self.register_buffer("head_gate", torch.ones(num_heads, device=device), persistent=False)

    # Step 0: parts, looked up by the layout's names ------------------------------------------
    def _proj(self, name: str) -> nn.Linear | None:
        return getattr(getattr(self, self.layout.self_attention), name)

    def _out(self, name: str) -> nn.Module | None:
        return getattr(getattr(self, self.layout.output), name)

    # Public accessors (whatever the layout calls them) ---------------------------------------
    @property
    def attention_dropout(self) -> float:
        """Dropout rate on the attention probabilities (training only): the p of the
        `<self>.dropout` module, where the stock model keeps it, so code that sets p on a
        model's nn.Dropout modules (e.g. to turn dropout off) reaches it."""
        return float(self._proj(self.layout.attention_dropout).p)

    @attention_dropout.setter
    def attention_dropout(self, p: float) -> None:
        self._proj(self.layout.attention_dropout).p = float(p)

    def query_linear(self) -> nn.Linear | None:
        """The query projection, hidden -> num_heads * head_dim (output rows grouped by head:
        rows [h*D, (h+1)*D) are head h); None once every head was removed."""
        return self._proj(self.layout.query)

    def key_linear(self) -> nn.Linear | None:
        """The key projection, hidden -> num_heads * head_dim (rows grouped by head, as query)."""
        return self._proj(self.layout.key)

    def value_linear(self) -> nn.Linear | None:
        """The value projection, hidden -> num_heads * head_dim (rows grouped by head, as query)."""
        return self._proj(self.layout.value)

    def output_dense(self) -> nn.Linear | None:
        """The attention output projection, num_heads * head_dim -> hidden (input columns grouped
        by head); None once every head was removed. Its input on each forward is the gated
        context (B, S, H*D), its output goes through output_dropout(), the residual and
        output_layer_norm()."""
        return self._out(self.layout.output_dense)

    def output_layer_norm(self) -> nn.Module:
        """The LayerNorm applied to residual + attention output (B, S, hidden); never removed."""
        return self._out(self.layout.output_layer_norm)

    def output_dropout(self) -> nn.Module:
        """The dropout after output_dense() (hidden dropout)."""
        return self._out(self.layout.output_dropout)

    def linears(self) -> dict[str, nn.Linear | None]:
        """The block's weight matrices by role, in order: {"query", "key", "value", "output"}
        (output = output_dense()). Entries are None once every head was removed. Weights are
        (out_features, in_features): (H*D, hidden) for query/key/value, (hidden, H*D) for output.
        """
        return {
            "query": self.query_linear(),
            "key": self.key_linear(),
            "value": self.value_linear(),
            "output": self.output_dense(),
        }

    @property
    def gate(self) -> Tensor:
        """The gate in use: `head_gate_override` if set, else the `head_gate` buffer."""
        return self.head_gate if self.head_gate_override is None else self.head_gate_override

    def gate_summary(self) -> GateSummary | None:
        """The `head_gate` buffer's summary (live heads, all ones), read once per change of the
        buffer; None while an override is in use, or where it cannot be read (BufferSummary)."""
        if self.head_gate_override is not None:
            return None
        reader = self.__dict__.get("_head_gate_reader")
        if reader is None:
            reader = self._head_gate_reader = BufferSummary()
        return reader(self.head_gate)

    @contextlib.contextmanager
    def override_head_gate(self, gate: Tensor, live: bool | None = None) -> Iterator[Tensor]:
        """Within the block, forward uses `gate` ((H,) or per-example (B, H), may require grad)
        instead of the buffer. live=True promises that every row of `gate` has a non-zero entry
        (the caller read it once, e.g. for a whole importance pass), so forward need not find
        out per call; None (default) or False: found out per call."""
        check_gate("head_gate override", gate, self.num_heads)
        if live is not None and not isinstance(live, bool):
            raise TypeError(f"override_head_gate: 'live' must be None or a bool, got {live!r}")
        with override_attributes(self, head_gate_override=gate, head_gate_live=live):
            yield gate

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs
    ) -> tuple[Tensor, None]:
        """hidden_states (B, S, hidden) -> (LayerNorm(dropout(dense(gated ctx)) + hidden), None);
        the first n rows only, (B, n, hidden), with output_rows = n outside training.

        attention_mask: None, (B, S), or a 4-d HF mask (B, 1|H, S, S), bool or additive;
        padding masks run the sparsebert op, other 4-d masks (causal, packed sequences) SDPA.
        Extra HF arguments (cache, position_ids...) are accepted and ignored;
        output_attentions=True warns that no attention weights are returned (they are never
        formed); a `head_mask` (removed in transformers 5, which ignores it silently) raises
        ValueError pointing to set_masks.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[2] != self.hidden_size:
            raise ValueError(
                f"SparseAttention: hidden_states must be (batch, seq, hidden) with hidden="
                f"{self.hidden_size}, got shape {tuple(hidden_states.shape)}"
            )
        if kwargs.get("output_attentions"):
            warnings.warn(
                "SparseAttention never forms attention probabilities: output_attentions=True "
                "returns no attention weights for patched layers (run an unpatched copy with "
                "attn_implementation='eager' to get them)", stacklevel=2,
            )
        if kwargs.get("head_mask") is not None:  # transformers 5 would silently ignore it
            raise ValueError(
                "SparseAttention: the head_mask argument (removed in transformers 5) is not "
                "applied; set gates with sparsebert.set_masks(model, head_mask=...) instead"
            )
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError(
                "SparseAttention supports self-attention only (no encoder_hidden_states)"
            )
        layer_norm = self.output_layer_norm()
        gate = self.gate  # (H,) or (B, H)
        if gate.dim() == 2 and gate.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"SparseAttention: the per-example 'head_gate' override has {gate.shape[0]} "
                f"rows, but hidden_states has batch size {hidden_states.shape[0]} (shape "
                f"{tuple(hidden_states.shape)})"
            )
        # Step 1: a block with no active head is LayerNorm(residual) (paper: self/dense removed).
        summary = self.gate_summary()  # the buffer's, read once per change; else None
        no_head = known_all_zero(gate) if summary is None else not summary.any_live
        batch, seq, _ = hidden_states.shape
        # The rows computed and returned: the first output_rows only, outside training.
        check_output_rows("SparseAttention", self.output_rows)
        q_len = seq if self.output_rows is None or self.training else min(self.output_rows, seq)
        queries = hidden_states[:, :q_len]  # (B, Sq, hidden)
        if self.num_heads == 0 or no_head:
            return layer_norm(queries), None
        dim = self.head_dim
        padding = is_padding_mask(attention_mask)  # else causal, packed or custom 4-d
        # Step 2: projections as (B, S, H, D) views (no transposes or copies). When the gate
        # buffer masks heads (and the mask is a padding mask), of the K live heads only: their
        # rows of the q/k/v weights and columns of the output dense, so masked heads cost no
        # product, in training as in evaluation, and their weights get zero gradients as before.
        live = self._live_heads(summary, hidden_states) if padding else None
        if live is None:
            heads, ones = self.num_heads, summary is not None and summary.all_ones
            q = self.query_linear()(queries).view(batch, q_len, heads, dim)  # (B, Sq, H, D)
            k = self.key_linear()(hidden_states).view(batch, seq, heads, dim)
            v = self.value_linear()(hidden_states).view(batch, seq, heads, dim)
        else:
            heads, ones = live.heads.numel(), summary.live_ones
            (wqkv, bqkv), (wo, bo) = live.weights(
                self.query_linear(), self.key_linear(), self.value_linear(), self.output_dense())
            if q_len == seq:
                qkv = F.linear(hidden_states, wqkv, bqkv)  # (B, S, 3 * K * D)
                q, k, v = qkv.view(batch, seq, 3, heads, dim).unbind(2)  # (B, S, K, D) each
            else:  # fewer query rows: q apart, k and v in one product
                width = heads * dim
                q = F.linear(queries, wqkv[:width], None if bqkv is None else bqkv[:width])
                q = q.view(batch, q_len, heads, dim)  # (B, Sq, K, D)
                kv = F.linear(hidden_states, wqkv[width:], None if bqkv is None else bqkv[width:])
                k, v = kv.view(batch, seq, 2, heads, dim).unbind(2)  # (B, S, K, D) views each
            gate = gate.index_select(0, live.heads)  # (K,)
        # Step 3: gated attention core -> ctx (B, Sq, heads, D).
        dropout = self.attention_dropout if self.training else 0.0
        key_padding_mask = (to_key_padding_mask(attention_mask, batch, seq, known_padding=True)
                            if padding else None)  # (B, S) or None
        # None: a gate of ones, nothing to multiply (unless its gradient is asked for)
        sdpa_gate = None if ones and not (gate.requires_grad and torch.is_grad_enabled()) else gate
        if not padding:  # SDPA takes any 4-d mask
            mask = _sdpa_mask(self._own_heads(attention_mask), q.dtype)[..., :q_len, :]
            # (B, 1|H, Sq, S)
            ctx = self._sdpa(q, k, v, sdpa_gate, mask, dropout)
        elif dropout > 0:
            attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
            if live is None:
                ctx = self._sdpa(q, k, v, sdpa_gate, attn_mask, dropout)  # mask (B, 1, 1, S)
            else:
                # Attention dropout draws its random numbers for every head, masked ones too
                # (zeros there): each live head gets the dropout it gets without the slicing.
                q, k, v = (_all_heads(t, live.heads, self.num_heads) for t in (q, k, v))
                ctx = self._sdpa(q, k, v, None, attn_mask, dropout).index_select(2, live.heads)
                ctx = ctx if sdpa_gate is None else ctx * sdpa_gate.to(ctx.dtype)[:, None]
        else:
            # No fully padded row by construction, so the op skips its (host-syncing) row check.
            op_gate = gate if gate.dtype in (torch.float32, torch.float64) else gate.float()
            ctx = masked_attention(
                q, k, v, op_gate, key_padding_mask, self.scaling, check_padding_rows=False,
                exact_zero_gate_grad=self.exact_zero_gate_grad,
            )  # (B, Sq, H, D)
        # Step 4: output projection; it contributes nothing (bias included) where no head is active.
        ctx = ctx.reshape(batch, q_len, heads * dim)
        out = self.output_dense()(ctx) if live is None else F.linear(ctx, wo, bo)
        out = self.output_dropout()(out)  # (B, Sq, hidden)
        if self.head_gate_live or summary is not None:  # known: every row has an active head
            return layer_norm(queries + out), None
        active = (gate != 0).any(dim=-1).to(out.dtype)  # () or (B,)
        active = active.view(-1, 1, 1) if active.dim() else active
        return layer_norm(torch.addcmul(queries, out, active)), None

    def _own_heads(self, attention_mask: Tensor) -> Tensor:
        """A per-head 4-d mask (B, H0, Sq, S), one entry per head of the model as built (H0),
        cut to this block's heads (B, H, Sq, S) once some were physically pruned; a mask
        shared by the heads (B, 1, Sq, S) as it is."""
        mask_heads = attention_mask.shape[1]
        # (a block pickled before it recorded the count: its highest head id tells a bound)
        built = getattr(self, "original_num_heads", None) or max(
            [self.num_heads, *(h + 1 for h in self.head_ids)])
        if mask_heads == 1 or mask_heads == self.num_heads == built:
            return attention_mask
        if mask_heads != built:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)}: dimension 1 must be 1 or the "
                f"model's number of heads ({built}), got {mask_heads}")
        index = torch.tensor(self.head_ids, dtype=torch.long, device=attention_mask.device)
        return attention_mask.index_select(1, index)  # (B, H, Sq, S)

    def _live_heads(self, summary: GateSummary | None, x: Tensor) -> _LiveHeads | None:
        """The live heads when the gate buffer masks some and leaving the others out pays:
        always without gradients (evaluation: the slices are kept) and on the CPU; on a GPU with
        gradients on only within a FixedGates block (CUDA-graph training that opted in: the
        slicing's host cost is paid once, at capture), not otherwise (eager training there is
        bound by the host, which slicing per call adds to). None (project every head) also
        when a projection is not a plain nn.Linear without hooks (a slice of its weight would
        bypass what wraps it) or q, k, v are not all (H * D, hidden) of one dtype and device
        (they are stacked), and while a graph is captured if the index tensors are not made
        yet (making them copies from the host)."""
        if summary is None or summary.all_live:
            return None
        if self.exact_zero_gate_grad and self.head_gate.requires_grad and torch.is_grad_enabled():
            return None  # the masked heads' true gradient is asked for: compute them
        if torch.is_grad_enabled() and x.device.type != "cpu" and fixed_gates() is None:
            return None
        linears = (self.query_linear(), self.key_linear(), self.value_linear(),
                   self.output_dense())
        if not all(plain_linear(linear) for linear in linears):
            # A wrapper may write the weight it wraps through `.data` (peft's merge_and_unload),
            # which no version counter sees: slices kept from before it came are dropped.
            if can_read_on_host():  # (not while torch.compile traces: nothing kept there)
                self.__dict__.pop("_live_heads_kept", None)
            return None
        width = self.num_heads * self.head_dim  # q, k, v are stacked into one weight
        if any(linear.out_features != width or linear.weight.dtype != linears[0].weight.dtype
               or linear.weight.device != linears[0].weight.device for linear in linears[:3]):
            return None
        device = linears[0].weight.device
        live = self.__dict__.get("_live_heads_kept")
        if live is None or live.summary is not summary or live.heads.device != device:
            if not can_read_on_host():
                return None
            with torch.inference_mode(False):  # kept for later calls, with gradients too
                live = self._live_heads_kept = _LiveHeads(
                    summary, self.num_heads, self.head_dim, device)
        fixed = fixed_gates()
        if fixed is not None and not can_read_on_host():
            fixed.keep(live)  # the graph being captured reads its index tensors
        return live

    def _sdpa(
        self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, attn_mask: Tensor | None,
        dropout: float,
    ) -> Tensor:
        """torch SDPA (training with attention dropout, or a mask that is not a padding mask),
        then the gate (None: a gate known to be all ones, nothing to multiply). q, k, v
        (B, S, H, D); attn_mask broadcastable to (B, H, S, S), bool (True = attend) or
        additive. Returns (B, S, H, D)."""
        ctx = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=dropout,
            scale=self.scaling,
        ).transpose(1, 2)  # (B, S, H, D)
        if gate is None:
            return ctx
        g = gate.to(ctx.dtype)
        g = g.view(1, 1, -1, 1) if g.dim() == 1 else g[:, None, :, None]  # (1|B, 1, H, 1)
        if self.exact_zero_gate_grad:
            return ctx * g  # the same values; the gate gradient is ctx . dout at 0 too
        return torch.where(g != 0, ctx * g, torch.zeros((), dtype=ctx.dtype, device=ctx.device))

    # Physical pruning ---------------------------------------------------------------------------
    # Ordinary tensors even under torch.inference_mode (sliced weights and gates would be
    # inference tensors: not trainable, and set_masks could not write the gates later).
    @torch.inference_mode(False)
    @torch.no_grad()
    def select_heads(self, keep: Sequence[int]) -> None:
        """Keep only heads `keep` (current numbering, ascending) for real: slices q/k/v rows and
        output-dense columns, the gate and `head_ids`. Keeping none removes q/k/v and the output
        dense (set to None, as in the paper); the block then returns LayerNorm(hidden_states)."""
        keep = sorted(int(h) for h in keep)
        if len(set(keep)) != len(keep) or any(h < 0 or h >= self.num_heads for h in keep):
            raise ValueError(
                f"select_heads: indices must be distinct in [0, {self.num_heads}), got {keep}"
            )
        lay = self.layout
        projections, output = getattr(self, lay.self_attention), getattr(self, lay.output)
        if keep:
            heads = torch.tensor(keep, dtype=torch.long)
            rows = (
                heads[:, None] * self.head_dim + torch.arange(self.head_dim)
            ).flatten()  # (k*D,)
            for name in (lay.query, lay.key, lay.value):
                setattr(projections, name, slice_linear(getattr(projections, name), rows, dim=0))
            setattr(
                output,
                lay.output_dense,
                slice_linear(getattr(output, lay.output_dense), rows, dim=1),
            )
        else:
            for name in (lay.query, lay.key, lay.value):
                setattr(projections, name, None)
            setattr(output, lay.output_dense, None)
        index = torch.tensor(keep, dtype=torch.long, device=self.head_gate.device)
        self.head_gate = self.head_gate.index_select(0, index).clone()
        self.head_ids = [self.head_ids[h] for h in keep]
        self.num_heads = len(keep)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, attention_dropout={self.attention_dropout}"
        )
