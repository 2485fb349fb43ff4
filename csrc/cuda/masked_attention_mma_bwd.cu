// masked_attention backward on tensor cores with mma.sync, one launch, for fp16/bf16 and D in
// {32, 64}, any query and key lengths. The default where it applies (masked_attention.cu); like
// the mma forward it is replayed on the CPU (csrc/tests/test_mma_layout.cpp) and passed the CUDA
// tests on an H200.
//
// With P = exp(scale q k^T - lse), dP_raw = dO v^T, delta_i = dO_i . O_i:
//   dS = P (gate dP_raw - delta),  dQ = scale dS K,  dK = scale dS^T Q,  dV = gate P^T dO,
//   d_gate[b, h] = sum_i delta_i / gate  (= sum ctx . dO, the importance signal).
// CTAs of 8 warps walk the work items of the active (b, h) (persistent grid, the forward's ballot
// walk over the gate).
// S <= 128: one item per head.
//   Step 1: Q, K, V, dO -> swizzled shared memory (cp.async); delta and lse (log2 domain) per row;
//           d_gate from the deltas in a fixed order (deterministic).
//   Step 2: warp w owns keys 16w..16w+15: S^T = K Q^T and dP^T = V dO^T per 32-query chunk, P^T
//           and dS^T in registers, then dV += P^T dO and dK += dS^T Q with P^T, dS^T re-labelled as
//           A fragments; dK, dV written once.
//   Step 3: warp w owns queries 16w..16w+15: S = Q K^T, dP = dO V^T per 32-key chunk, dS in
//           registers, dQ += dS K; dQ written once (no atomics, no fp32 buffer, no memset).
// Longer S: per head, one item per 128-key block (step 2 with the queries streamed through shared
// memory 128 rows at a time, delta recomputed per tile) and one per 128-query block (step 3 with
// the keys streamed). S and dP are computed twice, as for S <= 128, in exchange for no dQ atomics:
// every gradient element has one writer, and d_gate is summed by key block 0 in a fixed order.
// Pruned heads: their dQ, dK, dV slices are zero-filled and d_gate is 0, nothing else is read.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
constexpr int kRows = mma::kBwdMaxSeq;  // 128 rows per shared tile (and per block of long S)
constexpr int kChunk = mma::kBwdChunk;  // 32 queries (phase 1) or keys (phase 2) per step
constexpr int kNt = kChunk / 8;
constexpr int kThreads = mma::kBwdThreads;

// Shared-memory tiles of one CTA: Q, K, V, dO as swizzled [128][D], lse2 and delta of 128 rows.
struct BwdTiles {
  uint16_t *q, *k, *v, *dout;
  float *lse2, *delta;
};

template <typename T, int D>
__device__ __forceinline__ void load_rows_tile(uint16_t* tile, const void* src, const attn::Strides& st, int b, int h,
                                               int row0, int rows) {
  load_tile_async<D, kRows, kThreads>(tile, reinterpret_cast<const uint16_t*>(bwd_rows<T>(src, st, b, h, row0)),
                                      st.s, rows);
}

// Rows of a 128-row tile in shared memory (16 * warp + ...) -> A fragments over D.
template <int D>
__device__ __forceinline__ void load_row_frags(const uint16_t* tile, int warp, int lane, uint32_t (&f)[D / 16][4]) {
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    const Coord c = mma::ldsm_q(lane, kc);
    ldmatrix_x4(f[kc], smem_u32(tile + mma::smem_offset(16 * warp + c.row, c.col, D)));
  }
}

// x += A1 B1^T and y += A2 B2^T for one 32-row chunk: A = the warp's A fragments a1, a2 (its 16
// rows over D), B = rows 32 chunk .. 32 chunk + 31 of tiles b1, b2 (the chunk's queries or keys).
template <typename T, int D>
__device__ __forceinline__ void chunk_products(const uint32_t (&a1)[D / 16][4], const uint16_t* b1,
                                               const uint32_t (&a2)[D / 16][4], const uint16_t* b2, int lane,
                                               int chunk, float (&x)[kNt][4], float (&y)[kNt][4]) {
  zero_chunk<kNt>(x, y);
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
    for (int p = 0; p < kNt / 2; ++p) {
      const Coord c = mma::ldsm_k(lane, (kChunk / 16) * chunk + p, kc);
      uint32_t f1[4], f2[4];
      ldmatrix_x4(f1, smem_u32(b1 + mma::smem_offset(c.row, c.col, D)));
      ldmatrix_x4(f2, smem_u32(b2 + mma::smem_offset(c.row, c.col, D)));
      mma_16816<T>(x[2 * p], a1[kc], f1[0], f1[1]);
      mma_16816<T>(x[2 * p + 1], a1[kc], f1[2], f1[3]);
      mma_16816<T>(y[2 * p], a2[kc], f2[0], f2[1]);
      mma_16816<T>(y[2 * p + 1], a2[kc], f2[2], f2[3]);
    }
}

