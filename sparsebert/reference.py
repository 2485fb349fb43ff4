"""Pure-PyTorch references of every sparsebert op.

Each `<op>_ref` computes in fp32 (fp64 stays fp64), is registered as the op's default kernel in
`sparsebert.ops` (so every op runs on any device without the extension) and is the test oracle
for the native kernels. They favour obviousness over speed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gate_per_example(head_gate: Tensor, batch: int) -> Tensor:
    """head_gate (H,) or (B, H) -> (B, H) in the compute dtype."""
    gate = head_gate.to(_compute_dtype(head_gate.dtype))
    return gate.expand(batch, gate.shape[-1]) if gate.dim() == 1 else gate


def _attention_probs(
    qh: Tensor, kh: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """qh (B, H, Sq, D), kh (B, H, Sk, D) in the compute dtype -> probs (B, H, Sq, Sk), the
    softmax of the scaled scores over the real keys (0 at padded ones), and lse (B, H, Sq)."""
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    # softmax itself, not exp(scores - lse): lse's rounding (up to half an ulp of lse) would
    # scale every probability of the row, by 1 + 2.5e-5 at scores ~1000 in fp32
    return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1)  # (B, H, Sq)


def attention_context(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Ungated attention in the compute dtype.

    q: (B, Sq, H, D), k, v: (B, Sk, H, D), key_padding_mask: (B, Sk) bool or None.
    Returns ctx (B, Sq, H, D) and lse (B, H, Sq), the log-sum-exp of the scaled scores.
    """
    dtype = _compute_dtype(q.dtype)
    qh = q.to(dtype).transpose(1, 2)  # (B, H, Sq, D)
    kh = k.to(dtype).transpose(1, 2)  # (B, H, Sk, D)
    vh = v.to(dtype).transpose(1, 2)  # (B, H, Sk, D)
    probs, lse = _attention_probs(qh, kh, key_padding_mask, scale)  # (B, H, Sq, Sk), (B, H, Sq)
    ctx = torch.matmul(probs, vh).transpose(1, 2)  # (B, Sq, H, D)
    return ctx, lse


def masked_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_gate: Tensor,
    key_padding_mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Gated multi-head attention.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D); head_gate: (H,) or (B, H);
    key_padding_mask: (B, Sk) bool, True = real token, or None.
    Returns out (B, Sq, H, D) in q's dtype, out[:, :, h] = gate[..., h] * softmax(q k^T scale) v,
    exactly 0 for heads whose gate is 0, and lse (B, H, Sq) in the compute dtype (fp32, or fp64 for
    fp64 inputs; 0 for heads whose gate is 0).
    """
    batch = q.shape[0]
    # (B, H) in q's compute dtype, as the kernels and the backward read it: an fp64 gate of 1e-50
    # on fp32 inputs is 0 there, so pruned
    gate = _gate_per_example(head_gate, batch).to(_compute_dtype(q.dtype))
    ctx, lse = attention_context(q, k, v, key_padding_mask, scale)
    active = gate != 0  # (B, H)
    out = torch.where(active[:, None, :, None], ctx * gate[:, None, :, None], 0.0)
    lse = torch.where(active[:, :, None], lse, 0.0)
    return out.to(q.dtype).contiguous(), lse.to(_compute_dtype(q.dtype)).contiguous()


def masked_attention_compact_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_gate: Tensor,
    kept_heads: Tensor,
    key_padding_mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Gated attention of the kept heads only, in compact layout.

    kept_heads: (K,) int64/int32 head indices. Returns out (B, Sq, K, D) in q's dtype with
    out[:, :, j] = the masked_attention output of head kept_heads[j], and lse (B, K, Sq).
    """
    idx = kept_heads.to(torch.long)
    return masked_attention_ref(
        q.index_select(2, idx),
        k.index_select(2, idx),
        v.index_select(2, idx),
        head_gate.index_select(-1, idx),
        key_padding_mask,
        scale,
    )


