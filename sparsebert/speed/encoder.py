"""FastEncoder: a patched model's encoder layers run on compact weights over packed tokens.

forward(hidden_states (B, S, hidden), attention_mask=None, ...) -> output with
`.last_hidden_state` (B, S, hidden), as Hugging Face's encoder returns it. The steps:

1. refresh the compact weights of every layer whose gates or parameters changed (LayerWatch);
2. pack the real tokens once (B, S, hidden) -> (T, hidden) (token unpadding), unless there is
   no padding;
3. per layer: fused QKV over kept heads -> attention core over each sequence's real tokens ->
   compact output projection + residual + LayerNorm -> compact FFN + residual + LayerNorm (on
   the CPU the projections write into buffers reused between calls: sparsebert.speed.workspace);
4. scatter back to (B, S, hidden) (zeros at padded positions, where the masked model has
   values nobody reads: compare real positions only).

A batch with a padded first position in some row (left padding) runs padded instead: the
pooler and classification heads read position 0, which unpadding would not compute.

On CUDA, with `graphs=True`, steps 2-4 are captured once per (B, S, T bucket) and replayed
(sparsebert.speed.graphs); any change of the compact weights drops the captured graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from sparsebert.nn import SparseAttention, SparseMLP, to_key_padding_mask
from sparsebert.nn.attention import unhooked
from sparsebert.speed.attention_core import Core, choose_core, full_core
from sparsebert.speed.compact import (
    CompactLayer,
    FastPathError,
    build_compact,
    check_gates,
    check_plain_linears,
)
from sparsebert.speed.tokens import Packing
from sparsebert.speed.watch import LayerWatch
from sparsebert.speed.workspace import Workspace, linear


def _residual(y: Tensor, x: Tensor) -> Tensor:
    """x + y, into y (a fresh or workspace tensor) when that keeps the dtype x + y would have
    (under autocast y can be bf16 while x is fp32: then a new, promoted tensor, as HF's add)."""
    return y.add_(x) if y.dtype == torch.result_type(x, y) else torch.add(x, y)


def layer_forward(c: CompactLayer, x: Tensor, packing: Packing, core: Core,
                  workspace: Workspace | None = None) -> Tensor:
    """One encoder layer on packed tokens: x (T_pad, hidden) -> (T_pad, hidden), a new tensor
    (LayerNorm's output: never a workspace view). With a workspace, the projections write into
    its reused buffers; the activation runs in place when a known in-place form exists."""
    tokens = x.shape[0]
    # Step 1: attention over the kept heads (or LayerNorm(residual) when none is kept).
    if c.heads:
        qkv = linear(x, c.qkv_weight, c.qkv_bias, workspace, "qkv")  # (T_pad, 3*k*D)
        ctx = core(qkv.view(tokens, 3, c.heads, c.head_dim), packing, c.scaling)  # (T_pad, k*D)
        x = c.attn_norm(_residual(linear(ctx, c.out_weight, c.out_bias, workspace, "hidden"), x))
    else:
        x = c.attn_norm(x)
    # Step 2: the kept FFN neurons (or LayerNorm(residual) when the MLP is off).
    if c.neurons:
        h = linear(x, c.up_weight, c.up_bias, workspace, "ffn")  # (T_pad, f), ours to overwrite
        h = (c.activation_inplace or c.activation)(h)  # (None while the module has a hook)
        x = c.ffn_norm(_residual(linear(h, c.down_weight, c.down_bias, workspace, "hidden"), x))
    else:
        x = c.ffn_norm(x)
    return x


# The encoders running a call padded (a span loss reads every position): per thread (and task),
# so two threads sharing one accelerated model never see each other's setting.
_RUN_PADDED: ContextVar[tuple[FastEncoder, ...]] = ContextVar("sparsebert_run_padded",
                                                               default=())


class FastEncoder(nn.Module):
    """Runs `blocks` [(SparseAttention, SparseMLP)] of a patched model on compact weights.

    The blocks are not registered here (the model that owns them does; parameter names do not
    change). unpad: pack real tokens (default True); graphs: CUDA-graph replay per shape bucket on
    CUDA devices; bucket: T is rounded up to a multiple of it for graphs; compile: run the layer
    loop through torch.compile (off by default: on CPU it measured within noise of eager, in
    the runs with --compile in bench/results/speed-cpu.md's history, and a cold compile takes
    most of a minute on 2 cores); reuse_buffers: on the CPU, write the layers' large
    intermediates into buffers kept between calls (sparsebert.speed.workspace; they hold about
    T * (3*k*D + f + hidden) values of the largest batch seen, until `release_buffers()`).
    """

    def __init__(self, blocks: list[tuple[SparseAttention, SparseMLP]], *, unpad: bool = True,
                 graphs: bool = False, bucket: int = 256, compile: bool = False,
                 reuse_buffers: bool = True) -> None:
        super().__init__()
        self.compile_layers = compile  # not `compile`: nn.Module.compile is a method
        self._layers = self._layer_loop()
        object.__setattr__(self, "_blocks", list(blocks))
        # the compiled loop allocates through its own graph: no workspace there
        self.workspace = Workspace() if reuse_buffers and not compile else None
        self.unpad = unpad
        self.graphs = graphs
        self.bucket = bucket
        self._compact: list[CompactLayer | None] = [None] * len(self._blocks)
        self._watches: list[LayerWatch | None] = [None] * len(self._blocks)
        self._graph_cache = None  # sparsebert.speed.graphs.GraphCache, built on first use
        self.builds = 0  # how many layers were (re)built: tests read it

    def __getstate__(self) -> dict:
        """Pickling (torch.save, deepcopy) keeps the settings and the blocks, not what is
        derived from them: compact weights, watches, graphs and the compiled loop are rebuilt
        on the first call after loading (the compact layers hold aten ops, which do not pickle)."""
        state = self.__dict__.copy()
        state["_layers"] = None
        state["_compact"] = [None] * len(self._blocks)
        state["_watches"] = [None] * len(self._blocks)
        state["_graph_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._layers = self._layer_loop()

    def _layer_loop(self):
        """The layer loop to call: _run_layers, through torch.compile when asked."""
        return torch.compile(self._run_layers) if self.compile_layers else self._run_layers

    # Step 1: the compact weights cache ---------------------------------------------------------
    def invalidate(self) -> None:
        """Forget the compact weights (and graphs): the next forward rebuilds them. Needed only
        after writes that bypass version counters (e.g. through `param.data`)."""
        self._watches = [None] * len(self._blocks)
        self._graph_cache = None

    @contextlib.contextmanager
    def unpadding(self, allowed: bool) -> Iterator[None]:
        """Within the block, padded tokens are dropped only if `allowed` (and unpad is on), in
        this thread's calls only: other threads calling the same encoder are not affected."""
        token = _RUN_PADDED.set(_RUN_PADDED.get() + (() if allowed else (self,)))
        try:
            yield
        finally:
            _RUN_PADDED.reset(token)

    def _unpads(self) -> bool:
        """Whether this call drops padded tokens: unpad is on and no unpadding(False) holds."""
        return self.unpad and not any(encoder is self for encoder in _RUN_PADDED.get())

    def release_buffers(self) -> None:
        """Free the reused CPU buffers (they are allocated again by the next call)."""
        if self.workspace is not None:
            self.workspace.release()

    def refresh(self) -> list[CompactLayer]:
        """Rebuild the compact weights of layers whose gates or parameters changed."""
        changed = False
        for i, (attn, mlp) in enumerate(self._blocks):
            check_gates(i, attn, mlp)
            try:
                check_plain_linears(i, attn, mlp)
            except FastPathError:
                # A wrapper may write the weight it wraps through `.data` (peft's
                # merge_and_unload): nothing built before it came is trusted after it goes.
                self.invalidate()
                raise
            watch = self._watches[i]
            hooked = not unhooked(mlp.activation())  # a hook added or removed since the build
            if watch is None or not watch.valid() or hooked != (
                    self._compact[i] is not None and self._compact[i].activation_hooked):
                self._watches[i] = LayerWatch.of(attn, mlp)
                self._compact[i] = build_compact(attn, mlp)
                self.builds += 1
                changed = True
        if changed:
            self._graph_cache = None
        return self._compact  # type: ignore[return-value]

    # Steps 2-4: packed execution --------------------------------------------------------------
    @torch.no_grad()
    def run_packed(self, hidden_states: Tensor, packing: Packing) -> Tensor:
        """(B, S, hidden) and a packing (packing_for) -> (B, S, hidden) through every layer,
        eager, on compact weights brought up to date first; inference only (no gradients)."""
        self.refresh()
        return self._run_packed(hidden_states, packing)

    def _run_packed(self, hidden_states: Tensor, packing: Packing) -> Tensor:
        """run_packed after refresh(), under no_grad."""
        layers = self._compact
        core = full_core if packing.every_position else choose_core(hidden_states.device,
                                                          hidden_states.dtype)
        x = packing.pack(hidden_states)  # (T_pad, hidden)
        # CUDA's caching allocator already reuses blocks: the workspace is for the CPU; under
        # autocast the projections run in the autocast dtype, which out= variants would not do
        cpu = hidden_states.device.type == "cpu"
        workspace = self.workspace if cpu and not torch.is_autocast_enabled("cpu") else None
        return packing.unpack(self._layers(layers, x, packing, core, workspace))

    @staticmethod
    def _run_layers(layers: list[CompactLayer], x: Tensor, packing: Packing, core: Core,
                    workspace: Workspace | None = None) -> Tensor:
        for c in layers:
            x = layer_forward(c, x, packing, core, workspace)
        return x

    def packing_for(self, attention_mask: Tensor | None, batch: int, seq: int,
                    device: torch.device) -> Packing:
        """The packing of a batch from whatever mask HF hands its encoder."""
        mask = to_key_padding_mask(attention_mask, batch, seq)  # (B, S) bool or None
        if mask is None or not self._unpads() or not bool(mask[:, 0].all()):
            # padded execution (attention masks the keys): unpadding is off, or a row is
            # left-padded, and the pooler / classification head reads position 0, which only
            # padded execution computes
            return Packing.full(batch, seq, device, key_mask=mask)
        return Packing.from_mask(mask, bucket=self.bucket if self._use_graphs(device) else 0)

    def _use_graphs(self, device: torch.device) -> bool:
        return self.graphs and device.type == "cuda"

    @torch.no_grad()
    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args,
                **kwargs):
        from transformers.modeling_outputs import (  # noqa: PLC0415
            BaseModelOutputWithPastAndCrossAttentions as Output,
        )

        self.refresh()
        batch, seq, _ = hidden_states.shape
        if seq < 1 or batch < 1:
            raise FastPathError(f"accelerate: the inputs have shape (B, S) = ({batch}, {seq}); "
                                "expected B >= 1 and S >= 1 tokens")
        packing = self.packing_for(attention_mask, batch, seq, hidden_states.device)
        if self._use_graphs(hidden_states.device):
            out = self._graphs().run(hidden_states, packing)
        else:
            out = self._run_packed(hidden_states, packing)
        return Output(last_hidden_state=out)  # the class HF encoders return

    def _graphs(self):
        from sparsebert.speed.graphs import GraphCache  # noqa: PLC0415

        if self._graph_cache is None:
            self._graph_cache = GraphCache(self)
        return self._graph_cache
