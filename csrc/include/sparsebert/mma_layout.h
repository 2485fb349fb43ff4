// masked_attention, tensor-core (mma.sync) forward: every index the kernel computes, written once
// as host/device functions so that csrc/tests/test_mma_layout.cpp replays one tile's data movement
// on the CPU against the PTX ISA's fragment definitions and a plain attention.
// Pure C++17: no torch, no CUDA headers needed on the host.
//
// The kernel (csrc/cuda/masked_attention_mma.cu), per CTA of 4 warps and work item
// (active (b, h), query tile of 64 rows):
//   global --cp.async 16 B--> shared Q [64][D], K/V [2 stages][64][D], rows swizzled (below)
//   Q  --ldmatrix.x4-->        A fragments (16 rows per warp), re-read by the warp every key tile
//   K  --ldmatrix.x4-->        B fragments of S = Q K^T (mma.sync m16n8k16, fp32 accumulators)
//   S  --online softmax in registers (row max/sum over the 4 lanes of a quad)--> P (16-bit)
//   P  --re-labelled (no data movement)--> A fragments of O += P V
//   V  --ldmatrix.x4.trans-->  B fragments of P V
//   O  * gate / l once at the end --4-byte stores--> the warp's own rows of the Q tile
//      --16-byte loads/stores--> out (B, S, H or H_kept, D); lse = (m + log2 l) ln 2 beside.
//
// mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// with groupID = lane / 4 and tig = lane % 4:
//   A (16 x 16, 4 regs of 2 halves): reg r half e -> row groupID + 8 * (r % 2),
//                                                  col tig * 2 + e + 8 * (r / 2)
//   B (16 x 8, 2 regs):              reg r half e -> row (k) tig * 2 + e + 8 * r, col (n) groupID
//   C (16 x 8, 4 floats):            c_i           -> row groupID + 8 * (i / 2), col tig * 2 + i % 2
// ldmatrix.x4: lanes 8j..8j+7 give the row addresses of 8x8 matrix j; register j of lane l holds
//   matrix j's elements (l / 4, 2 (l % 4) + e), or with .trans (2 (l % 4) + e, l / 4).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SB_MMA_HD __host__ __device__ __forceinline__
#else
#define SB_MMA_HD inline
#endif

