// masked_attention backward for fp32 inputs on tensor cores: 3xTF32 with mma.sync m16n8k8, D in
// {32, 64}, any query and key lengths, one launch. The default for fp32 where it applies
// (masked_attention.cu), next to the 3xTF32 forward (masked_attention_mma_tf32.cu) whose fragment
// sources and P re-labelling it reuses: replayed lane by lane on the CPU
// (csrc/tests/test_mma_layout.cpp), and it passed the CUDA tests on an H200.
//
// The algorithm is the fp16/bf16 backward's (masked_attention_mma_bwd.cu) for long S, with
// 64-row blocks and 4 warps (fp32 tiles take twice the bytes):
//   dS = P (gate dP_raw - delta),  dQ = scale dS K,  dK = scale dS^T Q,  dV = gate P^T dO,
//   d_gate[b, h] = sum_i delta_i / gate.
// Per active (b, h): ceil(Sk / 64) key-block items, then ceil(Sq / 64) query-block items.
//   Key block (warp w owns keys k0 + 16w .. + 15; dK, dV in registers): per 64-query tile of
//     Q, dO streamed through shared memory (with delta = dO . O and lse), per 32-query chunk:
//     S^T = K Q^T and dP^T = V dO^T, P^T and dS^T in registers, then dV += P^T dO and
//     dK += dS^T Q with P^T and dS^T split from the accumulators as A operands (queries permuted
//     within 8-query chunks as the forward permutes keys: tf32_pv_key). Key block 0 also sums
//     delta over every query for d_gate (fixed order: deterministic).
//   Query block (warp w owns queries q0 + 16w .. + 15; dQ in registers): per 64-key tile of K, V,
//     per 32-key chunk: S = Q K^T, dP = dO V^T, dS in registers, dQ += dS K.
// Every gradient element has one writer: no atomics, no fp32 dQ buffer, no memset. Every product
// is 3xTF32 (mma_1688_3xtf32); operands are read from shared memory with 32-bit loads and split
// per use (no fragments kept across chunks, as in the forward: register pressure).
// Pruned heads: their dQ, dK, dV slices are zero-filled and d_gate is 0, nothing else is read.
// Shared memory: Q, K, V, dO [64][D] fp32 swizzled + lse2, delta [64] = 66 KB at D = 64.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "masked_attention_mma.cuh"
#include "mma_backward_common.cuh"
#include "mma_ptx.cuh"
#include "sparsebert/attention_math.h"
#include "sparsebert/mma_layout.h"

namespace sparsebert {
namespace cuda_mma {
namespace {

using mma::Coord;
constexpr int kRows = mma::kBlockM;     // 64 rows per tile and per block
// Queries (key blocks) or keys (query blocks) per step. 8, not the 32 of the 16-bit kernel: with
// 3xTF32 operands split per use, ptxas (nvcc 13.0) took 255 registers and spilled at D = 64 with
// 32 or 16 (also with a register cap of 168: 200-400 bytes of spills); 8 needs 250-255 at D = 64
// and 149-159 at D = 32 without spills, at the price of re-reading the A operands per chunk.
constexpr int kChunk = 8;
constexpr int kNt = kChunk / 8;         // 8-wide n-tiles of S per chunk
constexpr int kThreads = mma::kThreads; // 4 warps

template <int D>
constexpr int smem_bytes() {
  return (4 * kRows * D + 2 * kRows) * 4;
}

struct Tf32Tiles {  // shared memory of one CTA
  float *q, *k, *v, *dout, *lse2, *delta;
};

// A operand (3xTF32 split) of k-chunk kc from this warp's 16 rows of a tile.
template <int D>
__device__ __forceinline__ void rows_a(const float* tile, int warp, int lane, int kc, uint32_t (&big)[4],
                                       uint32_t (&small)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const Coord c = mma::tf32_q(lane, kc, r);
    split_to(tile[mma::f32_smem_offset(16 * warp + c.row, c.col, D)], big[r], small[r]);
  }
}
// B operand of X Y^T: tile rows 8 nt .. 8 nt + 7 as the n dim, k-chunk kc over D (tf32_k).
template <int D>
__device__ __forceinline__ void rows_b(const float* tile, int lane, int nt, int kc, uint32_t (&big)[2],
                                       uint32_t (&small)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const Coord c = mma::tf32_k(lane, nt, kc, r);
    split_to(tile[mma::f32_smem_offset(c.row, c.col, D)], big[r], small[r]);
  }
}
// B operand of P Y: tile rows 8 kc .. 8 kc + 7 as the (permuted) k dim, d n-tile dt (tf32_v).
template <int D>
__device__ __forceinline__ void cols_b(const float* tile, int lane, int kc, int dt, uint32_t (&big)[2],
                                       uint32_t (&small)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const Coord c = mma::tf32_v(lane, kc, dt, r);
    split_to(tile[mma::f32_smem_offset(c.row, c.col, D)], big[r], small[r]);
  }
}
// A operand of an 8-column chunk of accumulators (P, P^T, dS, dS^T): no data movement.
__device__ __forceinline__ void acc_a(const float (&acc)[4], uint32_t (&big)[4], uint32_t (&small)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) split_to(acc[mma::tf32_p_elem(r)], big[r], small[r]);
}

