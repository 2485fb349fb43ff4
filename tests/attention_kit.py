"""Inputs and yardsticks shared by the attention op's tests (tests/test_masked_attention*.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import torch

WITHOUT_EXTENSION = """
import sys, warnings
sys.modules["sparsebert._C"] = None  # as if the extension were not built
warnings.simplefilter("ignore")
"""


def run_without_extension(script: str) -> None:
    """Run `script` in a fresh interpreter where sparsebert._C cannot load (the pure-PyTorch
    path); it must print "ok" and exit 0."""
    env = {**os.environ, "SPARSEBERT_REQUIRE_EXT": "0"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION + script],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


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


def flash_formulation_grads(dout, q, k, v, gate, mask, out, scale):
    """dq, dk, dv of gated attention in float64, computed the way a FlashAttention-2 backward
    does: delta = rowsum(dO . O) taken from the `out` given (what the forward stored, rounded to
    its dtype), P from the exact scores, dP = gate dO V^T, dS = P (dP - delta), dq = scale dS K,
    dk = scale dS^T Q, dv = gate P^T dO; pruned heads (gate 0) 0. Against the exact gradients its
    error is what that formulation owes to the stored out's rounding alone (the second yardstick
    of the low-precision backward checks). q, dout, out: (B, Sq, H, D); k, v: (B, Sk, H, D);
    gate (H,) or (B, H); mask (B, Sk) bool, True = real token, or None."""
    batch, _, heads, _ = q.shape
    g = gate.double().expand(batch, heads)[:, :, None, None]  # (B, H, 1, 1)
    qh, kh, vh, douth, outh = (t.double().transpose(1, 2) for t in (q, k, v, dout, out))
    scores = qh @ kh.transpose(-1, -2) * scale  # (B, H, Sq, Sk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    d_probs = g * (douth @ vh.transpose(-1, -2))  # (B, H, Sq, Sk)
    delta = (douth * outh).sum(-1, keepdim=True)  # (B, H, Sq, 1)
    d_scores = probs * (d_probs - delta)
    grads = (scale * d_scores @ kh, scale * d_scores.transpose(-1, -2) @ qh,
             g * (probs.transpose(-1, -2) @ douth))  # (B, H, S, D) each
    return tuple(torch.where(g != 0, t, 0.0).transpose(1, 2) for t in grads)