def masked_attention_backward_ref(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_gate: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of masked_attention in closed form, in the compute dtype (fp32, fp64 for fp64).

    dout: (B, Sq, H, D); out and lse are accepted for signature parity with the native kernels and
    not used. Returns dq, dk, dv (shapes and dtypes of q, k, v) and d_head_gate (B, H) in the
    compute dtype, d_head_gate[b, h] = sum_{s, d} ctx[b, s, h, d] * dout[b, s, h, d] with ctx the
    ungated output. With P = softmax(scale * q k^T) over the real keys and dctx = gate * dout:
    dv = P^T dctx, dP = dctx v^T, dS = P * (dP - rowsum(P * dP)), dq = scale * dS k and
    dk = scale * dS^T q. No autograd runs inside (it works under inference_mode and dispatch
    modes, where this kernel runs below the autograd keys).
    Heads whose gate is exactly 0 are pruned: all their gradients are 0.
    """
    del out, lse
    dtype = _compute_dtype(q.dtype)
    batch = q.shape[0]
    gate = _gate_per_example(head_gate.detach(), batch).to(dtype)  # (B, H)
    active = gate != 0  # (B, H)
    qh, kh, vh = (t.detach().to(dtype).transpose(1, 2) for t in (q, k, v))  # (B, H, S*, D)
    probs, _ = _attention_probs(qh, kh, key_padding_mask, scale)  # (B, H, Sq, Sk)
    dout_h = dout.detach().to(dtype).transpose(1, 2)  # (B, H, Sq, D)
    dctx = dout_h * gate[:, :, None, None]  # (B, H, Sq, D)
    dv = torch.matmul(probs.transpose(-1, -2), dctx)  # (B, H, Sk, D)
    dprobs = torch.matmul(dctx, vh.transpose(-1, -2))  # (B, H, Sq, Sk)
    dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))  # (B, H, Sq, Sk)
    dq = torch.matmul(dscores, kh) * scale  # (B, H, Sq, D)
    dk = torch.matmul(dscores.transpose(-1, -2), qh) * scale  # (B, H, Sk, D)
    ctx = torch.matmul(probs, vh)  # (B, H, Sq, D)
    d_gate = (dout_h * ctx).sum((-2, -1))  # (B, H)
    # A pruned head is never computed: 0 even where its inputs are inf/NaN (0 * NaN would leak).
    pruned = ~active[:, None, :, None]  # (B, 1, H, 1)
    dq, dk, dv = (torch.where(pruned, 0.0, g.transpose(1, 2)) for g in (dq, dk, dv))
    d_gate = torch.where(active, d_gate, 0.0)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_gate)
    return tuple(g.contiguous() for g in grads)


def group_dot_ref(x: Tensor, g: Tensor, group_size: int, token_mask: Tensor | None) -> Tensor:
    """Segmented dot product per example and group.

    x, g: (B, S, D) with D = G * group_size; token_mask: (B, S) bool, True = real token, or None.
    Returns (B, G) in the compute dtype: out[b, j] = sum over real tokens s and the members d of
    group j (d in [j*group_size, (j+1)*group_size)) of x[b, s, d] * g[b, s, d].
    """
    dtype = _compute_dtype(x.dtype)
    prod = x.to(dtype) * g.to(dtype)  # (B, S, D)
    if token_mask is not None:  # padded tokens are skipped, not multiplied by 0 (0 * inf = nan)
        prod = torch.where(token_mask[:, :, None], prod, torch.zeros((), dtype=dtype))
    batch, seq, dim = prod.shape
    return prod.reshape(batch, seq, dim // group_size, group_size).sum(dim=(1, 3)).contiguous()


def accumulate_importance_ref(acc: Tensor, scores: Tensor, power: int) -> None:
    """In place: acc (G...) += sum over the leading dim of |scores (N, G...)| ** power."""
    contribution = scores.to(acc.dtype).abs()
    if power == 2:
        contribution = contribution * contribution
    acc.add_(contribution.sum(dim=0))