// x += A1 B1^T and y += A2 B2^T for one chunk, 3xTF32 over D: A = this warp's 16 rows of tiles a1,
// a2; B = rows 8 nt0 .. 8 (nt0 + kNt) - 1 of tiles b1, b2 (the chunk's queries or keys).
template <int D>
__device__ __forceinline__ void chunk_products(const float* a1, const float* b1, const float* a2, const float* b2,
                                               int warp, int lane, int nt0, float (&x)[kNt][4],
                                               float (&y)[kNt][4]) {
  zero_chunk<kNt>(x, y);
#pragma unroll 1
  for (int kc = 0; kc < D / 8; ++kc) {
    uint32_t a1b[4], a1s[4], a2b[4], a2s[4];
    rows_a<D>(a1, warp, lane, kc, a1b, a1s);
    rows_a<D>(a2, warp, lane, kc, a2b, a2s);
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
      uint32_t b1b[2], b1s[2], b2b[2], b2s[2];
      rows_b<D>(b1, lane, nt0 + nt, kc, b1b, b1s);
      rows_b<D>(b2, lane, nt0 + nt, kc, b2b, b2s);
      mma_1688_3xtf32(x[nt], a1b, a1s, b1b, b1s);
      mma_1688_3xtf32(y[nt], a2b, a2s, b2b, b2s);
    }
  }
}

// acc += P Y, 3xTF32: P = the 8 columns of accumulators p (an n-tile of P^T, dS^T or dS) as the A
// operand, Y = rows 8 kc .. 8 kc + 7 of tile y (permuted as the A operand's k order) over D.
template <int D>
__device__ __forceinline__ void accumulate_chunk(const float (&p)[4], const float* y, int lane, int kc,
                                                 float (&acc)[D / 8][4]) {
  uint32_t pb[4], ps[4];
  acc_a(p, pb, ps);
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    uint32_t yb[2], ys[2];
    cols_b<D>(y, lane, kc, dt, yb, ys);
    mma_1688_3xtf32(acc[dt], pb, ps, yb, ys);
  }
}

// Key block, one tile of q_rows queries: the warp's keys key0 + 16 * warp .. + 15 (in k_s, v_s):
// per chunk S^T = K Q^T and dP^T = V dO^T, then P^T and dS^T in registers, dV += P^T dO and
// dK += dS^T Q (two passes over D rather than one: a fused loop had ptxas hoist both operands'
// loads for every d n-tile, 255 registers and spills at D = 64).
template <int D>
__device__ __forceinline__ void key_phase_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                               int q_rows, const Tf32Tiles& t, float (&dk)[D / 8][4],
                                               float (&dv)[D / 8][4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bool key_real[2];
  warp_key_flags(a, mask, key0, warp, lane, key_real);
  const int chunks = static_cast<int>(attn::ceil_div(q_rows, kChunk));
  for (int qc = 0; qc < chunks; ++qc) {
    float st[kNt][4], dpt[kNt][4];  // rows = keys, columns = queries kChunk qc ..
    chunk_products<D>(t.k, t.q, t.v, t.dout, warp, lane, kNt * qc, st, dpt);
    key_chunk_to_grads<kNt>(a, gate, key_real, kChunk * qc, lane, t.lse2, t.delta, st, dpt);
#pragma unroll
    for (int kc = 0; kc < kNt; ++kc) {  // 8-query chunks
      accumulate_chunk<D>(st[kc], t.dout, lane, kNt * qc + kc, dv);
      accumulate_chunk<D>(dpt[kc], t.q, lane, kNt * qc + kc, dk);
    }
  }
}