namespace sparsebert {
namespace mma {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 64;  // query rows per work item (16 per warp)
constexpr int kBlockN = 64;  // keys per shared-memory stage
constexpr int kStages = 2;   // K/V double buffering
constexpr int kMaxSeq = 512; // longest sequence the forward is built and tested for

// Backward (masked_attention_mma_bwd.cu): one CTA of 8 warps per active (b, h), S <= 128, all of
// Q, K, V, dO in shared memory as [128][D] swizzled tiles. Phase 1: warp w owns keys 16w..16w+15
// (dK, dV in registers), queries in chunks of 32; phase 2: warp w owns queries 16w..16w+15 (dQ in
// registers, no atomics), keys in chunks of 32.
constexpr int kBwdWarps = 8;
constexpr int kBwdThreads = 32 * kBwdWarps;
constexpr int kBwdMaxSeq = 16 * kBwdWarps;  // 128: one item per head up to here; the tile height
constexpr int kBwdChunk = 32;

// Longer sequences (Sq or Sk > 128): the tiled backward in the same file, same CTA and shared
// memory. Per active (b, h) there are ceil(Sk / 128) key-block items (K, V of 128 keys resident,
// dK and dV in registers, Q and dO streamed 128 rows at a time) followed by ceil(Sq / 128)
// query-block items (Q, dO resident, dQ in registers, K and V streamed): every gradient element
// written once by one CTA, no atomics. Key block 0 also sums delta over all queries for d_gate.
// The fp32 backward (masked_attention_mma_bwd_tf32.cu) uses the same items with 64-row blocks and
// 4 warps, for every length.
SB_MMA_HD int bwd_blocks(int len, int rows = kBwdMaxSeq) { return (len + rows - 1) / rows; }
SB_MMA_HD int bwd_items_per_head(int q_len, int kv_len, int rows = kBwdMaxSeq) {
  return bwd_blocks(kv_len, rows) + bwd_blocks(q_len, rows);
}

struct Coord {
  int row, col;
};

// ---------------------------------------------------------------------------------------------
// Fragment layouts (the kernel's view; test_mma_layout.cpp checks them against the ISA tables).
// ---------------------------------------------------------------------------------------------
SB_MMA_HD int group_id(int lane) { return lane >> 2; }
SB_MMA_HD int thread_in_group(int lane) { return lane & 3; }

SB_MMA_HD Coord frag_a(int lane, int reg, int half) {
  return {group_id(lane) + 8 * (reg & 1), thread_in_group(lane) * 2 + half + 8 * (reg >> 1)};
}
SB_MMA_HD Coord frag_b(int lane, int reg, int half) {  // {k, n}
  return {thread_in_group(lane) * 2 + half + 8 * reg, group_id(lane)};
}
SB_MMA_HD Coord frag_c(int lane, int i) {
  return {group_id(lane) + 8 * (i >> 1), thread_in_group(lane) * 2 + (i & 1)};
}

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles: [rows][D] 16-bit elements, D in {32, 64}: U = D / 8 chunks of 16 bytes per
// row. Chunk c of row r is stored at chunk c ^ swizzle(r): 8 consecutive rows at the same logical
// chunk land in 8 distinct 16-byte bank groups (ldmatrix phases and 16-byte cp.async writes are
// conflict-free), and the map is a bijection within each row.
// ---------------------------------------------------------------------------------------------
SB_MMA_HD int swizzle(int row, int chunks_per_row) {
  // U = 8: rows are 128 B, r % 8 picks the bank group. U = 4: two rows share 128 B.
  return (row / (8 / chunks_per_row)) % chunks_per_row;
}
SB_MMA_HD int smem_offset(int row, int col, int head_dim) {  // in elements
  const int u = head_dim / 8;
  return row * head_dim + (((col >> 3) ^ swizzle(row, u)) << 3) + (col & 7);
}

// cp.async / 16-byte copies: chunk i of a [rows][D] tile (threads take i = tid + k * kThreads).
SB_MMA_HD Coord tile_chunk(int i, int head_dim) {
  const int u = head_dim / 8;
  return {i / u, (i % u) * 8};  // {row, first column}
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.x4 row addresses: the (row, column) of the tile each lane points at.
// ---------------------------------------------------------------------------------------------
// Q as A of S = Q K^T: rows of the warp's 16-row slice, k-chunk kc (16 columns): regs = a0..a3.
SB_MMA_HD Coord ldsm_q(int lane, int kc) {
  return {(lane & 7) + 8 * ((lane >> 3) & 1), 16 * kc + 8 * (lane >> 4)};
}
// K as B of S = Q K^T: key n-tiles 2p and 2p + 1 (16 keys), k-chunk kc:
// regs = b0, b1 of n-tile 2p, then b0, b1 of n-tile 2p + 1.
SB_MMA_HD Coord ldsm_k(int lane, int p, int kc) {
  return {16 * p + 8 * (lane >> 4) + (lane & 7), 16 * kc + 8 * ((lane >> 3) & 1)};
}
// V (.trans) as B of O = P V: keys 16 kc .. 16 kc + 15 (the k dim), d n-tiles 2p and 2p + 1:
// regs = b0, b1 of d-tile 2p, then b0, b1 of d-tile 2p + 1.
SB_MMA_HD Coord ldsm_v(int lane, int kc, int p) {
  return {16 * kc + 8 * ((lane >> 3) & 1) + (lane & 7), 16 * p + 8 * (lane >> 4)};
}

// P from registers: A register `reg` of key chunk kc (keys 16 kc .. 16 kc + 15) packs the pair
// (c0, c1) or (c2, c3) of the S accumulator of key n-tile p_ntile(kc, reg).
SB_MMA_HD int p_ntile(int kc, int reg) { return 2 * kc + (reg >> 1); }
SB_MMA_HD int p_pair(int reg) { return reg & 1; }  // 0: (c0, c1), 1: (c2, c3)

// Real keys (inside the sequence, not padding) of a tile as bit words, built by one ballot per 32
// keys (lane j answers for key 32 w + j of word w): the score in accumulator i of key n-tile nt
// (column nt * 8 + frag_c(lane, i).col of the tile) is real when this bit is set.
SB_MMA_HD bool frag_c_key_real(const uint32_t* words, int lane, int nt, int i) {
  const int col = nt * 8 + frag_c(lane, i).col;
  return ((words[col >> 5] >> (col & 31)) & 1u) != 0u;
}

// Output staging: a warp writes its O accumulators (pairs at frag_c) into its 16 rows of the Q
// tile, then copies 16-byte chunks i = lane + 32 k (k < D / 16) to global memory.
SB_MMA_HD Coord out_chunk(int i, int head_dim) { return tile_chunk(i, head_dim); }

// ---------------------------------------------------------------------------------------------
// fp32 inputs: 3xTF32 on mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32 (masked_attention_mma_tf32.cu).
// Same CTA shape, work items, online softmax and double-buffered 64-key stages as above; what
// changes is the element (4 bytes), the instruction and the operand split:
//   x = big + small, big = tf32(x), small = tf32(x - big) (tf32 = cvt.rna: nearest, ties away
//   from zero, 10 mantissa bits); a b ~= a_small b_big + a_big b_small + a_big b_big (the small
//   products first; a_small b_small, ~2^-22 |a b|, is dropped). Each mma.sync of the fp16 kernel
//   becomes three.
//
// mma.sync.m16n8k8 with .tf32 A/B (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32 rows),
// groupID = lane / 4, tig = lane % 4:
//   A (16 x 8, 4 regs):  a_r -> row groupID + 8 * (r % 2), col tig + 4 * (r / 2)
//   B (8 x 8, 2 regs):   b_r -> row (k) tig + 4 * r,       col (n) groupID
//   C (16 x 8, 4 floats): as m16n8k16 (frag_c).
// Shared memory: [rows][D] fp32 tiles in 16-byte chunks of 4 floats, chunk c of row r stored at
// chunk c ^ (r % 8) (D = 32: 8 chunks per row, D = 64: 16; the XOR stays inside the row). A row
// is a multiple of 128 bytes, so the bank of (r, col) is 4 * ((col / 4) ^ (r % 8)) % 32 + col % 4:
// the A/B fragment loads (8 rows x 4 consecutive floats) hit 32 distinct banks.
// Fragments are read with 32-bit shared loads (ldmatrix moves 16-bit pairs).
//
// P as the A operand without data movement: the C fragment gives lane (g, t) the keys 2t, 2t + 1
// of an 8-key n-tile, the A fragment wants k = t, t + 4. The k order of a product is free, so k
// index kk of key chunk kc stands for key 8 kc + tf32_pv_key(kk) (kk < 4: key 2 kk, else
// 2 (kk - 4) + 1) on both sides: A register r of P is C element tf32_p_elem(r) of n-tile kc,
// and V's B fragment reads the rows of those keys.
// ---------------------------------------------------------------------------------------------
SB_MMA_HD Coord frag_a_tf32(int lane, int reg) {
  return {group_id(lane) + 8 * (reg & 1), thread_in_group(lane) + 4 * (reg >> 1)};
}
SB_MMA_HD Coord frag_b_tf32(int lane, int reg) {  // {k, n}
  return {thread_in_group(lane) + 4 * reg, group_id(lane)};
}

SB_MMA_HD int f32_smem_offset(int row, int col, int head_dim) {  // in floats
  return row * head_dim + ((((col >> 2) ^ (row & 7))) << 2) + (col & 3);
}
// cp.async / 16-byte copies: chunk i (4 floats) of a [rows][D] fp32 tile.
SB_MMA_HD Coord f32_tile_chunk(int i, int head_dim) {
  const int u = head_dim / 4;
  return {i / u, (i % u) * 4};
}

// Fragment sources (tile row, column) of each register:
// Q as A of S = Q K^T: the warp's rows (add 16 * warp), k-chunk kc (8 columns of D).
SB_MMA_HD Coord tf32_q(int lane, int kc, int reg) {
  const Coord c = frag_a_tf32(lane, reg);
  return {c.row, 8 * kc + c.col};
}
// K as B of S = Q K^T: key n-tile nt (8 keys = the n dim), k-chunk kc: B[k][n] = K[key n][d k].
SB_MMA_HD Coord tf32_k(int lane, int nt, int kc, int reg) {
  const Coord c = frag_b_tf32(lane, reg);
  return {8 * nt + c.col, 8 * kc + c.row};
}
// The k index -> key (within an 8-key chunk) permutation of O += P V, and its inverse use.
SB_MMA_HD int tf32_pv_key(int kk) { return kk < 4 ? 2 * kk : 2 * (kk - 4) + 1; }
// A register r of P (key chunk kc) = element tf32_p_elem(r) of the S accumulator of n-tile kc.
SB_MMA_HD int tf32_p_elem(int reg) { return 2 * (reg & 1) + (reg >> 1); }
// V as B of O = P V: key chunk kc (k dim, permuted as above), d n-tile dt: B[k][n] = V[key][d].
SB_MMA_HD Coord tf32_v(int lane, int kc, int dt, int reg) {
  const Coord c = frag_b_tf32(lane, reg);
  return {8 * kc + tf32_pv_key(c.row), 8 * dt + c.col};
}

// tf32 rounding as cvt.rna.tf32.f32 (nearest, ties away from zero, 10 mantissa bits; the low 13
// bits of the result are cleared here, so big + small is exact arithmetic in fp32).
SB_MMA_HD uint32_t f32_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
#endif
}
SB_MMA_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
#endif
}
constexpr uint32_t kTf32Mask = 0xffffe000u;  // sign, exponent and the 10 mantissa bits tf32 keeps
SB_MMA_HD float tf32_rna(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return __uint_as_float(r & kTf32Mask);
#else
  const uint32_t u = f32_to_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf and NaN pass
  // Half an ulp of tf32 added to the magnitude, then truncated: ties go away from zero, and a
  // carry out of the mantissa bumps the exponent (overflow gives inf, as round-to-nearest does).
  return f32_from_bits((u + 0x1000u) & kTf32Mask);
#endif
}
struct Tf32Split {
  float big, small;
};
SB_MMA_HD Tf32Split tf32_split(float x) {
  const float big = tf32_rna(x);
  return {big, tf32_rna(x - big)};
}

// ---------------------------------------------------------------------------------------------
// Work items: (active (b, h), query tile). Active heads are counted on the fly from the gate
// (no host sync, no extra launch): CTAs of a persistent grid take items w = blockIdx.x +
// k * gridDim.x in increasing order, and a cursor walks the (B*H) gate entries 32 at a time,
// never moving backwards (on the GPU a chunk's mask is a shuffle from the lanes that read it: the
// gate is read 256 entries at a time, cuda/mma_ptx.cuh's GateChunks).
// ---------------------------------------------------------------------------------------------
SB_MMA_HD int popc32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}
// Position of the k-th (0-based) set bit of mask; k < popc32(mask).
SB_MMA_HD int nth_set_bit(uint32_t mask, int k) {
  for (int i = 0; i < k; ++i) mask &= mask - 1;
#if defined(__CUDA_ARCH__)
  return __ffs(mask) - 1;
#else
  return __builtin_ctz(mask);
#endif
}

