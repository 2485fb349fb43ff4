"""Michel et al.'s importance (mode="michel" of sparsebert.pruning.importance): per real token,
|x_t . d loss / d x_t| of each head's context, each FFN output and each FFN neuron, divided by
the gate that scaled x_t. It needs per-token values, so it uses tensor hooks instead of the
gate gradients of the fused kernels."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def safe_divide(num: Tensor, gate: Tensor) -> Tensor:
    """num / gate where gate != 0, else 0 (the gradient w.r.t. the gate from that of the gated
    tensor)."""
    return torch.where(gate != 0, num / torch.where(gate != 0, gate, 1.0), 0.0)


@contextlib.contextmanager
def michel_hooks(blocks, token_mask: Tensor, sums: dict[str, list[Tensor]], neurons: bool,
                 extra_inputs: list[Tensor]):
    """Per-token |x_t . grad_t| for each head context, FFN output and FFN neuron, summed over real
    tokens and examples into sums["head"][l] (H_l,), sums["mlp"][l] (), sums["neuron"][l] (F_l,).

    An MLP input that depends on no gate (the first MLP once its layer's heads were all
    removed) is replaced by a leaf copy that requires grad and is appended to `extra_inputs`:
    the caller differentiates with respect to those too, so the tensors hooked below them get
    gradients (a leaf copy of a tensor without history changes no other gradient)."""
    handles = []

    def input_requires_grad(module, args):
        if (args and isinstance(args[0], Tensor) and not args[0].requires_grad
                and torch.is_grad_enabled()):
            leaf = args[0].detach().requires_grad_()
            extra_inputs.append(leaf)
            return (leaf, *args[1:])
        return None

    mask = token_mask[:, :, None].float()  # (B, S, 1)

    def on_tensor(x: Tensor, reduce):
        if x.requires_grad:
            x.register_hook(lambda grad, x=x.detach(): reduce(x, grad))

    for layer, (attn, mlp) in enumerate(blocks):

        def head_hook(module, args, layer=layer, attn=attn):
            (ctx,) = args  # (B, S, H*D): gated context, input of the output dense

            def reduce(x, grad):
                b, s, _ = x.shape
                dots = (x.float() * grad.float()).view(b, s, attn.num_heads, attn.head_dim).sum(-1)
                per_token = safe_divide(dots, attn.gate.detach().float().expand(b, -1)[:, None, :])
                sums["head"][layer] += (per_token.abs() * mask).sum(dim=(0, 1))

            on_tensor(ctx, reduce)

        def mlp_hook(module, y, layer=layer, mlp=mlp):
            def reduce(x, grad):  # grad is w.r.t. y, i.e. gate * d loss / d (gated y)
                dots = (x.float() * grad.float()).sum(-1)  # (B, S)
                gate = mlp.gates[0].detach().float()
                gate = gate.view(-1, 1) if gate.dim() else gate
                sums["mlp"][layer] += (safe_divide(dots, gate).abs() * mask[..., 0]).sum()

            on_tensor(y, reduce)

        dense = attn.output_dense()  # None once every head of the layer was removed
        if dense is not None:
            handles.append(dense.register_forward_pre_hook(head_hook))
        handles.append(mlp.register_forward_pre_hook(input_requires_grad))
        handles.append(mlp.register_ffn_output_hook(mlp_hook))
        if neurons:
            down = mlp.output_dense()  # None once the MLP was removed

            def neuron_hook(module, args, layer=layer, mlp=mlp):
                (h,) = args  # (B, S, F): gated activations

                def reduce(x, grad):
                    gate = mlp.gates[1].detach().float()
                    gate = gate[:, None, :] if gate.dim() == 2 else gate
                    per_token = safe_divide(x.float() * grad.float(), gate)
                    sums["neuron"][layer] += (per_token.abs() * mask).sum(dim=(0, 1))

                on_tensor(h, reduce)

            if down is not None:
                handles.append(down.register_forward_pre_hook(neuron_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