// 16-column chunk kc of a chunk's accumulators (P^T, dS^T or dS) re-labelled as an A fragment.
template <typename T>
__device__ __forceinline__ void acc_to_a(const float (&acc)[kNt][4], int kc, uint32_t (&f)[4]) {
#pragma unroll
  for (int reg = 0; reg < 4; ++reg) {
    const int nt = mma::p_ntile(kc, reg), e = 2 * mma::p_pair(reg);
    f[reg] = pack2<T>(acc[nt][e], acc[nt][e + 1]);
  }
}

// acc += P Y over D: P = the A fragment of one 16-row chunk, Y = rows 16 ky .. 16 ky + 15 of
// tile y (ldmatrix .trans).
template <typename T, int D>
__device__ __forceinline__ void accumulate_chunk(const uint32_t (&p)[4], const uint16_t* y, int lane, int ky,
                                                 float (&acc)[D / 8][4]) {
#pragma unroll
  for (int pt = 0; pt < D / 16; ++pt) {
    const Coord c = mma::ldsm_v(lane, ky, pt);
    uint32_t f[4];
    ldmatrix_x4_trans(f, smem_u32(y + mma::smem_offset(c.row, c.col, D)));
    mma_16816<T>(acc[2 * pt], p, f[0], f[1]);
    mma_16816<T>(acc[2 * pt + 1], p, f[2], f[3]);
  }
}

// Phase 1 on one tile of queries: the warp's keys key0 + 16 * warp .. + 15 (A fragments kf, vf of
// the K, V tile) against the q_rows queries in q_s / do_s (with lse2_s, delta_s of those rows):
// S^T = K Q^T and dP^T = V dO^T per 32-query chunk, P^T and dS^T in registers, then dV += P^T dO
// and dK += dS^T Q with P^T, dS^T re-labelled as A fragments.
template <typename T, int D>
__device__ __forceinline__ void key_phase_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                               int q_rows, const BwdTiles& t, const uint32_t (&kf)[D / 16][4],
                                               const uint32_t (&vf)[D / 16][4], float (&dk)[D / 8][4],
                                               float (&dv)[D / 8][4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bool key_real[2];
  warp_key_flags(a, mask, key0, warp, lane, key_real);
  const int chunks = static_cast<int>(attn::ceil_div(q_rows, kChunk));
  for (int qc = 0; qc < chunks; ++qc) {
    float st[kNt][4], dpt[kNt][4];  // rows = keys, columns = queries 32 qc ..
    chunk_products<T, D>(kf, t.q, vf, t.dout, lane, qc, st, dpt);
    key_chunk_to_grads<kNt>(a, gate, key_real, kChunk * qc, lane, t.lse2, t.delta, st, dpt);
#pragma unroll
    for (int kc = 0; kc < kChunk / 16; ++kc) {
      uint32_t pa[4], da[4];
      acc_to_a<T>(st, kc, pa);
      acc_to_a<T>(dpt, kc, da);
      accumulate_chunk<T, D>(pa, t.dout, lane, (kChunk / 16) * qc + kc, dv);
      accumulate_chunk<T, D>(da, t.q, lane, (kChunk / 16) * qc + kc, dk);
    }
  }
}

// Phase 2 on one tile of keys: the warp's 16 queries (A fragments qf, of; lse2_r, delta_r of its
// rows group and group + 8) against keys key0 .. key0 + k_rows - 1 in k_s / v_s: S = Q K^T,
// dP = dO V^T per 32-key chunk, dS in registers, dQ += dS K.
template <typename T, int D>
__device__ __forceinline__ void query_phase_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                                 int k_rows, const BwdTiles& t, const uint32_t (&qf)[D / 16][4],
                                                 const uint32_t (&of)[D / 16][4], const float (&lse2_r)[2],
                                                 const float (&delta_r)[2], float (&dq)[D / 8][4]) {
  const int lane = threadIdx.x & 31;
  const int chunks = static_cast<int>(attn::ceil_div(k_rows, kChunk));
  for (int kcnk = 0; kcnk < chunks; ++kcnk) {
    float s[kNt][4], dp[kNt][4];  // rows = queries, columns = keys 32 kcnk ..
    chunk_products<T, D>(qf, t.k, of, t.v, lane, kcnk, s, dp);
    query_chunk_to_grads<kNt>(a, mask, gate, key0 + kChunk * kcnk, lane, lse2_r, delta_r, s, dp);
#pragma unroll
    for (int kc = 0; kc < kChunk / 16; ++kc) {
      uint32_t da[4];
      acc_to_a<T>(s, kc, da);
      accumulate_chunk<T, D>(da, t.k, lane, (kChunk / 16) * kcnk + kc, dq);
    }
  }
}

