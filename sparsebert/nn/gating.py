"""Gate multiplies whose gate gradient comes from the fused group_dot reduction.

`gate_features(x, gate)` (neuron gates) and `gated_residual(residual, y, gate)` (the MLP gate)
compute what `x * gate` and `residual + y * gate` compute; their backward returns the gate
gradient per example through `sparsebert.ops.group_dot` (one pass over x and the incoming
gradient, no x * grad temporary), summed over the batch for a shared gate. Any other input
layout falls back to plain autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsebert.ops import group_dot


class _GateFeatures(torch.autograd.Function):
    """y = x * gate over the last dim; x (B, S, F), gate (F,) or (B, F)."""

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor) -> Tensor:
        ctx.save_for_backward(x, gate)
        g = gate.to(x.dtype)
        return x * (g[:, None, :] if g.dim() == 2 else g)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, gate = ctx.saved_tensors
        g = gate.to(x.dtype)
        dx = grad * (g[:, None, :] if g.dim() == 2 else g) if ctx.needs_input_grad[0] else None
        dgate = None
        if ctx.needs_input_grad[1]:
            per_example = group_dot(x, grad.to(x.dtype), 1)  # (B, F)
            dgate = (per_example if gate.dim() == 2 else per_example.sum(0)).to(gate.dtype)
        return dx, dgate


class _GatedResidual(torch.autograd.Function):
    """out = residual + y * gate; y, residual (B, S, E), gate () or (B,)."""

    @staticmethod
    def forward(ctx, residual: Tensor, y: Tensor, gate: Tensor) -> Tensor:
        ctx.save_for_backward(y, gate)
        g = gate.to(y.dtype)
        return torch.addcmul(residual, y, g.view(-1, 1, 1) if g.dim() == 1 else g)

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, gate = ctx.saved_tensors
        g = gate.to(y.dtype)
        dres = grad if ctx.needs_input_grad[0] else None
        dy = grad * (g.view(-1, 1, 1) if g.dim() == 1 else g) if ctx.needs_input_grad[1] else None
        dgate = None
        if ctx.needs_input_grad[2]:
            per_example = group_dot(y, grad.to(y.dtype), y.shape[-1]).squeeze(1)  # (B,)
            dgate = (per_example if gate.dim() == 1 else per_example.sum()).to(gate.dtype)
        return dres, dy, dgate


def gate_features(x: Tensor, gate: Tensor) -> Tensor:
    """x (B, S, F) * gate (F,) or (B, F), with a fused gate gradient; other layouts: plain."""
    if x.dim() == 3 and gate.dim() in (1, 2) and gate.shape[-1] == x.shape[-1]:
        return _GateFeatures.apply(x, gate)
    g = gate.to(x.dtype)
    return x * (g[:, None, :] if g.dim() == 2 else g)


def gated_residual(residual: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """residual + y * gate for y (B, S, E) and gate () or (B,), with a fused gate gradient."""
    if y.dim() == 3 and gate.dim() <= 1:
        return _GatedResidual.apply(residual, y, gate)
    g = gate.to(y.dtype)
    g = g.view(-1, *([1] * (y.dim() - 1))) if g.dim() else g
    return torch.addcmul(residual, y, g)
