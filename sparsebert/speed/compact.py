"""Compact weights of one gated encoder layer: only the kept heads and FFN neurons.

For a SparseAttention + SparseMLP pair with (H,) / () / (F,) gates, `build_compact(attn, mlp)`
returns a CompactLayer:

* `qkv_weight` (3*k*D, hidden) and `qkv_bias` (3*k*D,): one fused projection over the k kept
  heads (rows: all kept query heads, then key heads, then value heads, head-major inside each);
* `out_weight` (hidden, k*D) and `out_bias` (hidden,): the output projection's columns of the kept
  heads, each scaled by its head gate (1 for binary masks, so the values are copied exactly);
* `up_weight` (f, hidden), `up_bias` (f,), `down_weight` (hidden, f), `down_bias` (hidden,): the
  f kept FFN neurons; the down projection's columns carry neuron gate * MLP gate, its bias the
  MLP gate (again exact copies for binary masks).

k == 0 (no active head) or f == 0 (MLP gated off, or no active neuron) mean the block is
LayerNorm(residual), the masked module's convention. The modules' own parameters are never
touched: the compact tensors are new (gathered) copies, so masks stay reversible.

When they are stale is sparsebert.speed.watch's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsebert.errors import SparsebertError
from sparsebert.nn import SparseAttention, SparseMLP
from sparsebert.nn.attention import plain_linear, unhooked
from sparsebert.nn.common import layer_linears
from sparsebert.speed.workspace import inplace_activation


class FastPathError(SparsebertError):
    """The model or its gates cannot run on the fast path (training mode, per-example gates...)."""


@dataclass
class CompactLayer:
    """Compact weights of one layer (see the module docstring for shapes)."""

    heads: int  # k: kept heads
    head_dim: int  # D
    scaling: float
    qkv_weight: Tensor | None  # (3*k*D, hidden)
    qkv_bias: Tensor | None  # (3*k*D,)
    out_weight: Tensor | None  # (hidden, k*D)
    out_bias: Tensor | None  # (hidden,)
    attn_norm: nn.Module  # LayerNorm after attention (the module's own)
    neurons: int  # f: kept FFN neurons
    up_weight: Tensor | None  # (f, hidden)
    up_bias: Tensor | None  # (f,)
    activation: Callable[[Tensor], Tensor]
    activation_inplace: Callable[[Tensor], Tensor] | None  # the same, in place (or None)
    activation_hooked: bool  # the module had a hook when built: no in-place form, it is called
    down_weight: Tensor | None  # (hidden, f)
    down_bias: Tensor | None  # (hidden,)
    ffn_norm: nn.Module  # LayerNorm after the FFN (the module's own)


def check_gates(layer: int, attn: SparseAttention, mlp: SparseMLP) -> None:
    """The fast path needs the modules' own gate buffers (no per-call overrides)."""
    if attn.head_gate_override is not None or mlp.mlp_gate_override is not None or (
        mlp.neuron_gate_override is not None
    ):
        raise FastPathError(
            f"layer {layer} has a gate override (override_head_gate / override_gates) active; "
            "the fast path reads the gate buffers: run it outside the override"
        )


def check_plain_linears(layer: int, attn: SparseAttention, mlp: SparseMLP) -> None:
    """The fast path reads the projections' weights and never calls them: each must be a plain
    nn.Linear without hooks (not a subclass such as a LoRA adapter, a parametrized or
    torch.nn.utils.prune'd one, or one with a replaced forward), which the model itself would
    honour. A few dict lookups per layer, on every call (a hook may come later)."""
    for name, linear in layer_linears(attn, mlp).items():
        if linear is not None and not plain_linear(linear):
            raise FastPathError(
                f"layer {layer}: its {name} projection "
                f"({type(linear).__module__}.{type(linear).__qualname__}) is not a plain "
                "nn.Linear without hooks (a subclass, parametrization, pruning reparametrization, "
                "forward hook or replaced forward): the fast path would read its weight and "
                "bypass it; call the model itself")