// S <= 128: one CTA does the whole (b, h).
template <typename T, int D>
__device__ __forceinline__ void backward_head(const MmaBwdArgs& a, int b, int h, float gate, const BwdTiles& t) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sq = a.q_len, sk = a.kv_len;

  // Step 1: tiles, then delta, lse2 and d_gate.
  load_rows_tile<T, D>(t.q, a.q, a.q_st, b, h, 0, sq);
  load_rows_tile<T, D>(t.k, a.k, a.k_st, b, h, 0, sk);
  load_rows_tile<T, D>(t.v, a.v, a.v_st, b, h, 0, sk);
  load_rows_tile<T, D>(t.dout, a.dout, a.dout_st, b, h, 0, sq);
  cp_async_commit();
  row_stats<T, D>(a, b, h, 0, t.lse2, t.delta);
  cp_async_wait<0>();
  __syncthreads();
  if (warp == 0) {  // d_gate = sum_i delta_i / gate, in a fixed order
    const float s = block_delta_sum<kRows>(t.delta);
    if (lane == 0) a.d_gate[b * a.heads + h] = s / gate;
  }
  const bool* mask = bwd_mask(a, b);

  // Step 2: dK, dV for keys 16w .. 16w + 15.
  if (16 * warp < sk) {
    uint32_t kf[D / 16][4], vf[D / 16][4];
    load_row_frags<D>(t.k, warp, lane, kf);
    load_row_frags<D>(t.v, warp, lane, vf);
    float dk[D / 8][4], dv[D / 8][4];
    zero_acc<D>(dk);
    zero_acc<D>(dv);
    key_phase_tile<T, D>(a, mask, gate, 0, sq, t, kf, vf, dk, dv);
    store_rows<T, D>(dk, a.scale, a.dk, b, h, 16 * warp, sk, a.heads);
    store_rows<T, D>(dv, gate, a.dv, b, h, 16 * warp, sk, a.heads);
  }

  // Step 3: dQ for queries 16w .. 16w + 15.
  if (16 * warp < sq) {
    uint32_t qf[D / 16][4], of[D / 16][4];
    load_row_frags<D>(t.q, warp, lane, qf);
    load_row_frags<D>(t.dout, warp, lane, of);
    float lse2_r[2], delta_r[2];
    warp_row_stats(t.lse2, t.delta, warp, lane, lse2_r, delta_r);
    float dq[D / 8][4];
    zero_acc<D>(dq);
    query_phase_tile<T, D>(a, mask, gate, 0, sk, t, qf, of, lse2_r, delta_r, dq);
    store_rows<T, D>(dq, a.scale, a.dq, b, h, 16 * warp, sq, a.heads);
  }
}

// S > 128: the key-block and query-block items of mma_backward_common.cuh with 128-row tiles;
// the warp's A fragments (K, V or Q, dO) are loaded once per item by ldmatrix and kept.
template <typename T, int D>
struct TiledOps {
  using Elem = T;
  using Tiles = BwdTiles;
  static constexpr int kD = D;
  static constexpr int kRows = mma::kBwdMaxSeq;
  static __device__ __forceinline__ void load(uint16_t* tile, const void* src, const attn::Strides& st, int b, int h,
                                              int row0, int rows) {
    load_rows_tile<T, D>(tile, src, st, b, h, row0, rows);
  }
  struct KeyFrags {
    uint32_t k[D / 16][4], v[D / 16][4];
  };
  static __device__ __forceinline__ void load_key_frags(KeyFrags& f, const BwdTiles& t, int warp, int lane) {
    load_row_frags<D>(t.k, warp, lane, f.k);
    load_row_frags<D>(t.v, warp, lane, f.v);
  }
  static __device__ __forceinline__ void key_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                                  int q_rows, const BwdTiles& t, const KeyFrags& f,
                                                  float (&dk)[D / 8][4], float (&dv)[D / 8][4]) {
    key_phase_tile<T, D>(a, mask, gate, key0, q_rows, t, f.k, f.v, dk, dv);
  }
  struct QueryFrags {
    uint32_t q[D / 16][4], o[D / 16][4];
  };
  static __device__ __forceinline__ void load_query_frags(QueryFrags& f, const BwdTiles& t, int warp, int lane) {
    load_row_frags<D>(t.q, warp, lane, f.q);
    load_row_frags<D>(t.dout, warp, lane, f.o);
  }
  static __device__ __forceinline__ void query_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                                    int k_rows, const BwdTiles& t, const QueryFrags& f,
                                                    const float (&lse2_r)[2], const float (&delta_r)[2],
                                                    float (&dq)[D / 8][4]) {
    query_phase_tile<T, D>(a, mask, gate, key0, k_rows, t, f.q, f.o, lse2_r, delta_r, dq);
  }
};