// Query block, one tile of k_rows keys key0 .. (in k_s, v_s): the warp's 16 queries (rows of the
// resident q_s, do_s; lse2_r, delta_r of its rows group and group + 8): per chunk S = Q K^T and
// dP = dO V^T, dS in registers, dQ += dS K.
template <int D>
__device__ __forceinline__ void query_phase_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                                 int k_rows, const Tf32Tiles& t, const float (&lse2_r)[2],
                                                 const float (&delta_r)[2], float (&dq)[D / 8][4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunks = static_cast<int>(attn::ceil_div(k_rows, kChunk));
  for (int kcnk = 0; kcnk < chunks; ++kcnk) {
    float s[kNt][4], dp[kNt][4];  // rows = queries, columns = keys kChunk kcnk ..
    chunk_products<D>(t.q, t.k, t.dout, t.v, warp, lane, kNt * kcnk, s, dp);
    query_chunk_to_grads<kNt>(a, mask, gate, key0 + kChunk * kcnk, lane, lse2_r, delta_r, s, dp);
#pragma unroll
    for (int kc = 0; kc < kNt; ++kc) accumulate_chunk<D>(s[kc], t.k, lane, kNt * kcnk + kc, dq);  // 8-key chunks
  }
}

// The key-block and query-block items of mma_backward_common.cuh with 64-row fp32 tiles; no
// operands are kept across tiles (register pressure: they are re-read and split per chunk).
template <int D>
struct Tf32Ops {
  using Elem = float;
  using Tiles = Tf32Tiles;
  static constexpr int kD = D;
  static constexpr int kRows = mma::kBlockM;
  static __device__ __forceinline__ void load(float* tile, const void* src, const attn::Strides& st, int b, int h,
                                              int row0, int rows) {
    load_tile_f32<D>(tile, bwd_rows<float>(src, st, b, h, row0), st.s, rows);
  }
  struct KeyFrags {};
  static __device__ __forceinline__ void load_key_frags(KeyFrags&, const Tf32Tiles&, int, int) {}
  static __device__ __forceinline__ void key_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                                  int q_rows, const Tf32Tiles& t, const KeyFrags&, float (&dk)[D / 8][4],
                                                  float (&dv)[D / 8][4]) {
    key_phase_tile<D>(a, mask, gate, key0, q_rows, t, dk, dv);
  }
  struct QueryFrags {};
  static __device__ __forceinline__ void load_query_frags(QueryFrags&, const Tf32Tiles&, int, int) {}
  static __device__ __forceinline__ void query_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                                    int k_rows, const Tf32Tiles& t, const QueryFrags&,
                                                    const float (&lse2_r)[2], const float (&delta_r)[2],
                                                    float (&dq)[D / 8][4]) {
    query_phase_tile<D>(a, mask, gate, key0, k_rows, t, lse2_r, delta_r, dq);
  }
};

// The kernel's work items, for walk_backward_items (mma_backward_common.cuh): the key blocks,
// then the query blocks of each active head.
template <int D>
struct Tf32BwdItem {
  static __device__ __forceinline__ void zero(const MmaBwdArgs& a, int b, int h) {
    zero_pruned_head<float, D, kThreads>(a, b, h);
  }
  static __device__ __forceinline__ void run(const MmaBwdArgs& a, int b, int h, float gate, int part,
                                             const Tf32Tiles& t) {
    backward_block<Tf32Ops<D>>(a, b, h, gate, part, t);
  }
};

template <int D>
__global__ void __launch_bounds__(kThreads) mma_backward_tf32_kernel(const MmaBwdArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800  // cp.async, m16n8k16: sm_80+ (never launched below)
  extern __shared__ __align__(128) float smem_f32[];
  Tf32Tiles t;
  t.q = smem_f32;
  t.k = t.q + kRows * D;
  t.v = t.k + kRows * D;
  t.dout = t.v + kRows * D;
  t.lse2 = t.dout + kRows * D;
  t.delta = t.lse2 + kRows;
  walk_backward_items<Tf32BwdItem<D>>(a, mma::bwd_items_per_head(a.q_len, a.kv_len, kRows), t);
#endif
}

template <int D>
void launch(const MmaBwdArgs& a, cudaStream_t stream) {
  // More than 48 KB of dynamic shared memory must be allowed per device: set on every launch
  // (a cheap driver call) so that a second GPU of the process gets it too.
  C10_CUDA_CHECK(cudaFuncSetAttribute(mma_backward_tf32_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      smem_bytes<D>()));
  static const int ctas_per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, mma_backward_tf32_kernel<D>, kThreads,
                                                                 smem_bytes<D>()));
    return n > 0 ? n : 1;
  }();
  const int64_t parts = mma::bwd_items_per_head(a.q_len, a.kv_len, kRows);
  const int64_t grid = mma::grid_size(static_cast<int64_t>(a.batch) * a.heads * parts, a.sm_count, ctas_per_sm);
  mma_backward_tf32_kernel<D><<<static_cast<unsigned>(grid), kThreads, smem_bytes<D>(), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_mma_backward_tf32(const MmaBwdArgs& a, cudaStream_t stream) {
  a.head_dim == 32 ? launch<32>(a, stream) : launch<64>(a, stream);
}

}  // namespace cuda_mma
}  // namespace sparsebert