def _rows(heads: Tensor, head_dim: int) -> Tensor:
    """Row indices (k*D,) of heads `heads` (k,) in a head-major (H*D) projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


@torch.no_grad()
def _compact_attention(attn: SparseAttention) -> dict:
    gate = attn.head_gate.detach()  # (H,)
    kept = torch.nonzero(gate != 0).flatten().cpu()  # (k,) kept heads, current numbering
    out = {"heads": int(kept.numel()), "head_dim": attn.head_dim, "scaling": attn.scaling,
           "attn_norm": attn.output_layer_norm()}
    if not out["heads"]:
        return {**out, "qkv_weight": None, "qkv_bias": None, "out_weight": None,
                "out_bias": None}
    q, k, v, dense = (attn.linears()[name] for name in ("query", "key", "value", "output"))
    device = q.weight.device
    rows = _rows(kept, attn.head_dim).to(device)  # (k*D,)
    weight = torch.cat([lin.weight.detach().index_select(0, rows) for lin in (q, k, v)])
    bias = None
    if any(lin.bias is not None for lin in (q, k, v)):  # a missing one adds zeros
        bias = torch.cat([lin.weight.new_zeros(rows.numel()) if lin.bias is None
                          else lin.bias.detach().index_select(0, rows) for lin in (q, k, v)])
    # Step 2: output columns of the kept heads, scaled by their gates (exact for gate 1).
    col_gate = gate.to(device)[kept.to(device)].repeat_interleave(attn.head_dim)  # (k*D,)
    out_weight = dense.weight.detach().index_select(1, rows)  # (hidden, k*D)
    if bool((col_gate != 1).any()):
        out_weight = out_weight * col_gate.to(out_weight.dtype)
    out_bias = None if dense.bias is None else dense.bias.detach().clone()
    return {**out, "qkv_weight": weight.contiguous(), "qkv_bias": bias,
            "out_weight": out_weight.contiguous(), "out_bias": out_bias}


@torch.no_grad()
def _compact_mlp(mlp: SparseMLP) -> dict:
    activation = mlp.activation()
    hooked = not unhooked(activation)  # (its hooks run only if the module is called)
    out = {"ffn_norm": mlp.output_layer_norm(), "activation": activation,
           "activation_inplace": None if hooked else inplace_activation(activation),
           "activation_hooked": hooked}
    none = {"neurons": 0, "up_weight": None, "up_bias": None, "down_weight": None,
            "down_bias": None}
    if mlp.intermediate_size == 0 or float(mlp.mlp_gate) == 0:
        return {**out, **none}
    neuron_gate = mlp.neuron_gate.detach()  # (F,)
    kept = torch.nonzero(neuron_gate != 0).flatten()
    if kept.numel() == 0:
        return {**out, **none}
    up, down = mlp.intermediate_dense(), mlp.output_dense()
    kept = kept.to(up.weight.device)
    # Step 1: rows of the up projection, columns of the down projection, of the kept neurons.
    up_weight = up.weight.detach().index_select(0, kept).contiguous()  # (f, hidden)
    up_bias = None if up.bias is None else up.bias.detach().index_select(0, kept)
    down_weight = down.weight.detach().index_select(1, kept)  # (hidden, f)
    # Step 2: fold neuron gates and the MLP gate into the down projection (exact for 1s).
    scale = neuron_gate.to(down_weight.device)[kept] * mlp.mlp_gate.to(down_weight.device)
    if bool((scale != 1).any()):
        down_weight = down_weight * scale.to(down_weight.dtype)
    down_bias = None if down.bias is None else down.bias.detach().clone()
    if down_bias is not None and float(mlp.mlp_gate) != 1:
        down_bias = down_bias * mlp.mlp_gate.to(down_bias)
    return {**out, "neurons": int(kept.numel()), "up_weight": up_weight, "up_bias": up_bias,
            "down_weight": down_weight.contiguous(), "down_bias": down_bias}


def build_compact(attn: SparseAttention, mlp: SparseMLP) -> CompactLayer:
    """Compact weights of one layer from its gated modules' current gates and parameters."""
    return CompactLayer(**_compact_attention(attn), **_compact_mlp(mlp))
