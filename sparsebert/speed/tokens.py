"""Token unpadding: the real tokens of a padded batch, packed once for the whole encoder.

`Packing.from_mask(mask)` reads a (B, S) padding mask (True / 1 = real token) once and gives the
flat positions of the T real tokens, the cumulative sequence lengths (varlen attention's
`cu_seqlens`) and the longest length. `pack(x)` gathers (B, S, E) -> (T, E); `unpack(x)`
scatters (T, E) -> (B, S, E) with zeros at padded positions.

Sequences are assumed right-padded or not: any pattern works for pack/unpack, but varlen
attention (cu_seqlens) treats each row's real tokens as one contiguous sequence, which is what
the row's attention over its unmasked keys computes whatever their positions.

`bucket` > 0 rounds T up to a multiple of `bucket` (CUDA graphs capture fixed shapes): the extra
slots point at a spare row, index B*S, appended to the flat input by `pack` (`dummy_row`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The attention grid's length is the longest sequence rounded up to a multiple of this: torch's
# CPU flash-attention kernel measured 1.2-1.6x slower at lengths that are not multiples of 16
# (B=16, 6 heads of 32, 2 threads: 1.65 ms at L=112, 2.21 ms at 108, 2.68 ms at 124, 1.98 at 128).
GRID_ALIGN = 16


@dataclass
class Packing:
    """Where the real tokens of a (B, S) batch are.

    indices: (T_pad,) long, flat positions b*S + s of the real tokens in row-major order, then
        T_pad - T copies of the dummy index B*S (T_pad == T without bucketing);
    cu_seqlens: (B+1,) int32, cumulative lengths (cu_seqlens[-1] == T);
    lengths: (B,) long on the host; max_len: longest length (grid_len: the attention grid's,
    max_len rounded up to a multiple of GRID_ALIGN);
    tokens: T; every_position: every position is a computed row (indices == arange(B*S), no dummy
    slots); key_mask: (B, S) bool, for a full packing of a padded batch (padded execution: every
    position computed, attention masks the padded keys), else None; dummy_row: indices may point
    at the spare row B*S (bucketed packings).
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
    dummy_row: bool = False

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
        return cls(batch, seq, indices, cu, lengths, int(lengths.max()) if batch else 0, tokens,
                   dummy_row=bucket > 0)

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
    def grid_len(self) -> int:
        """L: the attention grid's length, max_len rounded up to a multiple of GRID_ALIGN."""
        return -(-self.max_len // GRID_ALIGN) * GRID_ALIGN

    @property
    def padded_tokens(self) -> int:
        """T_pad: packed rows, dummy slots included."""
        return self.indices.numel()

    def grid(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Where each packed row goes in a (B, L) attention grid, L = grid_len, computed once:
        index (T_pad,) long, b*L + rank in its row (dummy slots: B*L, a spare row);
        rows, rank (T_pad,) long, the same as (b, rank) (dummy slots: (0, 0), any valid cell);
        keys (B, L) bool, True = real token."""
        cached = self.__dict__.get("_grid")
        if cached is None:
            cu = self.cu_seqlens.long()
            device, length = cu.device, self.grid_len
            lengths = cu[1:] - cu[:-1]  # (B,)
            rows = torch.repeat_interleave(torch.arange(self.batch, device=device), lengths,
                                           output_size=self.tokens)
            rank = torch.arange(self.tokens, device=device) - cu[:-1][rows]
            index = rows * length + rank  # (T,)
            extra = self.padded_tokens - self.tokens
            if extra:
                index = torch.cat([index, index.new_full((extra,), self.batch * length)])
                rows = torch.cat([rows, rows.new_zeros(extra)])
                rank = torch.cat([rank, rank.new_zeros(extra)])
            keys = torch.arange(length, device=device)[None, :] < lengths[:, None]  # (B, L)
            cached = self.__dict__["_grid"] = (index, rows, rank, keys)
        return cached

    def grid_buffer(self, width: int, like: Tensor) -> Tensor:
        """A zeroed (B*L + dummy_row, width) buffer for the attention grid, one per width, reused
        by every layer of a forward (they write the same cells; the rest stays zero or holds
        finite values of earlier batches, which the key mask hides)."""
        buffers = self.__dict__.setdefault("_buffers", {})
        key = (width, like.dtype, like.device)
        if key not in buffers:
            rows = self.batch * self.grid_len + int(self.dummy_row)
            buffers[key] = like.new_zeros(rows, width)
        return buffers[key]

    def pack(self, x: Tensor) -> Tensor:
        """x (B, S, E) -> (T_pad, E): the real tokens (dummy slots read a zero row)."""
        flat = x.reshape(self.batch * self.seq, x.shape[-1])
        if self.every_position:
            return flat
        if self.dummy_row:
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])  # (B*S+1, E)
        return flat.index_select(0, self.indices)

    def unpack(self, x: Tensor) -> Tensor:
        """x (T_pad, E) -> (B, S, E): real tokens back in place, zeros at padded positions."""
        if self.every_position:
            return x.view(self.batch, self.seq, x.shape[-1])
        positions = self.batch * self.seq
        out = x.new_zeros(positions + int(self.dummy_row), x.shape[-1])
        out.index_copy_(0, self.indices, x)  # dummy slots land in the spare row
        return out[:positions].view(self.batch, self.seq, x.shape[-1])
