// Shared-memory matrix descriptors of Hopper's warpgroup MMA (wgmma, sm_90a) over the attention
// kernels' swizzled tiles (mma_layout.h), host/device so that the CPU test replays them
// (csrc/tests/test_mma_layout.cpp, section 7).
//
// The tiles are [rows][D] 16-bit elements, D in {32, 64}, chunk c of row r stored at chunk
// c ^ mma::swizzle(r): for D = 64 (128-byte rows) that is the 128-byte swizzle of the ISA's
// canonical layouts (address bits [4:6] ^= bits [7:9]), for D = 32 (64-byte rows) the 64-byte one
// (bits [4:5] ^= bits [7:8]), provided a tile starts at a multiple of 1024 (512) bytes. So wgmma
// reads them in place:
//   * K-major operands (Q as A and K as B of S = Q K^T: the reduction dim d is contiguous): 8-row
//     core-matrix groups `stride` bytes apart (8 rows of 2 D bytes); the leading byte offset is
//     unused (1); a k16 step advances the start address by 32 bytes inside the swizzled rows.
//   * MN-major operand (V as B of O = P V, with the transpose flag: its N dim d is contiguous,
//     its K dim the keys): 8-key groups `stride` bytes apart; one swizzle atom covers all of N
//     (D elements), so the leading byte offset is unused; a k16 step is 16 rows further.
// Descriptor bits (PTX ISA, "Matrix Descriptor Format"): [0,14) start address >> 4, [16,30)
// leading byte offset >> 4, [32,46) stride byte offset >> 4, [49,52) base offset (0: tiles are
// atom-aligned), [62,64) swizzle: 1 = 128 B, 2 = 64 B.
#pragma once

#include <cstdint>

#include "sparsebert/mma_layout.h"

#ifndef SB_MMA_HD
#if defined(__CUDACC__)
#define SB_MMA_HD __host__ __device__ __forceinline__
#else
#define SB_MMA_HD inline
#endif
#endif

namespace sparsebert {
namespace wgmma {

// Bytes of one row of a [rows][D] 16-bit tile = the swizzle width; 8 rows = one swizzle atom.
SB_MMA_HD int row_bytes(int head_dim) { return 2 * head_dim; }
SB_MMA_HD int atom_bytes(int head_dim) { return 8 * row_bytes(head_dim); }
// The descriptor's swizzle field for a tile of head dim D (D = 64: 128 B, D = 32: 64 B).
SB_MMA_HD uint32_t swizzle_mode(int head_dim) { return head_dim == 64 ? 1u : 2u; }

SB_MMA_HD uint64_t make_desc(uint32_t smem_addr, uint32_t leading_bytes, uint32_t stride_bytes,
                             uint32_t swizzle) {
  return (static_cast<uint64_t>((smem_addr >> 4) & 0x3FFFu)) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFFu) << 32) |
         (static_cast<uint64_t>(swizzle & 3u) << 62);
}

// A K-major operand: rows [0, 64) of the tile whose atom-aligned shared-memory address is
// tile_addr, reduction columns [16 kc, 16 kc + 16).
SB_MMA_HD uint64_t k_major_desc(uint32_t tile_addr, int head_dim, int kc) {
  return make_desc(tile_addr + 32u * static_cast<uint32_t>(kc), 16u,
                   static_cast<uint32_t>(atom_bytes(head_dim)), swizzle_mode(head_dim));
}

// The MN-major operand (transposed B): tile rows (keys) [16 kc, 16 kc + 16), all D columns.
SB_MMA_HD uint64_t mn_major_desc(uint32_t tile_addr, int head_dim, int kc) {
  return make_desc(tile_addr + static_cast<uint32_t>(16 * kc * row_bytes(head_dim)), 16u,
                   static_cast<uint32_t>(atom_bytes(head_dim)), swizzle_mode(head_dim));
}

// The accumulator fragment of wgmma.m64nNk16 (f32): register i of thread t of the warpgroup holds
// row 16 (t / 32) + (t % 32) / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (t % 4) + i % 2. Per
// warp and per 8 columns that is mma.sync m16n8's C fragment (mma::frag_c): the kernels keep
// s[nt][4] / o[dt][4] with register 4 nt + j = s[nt][j].
SB_MMA_HD mma::Coord accumulator(int thread, int i) {
  const int lane = thread % 32;
  return {16 * (thread / 32) + lane / 4 + 8 * ((i / 2) % 2), 8 * (i / 4) + 2 * (lane % 4) + i % 2};
}

}  // namespace wgmma
}  // namespace sparsebert
