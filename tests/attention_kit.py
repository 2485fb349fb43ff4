"""Inputs and yardsticks shared by the attention op's tests (tests/test_masked_attention*.py)."""

from __future__ import annotations

import zlib

import torch


def make_padding(batch, seq, device, generator):
    """(batch, seq) bool key padding mask, True = real token: random lengths in [1, seq], the
    first row full."""
    lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
    lengths[0] = seq
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return mask.to(device)


def stable_seed(*key) -> int:
    """A seed from test parameters that is the same in every process (hash() of a str is
    randomised per process by PYTHONHASHSEED; crc32 of the repr is not)."""
    return zlib.crc32(repr(key).encode())


def plain_pytorch_attention(q, k, v, gate, mask, scale):
    """Attention in the inputs' own (low) precision with stock PyTorch ops: the error yardstick."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ctx = torch.matmul(torch.softmax(scores, dim=-1), vh).transpose(1, 2)
    gate = gate.to(q.dtype)
    return ctx * (gate[None, None, :, None] if gate.dim() == 1 else gate[:, None, :, None])
