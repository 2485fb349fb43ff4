"""SparseMLP: a BERT feed-forward block (intermediate + output) with an MLP gate and neuron gates.

out = LayerNorm(mlp_gate * dropout(W2 (neuron_gate * act(W1 x + b1)) + b2) + x)

Gate placement follows the paper (PAPER.md §1.1): the MLP gate multiplies the FFN output after
`output.dense` and dropout, before the residual add and LayerNorm; neuron gates multiply the
intermediate activations (after the activation function).

Conventions (exact, and identical in masked and physically pruned modules):
* mlp_gate == 0, or every neuron gate == 0, or intermediate_size == 0 after pruning: the block
  returns LayerNorm(hidden_states); the FFN contributes nothing, output bias included (the paper's
  `prune_mlp`: `intermediate = None`, `output.dense = None`, LayerNorm kept on the residual).
* A neuron with gate 0 contributes nothing; physically removing it gives the same output.

Parameter names are those of the two modules it replaces (`intermediate.dense.*`,
`output.{dense,LayerNorm}.*`). Standalone it owns those children. Inside a host module that already
holds them (a Hugging Face `BertLayer`), `SparseMLP.attach(host)` drives the host's children
without registering them a second time, so the host's parameter names and state dict stay exactly
those of the unpatched model.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sparsebert.nn.common import (
    BufferSummary,
    Container,
    GateBuffers,
    GateSummary,
    check_block_args,
    check_gate,
    check_output_rows,
    draws_random_numbers,
    known_all_zero,
    slice_linear,
)
from sparsebert.nn.gating import gate_features, gated_residual
from sparsebert.overrides import override_attributes

FFNOutputHook = Callable[["SparseMLP", Tensor], None]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


@dataclass(frozen=True)
class MLPLayout:
    """Child names of a feed-forward block: `<intermediate>.<intermediate_dense|activation>` and
    `<output>.<output_dense|output_layer_norm|output_dropout>` (BERT names by default)."""

    intermediate: str = "intermediate"
    intermediate_dense: str = "dense"
    activation: str = "intermediate_act_fn"
    output: str = "output"
    output_dense: str = "dense"
    output_layer_norm: str = "LayerNorm"
    output_dropout: str = "dropout"


class SparseMLP(GateBuffers):
    """Feed-forward block with gates: forward(hidden_states (..., hidden)) -> (..., hidden).

    Buffers and attributes:
    * `mlp_gate` () fp32 buffer and `neuron_gate` (intermediate_size,) fp32 buffer, both
      non-persistent (masks are saved separately) and kept fp32 when the module is cast to
      fp16/bf16; 1 = keep, 0 = pruned, fractions = soft gates.
    * `mlp_gate_override` (None, () or per-example (B,)) and `neuron_gate_override` (None, (F,) or
      (B, F)) replace the buffers while set: `with module.override_gates(mlp_gate=t): ...`.
      A leaf with requires_grad gets d loss / d gate = sum over tokens of (FFN output . grad).
    * `neuron_gate_live`: None, or True while the neuron gate in use is known to have a non-zero
      entry in every row (`override_gates(..., neurons_live=True)`): forward then skips finding
      out per call whether any neuron is active.
    * `register_ffn_output_hook(hook)`: hook(module, ffn_output) is called on every forward with
      the FFN output (..., hidden) after output dense + dropout, *before* the MLP gate multiply (the
      tensor whose dot product with its gradient is the MLP gate's gradient; call
      `ffn_output.register_hook` inside the hook for per-token / per-example scores).
    * `output_rows` (default None): n to compute and return only the first n positions of a
      (B, S, hidden) input, (B, n, hidden); an active dropout still runs at full size (on zero
      padding), so training draws the random numbers it draws without it. Set on a model's last
      layer by `sparsebert.hf.first_token_readout`.
    * `intermediate_size`, `neuron_ids` (original index of each current neuron).

    Parts, whatever the layout names them and whoever owns them (`host`): `intermediate_dense()`
    (hidden -> F), `activation()`, `output_dense()` (F -> hidden), `output_layer_norm()`,
    `output_dropout()`, and `linears()` (both weight matrices by role). The two denses are None
    once the MLP was removed.
    """

    GATE_BUFFERS = ("mlp_gate", "neuron_gate")
    BLOCK_ATTRIBUTES = ("mlp_gate_override", "neuron_gate_override", "neuron_gate_live",
                        "output_rows")

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str | nn.Module | Callable[[Tensor], Tensor] = "gelu",
        hidden_dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        layout: MLPLayout = MLPLayout(),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_block_args("SparseMLP", layer_norm_eps, {"hidden_dropout": hidden_dropout},
                         hidden_size=hidden_size, intermediate_size=intermediate_size)
        if not isinstance(layout, MLPLayout):
            raise ValueError(f"SparseMLP: layout must be an MLPLayout, got {layout!r}")
        hidden_size, intermediate_size = int(hidden_size), int(intermediate_size)
        hidden_dropout, layer_norm_eps = float(hidden_dropout), float(layer_norm_eps)
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(
                    f"SparseMLP: unknown activation {activation!r}; one of {sorted(_ACTIVATIONS)}"
                )
            activation = _ACTIVATIONS[activation]()
        elif not callable(activation):
            raise ValueError(f"SparseMLP: activation must be a name (one of "
                             f"{sorted(_ACTIVATIONS)}), an nn.Module or a callable, got "
                             f"{activation!r}")
        kw = {"device": device, "dtype": dtype}
        intermediate = Container(
            **{layout.intermediate_dense: nn.Linear(hidden_size, intermediate_size, **kw)}
        )
        setattr(intermediate, layout.activation, activation)
        output = Container(
            **{
                layout.output_dense: nn.Linear(intermediate_size, hidden_size, **kw),
                layout.output_layer_norm: nn.LayerNorm(hidden_size, eps=layer_norm_eps, **kw),
                layout.output_dropout: nn.Dropout(hidden_dropout),
            }
        )
        setattr(self, layout.intermediate, intermediate)
        setattr(self, layout.output, output)
        self._setup(
            layout,
            host=None,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            device=device,
        )

    @classmethod
    def attach(cls, host: nn.Module, *, layout: MLPLayout = MLPLayout()) -> SparseMLP:
        """A SparseMLP that runs the FFN children `host` holds (`host.<layout.intermediate>`,
        `host.<layout.output>`) without registering them: parameter names stay the host's. The
        caller registers the returned module on the host (so .to()/.train() reach the gates) and
        routes the host's FFN call to it."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        dense = getattr(getattr(host, layout.intermediate), layout.intermediate_dense)
        module._setup(
            layout,
            host=host,
            hidden_size=dense.in_features,
            intermediate_size=dense.out_features,
            device=dense.weight.device,
        )
        return module

    def _setup(
        self,
        layout: MLPLayout,
        *,
        host: nn.Module | None,
        hidden_size: int,
        intermediate_size: int,
        device,
    ) -> None:
        self.layout = layout
        object.__setattr__(self, "_host", host)  # not registered: no second path to the parameters
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.neuron_ids: list[int] = list(range(intermediate_size))
        self.mlp_gate_override: Tensor | None = None
        self.neuron_gate_override: Tensor | None = None
        self.neuron_gate_live: bool | None = None
        self.output_rows: int | None = None
        self._ffn_output_hooks: OrderedDict[int, FFNOutputHook] = OrderedDict()
        self.register_buffer("mlp_gate", torch.ones((), device=device), persistent=False)
        self.register_buffer(
            "neuron_gate", torch.ones(intermediate_size, device=device), persistent=False
        )

    # Step 0: parts, looked up by the layout's names on the owner (self, or the host) ---------
    def _part(self, block: str, name: str):
        owner = self if self._host is None else self._host
        return getattr(getattr(owner, block), name)

    # Public accessors (whatever the layout calls them) ---------------------------------------
    @property
    def host(self) -> nn.Module | None:
        """The module that owns the FFN children (e.g. a HF BertLayer) when built with `attach`;
        None for a standalone SparseMLP (it owns them itself)."""
        return self._host

    def intermediate_dense(self) -> nn.Linear | None:
        """The up projection, hidden -> intermediate_size (row n = neuron n); None once the MLP
        was removed."""
        return self._part(self.layout.intermediate, self.layout.intermediate_dense)

    def activation(self) -> nn.Module | Callable[[Tensor], Tensor]:
        """The activation applied to intermediate_dense()'s output (B, S, F)."""
        return self._part(self.layout.intermediate, self.layout.activation)

    def output_dense(self) -> nn.Linear | None:
        """The FFN down projection, intermediate_size -> hidden (column n = neuron n); None once
        the MLP was removed. Its input on each forward is the gated activations (B, S, F), its
        output (after output_dropout()) the FFN output the MLP gate multiplies."""
        return self._part(self.layout.output, self.layout.output_dense)

    def output_layer_norm(self) -> nn.Module:
        """The LayerNorm applied to residual + FFN output (B, S, hidden); never removed."""
        return self._part(self.layout.output, self.layout.output_layer_norm)

    def output_dropout(self) -> nn.Module:
        """The dropout after output_dense() (hidden dropout)."""
        return self._part(self.layout.output, self.layout.output_dropout)

    def linears(self) -> dict[str, nn.Linear | None]:
        """The FFN weight matrices by role, in order: {"intermediate": intermediate_dense(),
        "output": output_dense()}; weights (F, hidden) and (hidden, F); None once the MLP was
        removed."""
        return {"intermediate": self.intermediate_dense(), "output": self.output_dense()}

    @property
    def gates(self) -> tuple[Tensor, Tensor]:
        """(mlp gate () or (B,), neuron gate (F,) or (B, F)) in use: overrides, else buffers."""
        mlp = self.mlp_gate if self.mlp_gate_override is None else self.mlp_gate_override
        neuron = (
            self.neuron_gate if self.neuron_gate_override is None else self.neuron_gate_override
        )
        return mlp, neuron

    @contextlib.contextmanager
    def override_gates(
        self, mlp_gate: Tensor | None = None, neuron_gate: Tensor | None = None,
        neurons_live: bool | None = None,
    ) -> Iterator[None]:
        """Within the block, forward uses these gates (None = keep the buffer): mlp_gate () or
        (B,), neuron_gate (F,) or (B, F); they may require grad. neurons_live=True promises that
        every row of the neuron gate in use (override or buffer) has a non-zero entry, so forward
        need not find out per call; None (default) or False: found out per call."""
        if neurons_live is not None and not isinstance(neurons_live, bool):
            raise TypeError(f"override_gates: 'neurons_live' must be None or a bool, got "
                            f"{neurons_live!r}")
        if mlp_gate is not None:
            if not isinstance(mlp_gate, Tensor) or not mlp_gate.is_floating_point():
                raise TypeError("'mlp_gate' override must be a floating-point torch.Tensor")
            if mlp_gate.dim() > 1:
                raise ValueError(
                    f"'mlp_gate' override must have shape () or (B,), got {tuple(mlp_gate.shape)}"
                )
        if neuron_gate is not None:
            check_gate("neuron_gate override", neuron_gate, self.intermediate_size)
        with override_attributes(self, mlp_gate_override=mlp_gate,
                                 neuron_gate_override=neuron_gate, neuron_gate_live=neurons_live):
            yield

    def gate_summaries(self) -> tuple[GateSummary | None, GateSummary | None]:
        """(mlp gate, neuron gate) buffer summaries (live entries, all ones), each read once per
        change of its buffer; None for a gate overridden, or where it cannot be read
        (BufferSummary)."""
        summaries = []
        for name, override in (("mlp_gate", self.mlp_gate_override),
                               ("neuron_gate", self.neuron_gate_override)):
            if override is not None:
                summaries.append(None)
                continue
            reader = self.__dict__.get(f"_{name}_reader")
            if reader is None:
                reader = BufferSummary()
                setattr(self, f"_{name}_reader", reader)
            summaries.append(reader(getattr(self, name)))
        return summaries[0], summaries[1]

    def register_ffn_output_hook(self, hook: FFNOutputHook) -> RemovableHandle:
        """hook(module, ffn_output (..., hidden)) runs on each forward, before the MLP gate."""
        handle = RemovableHandle(self._ffn_output_hooks)
        self._ffn_output_hooks[handle.id] = hook
        return handle

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states (B, S, hidden) (any leading dims for shared gates) -> same shape; with
        output_rows = n (and 3-d input) -> (B, min(n, S), hidden), the first rows only."""
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"SparseMLP: hidden_states must be (..., hidden) with hidden="
                             f"{self.hidden_size}, got shape {tuple(hidden_states.shape)}")
        layer_norm = self.output_layer_norm()
        check_output_rows("SparseMLP", self.output_rows)
        seq = hidden_states.shape[1] if hidden_states.dim() == 3 else None  # before narrowing
        if seq is not None and self.output_rows is not None and self.output_rows < seq:
            hidden_states = hidden_states[:, :self.output_rows]  # (B, n, hidden)
        mlp_gate, neuron_gate = self.gates
        for name, gate, per_example in (("mlp_gate", mlp_gate, 1), ("neuron_gate", neuron_gate, 2)):
            if gate.dim() == per_example and gate.shape[0] != hidden_states.shape[0]:
                raise ValueError(
                    f"SparseMLP: the per-example '{name}' override has {gate.shape[0]} rows, but "
                    f"hidden_states has batch size {hidden_states.shape[0]} (shape "
                    f"{tuple(hidden_states.shape)})"
                )
        # Step 1: a removed or fully gated MLP is LayerNorm(residual) (paper's prune_mlp).
        mlp_summary, neuron_summary = self.gate_summaries()  # buffers': once per change
        no_mlp = known_all_zero(mlp_gate) if mlp_summary is None else not mlp_summary.any_live
        no_neuron = (not self.neuron_gate_live and known_all_zero(neuron_gate)
                     if neuron_summary is None else not neuron_summary.any_live)
        if self.intermediate_size == 0 or no_mlp or no_neuron:
            return layer_norm(hidden_states)
        # A neuron gate buffer past step 1 has a live entry; an override may be promised to.
        neurons_live = self.neuron_gate_live or neuron_summary is not None
        # Step 2: up projection, activation, neuron gates.
        h = self.intermediate_dense()(hidden_states)  # (B, S, F)
        h = self.activation()(h)
        if neuron_gate.requires_grad:  # importance scoring: fused per-example gate gradient
            h = gate_features(h, neuron_gate)
        elif neuron_summary is not None and neuron_summary.all_ones:
            pass  # every neuron gate is 1: nothing to multiply
        else:
            ng = neuron_gate.to(h.dtype)
            h = h * (ng[:, None, :] if ng.dim() == 2 else ng)
        # Step 3: down projection and dropout: the FFN output (hook point).
        y = self.output_dense()(h)  # (B, S, hidden)
        dropout = self.output_dropout()
        rows = hidden_states.shape[1] if seq is not None else None
        if seq is not None and rows < seq and draws_random_numbers(dropout):
            # Fewer rows: dropout runs at full size, on zero padding, and keeps the first rows,
            # so that it draws the random numbers (and masks) it draws without output_rows.
            y = dropout(F.pad(y, (0, 0, 0, seq - rows)))[:, :rows]
        else:
            y = dropout(y)
        for hook in tuple(self._ffn_output_hooks.values()):
            hook(self, y)
        # Step 4: MLP gate, zeroed where no neuron is active, then residual + LayerNorm.
        gate = mlp_gate  # () or (B,)
        if not neurons_live:
            gate = gate * (neuron_gate != 0).any(dim=-1).to(gate.dtype)
        if gate.requires_grad:  # importance scoring: fused per-example gate gradient (group_dot)
            return layer_norm(gated_residual(hidden_states, y, gate))
        if neurons_live and mlp_summary is not None and mlp_summary.all_ones:
            return layer_norm(hidden_states + y)  # the MLP gate is 1: nothing to multiply
        gate = gate.to(y.dtype)
        gate = gate.view(-1, *([1] * (y.dim() - 1))) if gate.dim() else gate
        return layer_norm(torch.addcmul(hidden_states, y, gate))

    # Physical pruning ---------------------------------------------------------------------------
    # Ordinary tensors even under torch.inference_mode (sliced weights and gates would be
    # inference tensors: not trainable, and set_masks could not write the gates later).
    @torch.inference_mode(False)
    @torch.no_grad()
    def select_neurons(self, keep: Sequence[int]) -> None:
        """Keep only neurons `keep` (current numbering) for real: slices intermediate-dense rows,
        output-dense columns, the neuron gate and `neuron_ids`. Keeping none removes the MLP (both
        denses set to None, mlp_gate set to 0); the block then returns LayerNorm(hidden_states)."""
        keep = sorted(int(n) for n in keep)
        if len(set(keep)) != len(keep) or any(n < 0 or n >= self.intermediate_size for n in keep):
            raise ValueError(
                f"select_neurons: indices must be distinct in [0, {self.intermediate_size})"
            )
        lay = self.layout
        owner = self if self._host is None else self._host
        intermediate, output = getattr(owner, lay.intermediate), getattr(owner, lay.output)
        if keep:
            index = torch.tensor(keep, dtype=torch.long)
            setattr(
                intermediate,
                lay.intermediate_dense,
                slice_linear(getattr(intermediate, lay.intermediate_dense), index, dim=0),
            )
            setattr(
                output,
                lay.output_dense,
                slice_linear(getattr(output, lay.output_dense), index, dim=1),
            )
        else:
            setattr(intermediate, lay.intermediate_dense, None)
            setattr(output, lay.output_dense, None)
            self.mlp_gate.zero_()
        index = torch.tensor(keep, dtype=torch.long, device=self.neuron_gate.device)
        self.neuron_gate = self.neuron_gate.index_select(0, index).clone()
        self.neuron_ids = [self.neuron_ids[n] for n in keep]
        self.intermediate_size = len(keep)

    def extra_repr(self) -> str:
        where = "standalone" if self._host is None else f"attached to {type(self._host).__name__}"
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, {where}"
        )