struct ActiveCursor {
  int base = 0;          // first entry of the current 32-entry chunk
  int before = 0;        // active entries in [0, base)
};

// Index in [0, total) of the a-th active entry (a never decreases between calls on one cursor),
// or -1 when fewer than a + 1 entries are active. chunk_mask(base) returns the bit mask of the
// active entries base .. base + 31 (bits past total are 0): a __ballot_sync on the GPU.
template <typename ChunkMask>
SB_MMA_HD int find_active(ActiveCursor& cur, int a, int total, ChunkMask&& chunk_mask) {
  while (cur.base < total) {
    const uint32_t mask = chunk_mask(cur.base);
    const int n = popc32(mask);
    if (a < cur.before + n) return cur.base + nth_set_bit(mask, a - cur.before);
    cur.before += n;
    cur.base += 32;
  }
  return -1;
}

// The GPU's chunk masks come in rounds of 256 entries, 8 per lane of a warp: bit j of lane
// `lane`'s byte in the round starting at `first` (a multiple of 256) is set when entry
// first + 8 lane + j < total is active, is_active(b, h) for entry b * heads + h. (b, h) advance
// together (one division per lane), and every is_active call is unconditional (entries past the
// end ask about entry 0 and are masked off after), so the GPU issues the 8 loads back to back: one
// memory latency per round. Chunk c of the round (its 32 entries 32 c ..) is the bytes of lanes
// 4 c .. 4 c + 3, byte (lane % 4) at bit 8 (lane % 4): gate_round_chunk_lane(base) names lane 4 c.
constexpr int kGateRound = 256;
constexpr int kGatePerLane = kGateRound / 32;
template <typename IsActive>
SB_MMA_HD uint32_t gate_round_bits(int first, int lane, int total, int heads, IsActive&& is_active) {
  const int e = first + kGatePerLane * lane;
  int b = e / heads, h = e % heads;
  uint32_t bits = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kGatePerLane; ++j) {
    const bool inside = e + j < total;
    const bool active = is_active(inside ? b : 0, inside ? h : 0);
    bits |= (inside && active ? 1u : 0u) << j;
    if (++h == heads) h = 0, ++b;
  }
  return bits;
}
SB_MMA_HD int gate_round_first(int base) { return base - base % kGateRound; }
SB_MMA_HD int gate_round_chunk_lane(int base) { return 4 * ((base % kGateRound) / 32); }

// Work-item split: item w -> (active index a, query tile t), tiles fastest (a head's tiles are
// taken by neighbouring CTAs at the same time and share its K/V through L2).
SB_MMA_HD int item_active(int w, int q_tiles) { return w / q_tiles; }
SB_MMA_HD int item_tile(int w, int q_tiles) { return w % q_tiles; }

// Persistent grid size: enough CTAs to fill the GPU (ctas_per_sm resident per SM), never more
// than the items of an all-active gate.
SB_MMA_HD int64_t grid_size(int64_t items_all_active, int sm_count, int ctas_per_sm) {
  const int64_t fill = static_cast<int64_t>(sm_count) * ctas_per_sm;
  return items_all_active < fill ? items_all_active : fill;
}

}  // namespace mma
}  // namespace sparsebert
