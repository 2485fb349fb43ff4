"""Token unpadding: the real tokens of a padded batch, packed once for the whole encoder.

`Packing.from_mask(mask)` reads a (B, S) padding mask (True / 1 = real token) once and gives the
flat positions of the T real tokens, the cumulative sequence lengths (varlen attention's
`cu_seqlens`) and the longest length. `pack(x)` gathers (B, S, E) -> (T, E); `unpack(x)`
scatters (T, E) -> (B, S, E) with zeros at padded positions.

Sequences are assumed right-padded or not: any pattern works for pack/unpack, but varlen
attention (cu_seqlens) treats each row's real tokens as one contiguous sequence, which is what
the row's attention over its unmasked keys computes whatever their positions.

`bucket` > 0 rounds T up to a multiple of `bucket` (CUDA graphs capture fixed shapes): the extra
slots point at a dummy row, index B*S, that callers append to the flat input (`pack` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packing:
    """Where the real tokens of a (B, S) batch are.

    indices: (T_pad,) long, flat positions b*S + s of the real tokens in row-major order, then
        T_pad - T copies of the dummy index B*S (T_pad == T without bucketing);
    cu_seqlens: (B+1,) int32, cumulative lengths (cu_seqlens[-1] == T);
    lengths: (B,) long on the host; max_len: longest length (the attention grid's length);
    tokens: T; every_position: every position is a computed row (indices == arange(B*S), no dummy
    slots); key_mask: (B, S) bool, for a full packing of a padded batch (padded execution: every
    position computed, attention masks the padded keys), else None.
    """

    batch: int
    seq: int
    indices: Tensor
    cu_seqlens: Tensor
    lengths: Tensor
    max_len: int
    tokens: int
    every_position: bool = False
    key_mask: Tensor | None = None

    @classmethod
    def from_mask(cls, mask: Tensor, bucket: int = 0) -> Packing:
        """mask (B, S) bool/int (True = real token). Reads the lengths on the host (one sync)."""
        batch, seq = mask.shape
        real = mask if mask.dtype == torch.bool else mask != 0
        lengths_dev = real.sum(dim=1)  # (B,)
        lengths = lengths_dev.cpu()
        tokens = int(lengths.sum())
        if tokens == batch * seq:
            return cls.full(batch, seq, mask.device)
        indices = torch.nonzero(real.flatten(), as_tuple=False).flatten()  # (T,)
        padded = tokens if bucket <= 0 else min(-(-tokens // bucket) * bucket, batch * seq)
        if padded > tokens:
            dummy = indices.new_full((padded - tokens,), batch * seq)
            indices = torch.cat([indices, dummy])
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = torch.cumsum(lengths_dev, 0).to(torch.int32)
        return cls(batch, seq, indices, cu, lengths, int(lengths.max()) if batch else 0, tokens)

    @classmethod
    def full(cls, batch: int, seq: int, device: torch.device | str,
             key_mask: Tensor | None = None) -> Packing:
        """Every position computed: no padding, or padded execution with `key_mask` (B, S)."""
        indices = torch.arange(batch * seq, device=device)
        cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=device)
        lengths = torch.full((batch,), seq, dtype=torch.long)
        return cls(batch, seq, indices, cu, lengths, seq, batch * seq, every_position=True,
                   key_mask=key_mask)

    @property
    def padded_tokens(self) -> int:
        """T_pad: packed rows, dummy slots included."""
        return self.indices.numel()

    def grid(self) -> tuple[Tensor, Tensor]:
        """Where each packed row goes in a (B, L) attention grid, L = max_len: (index (T_pad,)
        long with b*L + rank in its row, dummy slots at B*L; keys (B, L) bool, True = real).
        Computed once per packing."""
        cached = self.__dict__.get("_grid")
        if cached is None:
            cu = self.cu_seqlens.long()
            device, length = cu.device, self.max_len
            lengths = cu[1:] - cu[:-1]  # (B,)
            rows = torch.repeat_interleave(torch.arange(self.batch, device=device), lengths,
                                           output_size=self.tokens)
            rank = torch.arange(self.tokens, device=device) - cu[:-1][rows]
            index = rows * length + rank  # (T,)
            extra = self.padded_tokens - self.tokens
            if extra:
                index = torch.cat([index, index.new_full((extra,), self.batch * length)])
            keys = torch.arange(length, device=device)[None, :] < lengths[:, None]  # (B, L)
            cached = self.__dict__["_grid"] = (index, keys)
        return cached

    def pack(self, x: Tensor) -> Tensor:
        """x (B, S, E) -> (T_pad, E): the real tokens (dummy slots read a zero row)."""
        flat = x.reshape(self.batch * self.seq, x.shape[-1])
        if self.every_position:
            return flat
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])  # (B*S+1, E): dummy row
        return flat.index_select(0, self.indices)

    def unpack(self, x: Tensor) -> Tensor:
        """x (T_pad, E) -> (B, S, E): real tokens back in place, zeros at padded positions."""
        if self.every_position:
            return x.view(self.batch, self.seq, x.shape[-1])
        out = x.new_zeros(self.batch * self.seq + 1, x.shape[-1])
        out.index_copy_(0, self.indices, x)  # dummy slots land in the extra row
        return out[:-1].view(self.batch, self.seq, x.shape[-1])