template <int D>
constexpr int smem_bytes() {
  return 4 * kRows * D * 2 + 2 * kRows * 4;
}

// The kernel's work items, for walk_backward_items (mma_backward_common.cuh). kTiled = false:
// Sq, Sk <= 128, one item per head (backward_head); true: the key-block and query-block items.
template <typename T, int D, bool kTiled>
struct BwdItem {
  static __device__ __forceinline__ void zero(const MmaBwdArgs& a, int b, int h) {
    zero_pruned_head<T, D, kThreads>(a, b, h);
  }
  static __device__ __forceinline__ void run(const MmaBwdArgs& a, int b, int h, float gate, int part,
                                             const BwdTiles& t) {
    if (kTiled) {
      backward_block<TiledOps<T, D>>(a, b, h, gate, part, t);
    } else {
      backward_head<T, D>(a, b, h, gate, t);
    }
  }
};

// Two instantiations (kTiled) so that the short kernel keeps its own (lower) register
// allocation: inlining both paths into one kernel raised D = 32 from 128 to 169 registers. The
// tiled one has a hint of 1 CTA per SM: without it ptxas (nvcc 13.0, sm_90) capped D = 32 at 128
// registers and spilled 60 bytes; with the hint on both, the short D = 32 kernel took 142.
template <typename T, int D, bool kTiled>
__global__ void __launch_bounds__(kThreads, kTiled ? 1 : 0) mma_backward_kernel(const MmaBwdArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800  // cp.async, m16n8k16: sm_80+ (never launched below)
  extern __shared__ __align__(128) uint8_t smem[];
  BwdTiles t;
  t.q = reinterpret_cast<uint16_t*>(smem);
  t.k = t.q + kRows * D;
  t.v = t.k + kRows * D;
  t.dout = t.v + kRows * D;
  t.lse2 = reinterpret_cast<float*>(t.dout + kRows * D);
  t.delta = t.lse2 + kRows;
  const int parts = kTiled ? mma::bwd_items_per_head(a.q_len, a.kv_len, kRows) : 1;
  walk_backward_items<BwdItem<T, D, kTiled>>(a, parts, t);
#endif
}

template <typename T, int D, bool kTiled>
void launch_kernel(const MmaBwdArgs& a, cudaStream_t stream) {
  // More than 48 KB of dynamic shared memory must be allowed per device: set on every launch
  // (a cheap driver call) so that a second GPU of the process gets it too.
  C10_CUDA_CHECK(cudaFuncSetAttribute(mma_backward_kernel<T, D, kTiled>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<D>()));
  static const int ctas_per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, mma_backward_kernel<T, D, kTiled>,
                                                                 kThreads, smem_bytes<D>()));
    return n > 0 ? n : 1;
  }();
  const int64_t parts = kTiled ? mma::bwd_items_per_head(a.q_len, a.kv_len) : 1;
  const int64_t grid = mma::grid_size(static_cast<int64_t>(a.batch) * a.heads * parts, a.sm_count, ctas_per_sm);
  mma_backward_kernel<T, D, kTiled>
      <<<static_cast<unsigned>(grid), kThreads, smem_bytes<D>(), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch(const MmaBwdArgs& a, cudaStream_t stream) {
  if (a.q_len > kRows || a.kv_len > kRows) {
    launch_kernel<T, D, true>(a, stream);
  } else {
    launch_kernel<T, D, false>(a, stream);
  }
}

}  // namespace

void launch_mma_backward(bool bf16, const MmaBwdArgs& a, cudaStream_t stream) {
  if (bf16) {
    a.head_dim == 32 ? launch<__nv_bfloat16, 32>(a, stream) : launch<__nv_bfloat16, 64>(a, stream);
  } else {
    a.head_dim == 32 ? launch<__half, 32>(a, stream) : launch<__half, 64>(a, stream);
  }
}

}  // namespace cuda_mma
}  // namespace sparsebert
