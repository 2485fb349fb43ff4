// What the two mma.sync backward kernels share (masked_attention_mma_bwd.cu: fp16/bf16,
// masked_attention_mma_bwd_tf32.cu: fp32 with 3xTF32): element conversion, the gate read, the
// zero-fill and stores of gradient slices, the per-row statistics (delta = dO . O and the lse),
// the element-wise step from S and dP to P and dS on a chunk of accumulators, and the persistent
// grid's walk over work items. The kernels differ in how they load tiles and multiply.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "masked_attention_mma.cuh"
#include "mma_ptx.cuh"
#include "sparsebert/attention_math.h"
#include "sparsebert/mma_layout.h"

namespace sparsebert {
namespace cuda_mma {

// Elements of the kernels' tensors (__half, __nv_bfloat16 or float) to float, and a pair of
// floats to two consecutive elements (one 4-byte store of 16-bit values, one 8-byte of fp32).
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}

template <typename T>
__device__ __forceinline__ void store_pair(T* p, float x, float y) {
  *reinterpret_cast<uint32_t*>(p) = pack2<T>(x, y);
}
template <>
__device__ __forceinline__ void store_pair<float>(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}

__device__ __forceinline__ float bwd_gate(const MmaBwdArgs& a, int b, int h) {
  return a.gate[b * a.gate_sb + h * a.gate_sh];
}

// The key padding mask of example b, or nullptr.
__device__ __forceinline__ const bool* bwd_mask(const MmaBwdArgs& a, int b) {
  return a.mask == nullptr ? nullptr : a.mask + static_cast<int64_t>(b) * a.kv_len;
}

// Head h of example b of a (B, S, H, D) input with element strides st, from row row0 on.
template <typename T>
__device__ __forceinline__ const T* bwd_rows(const void* base, const attn::Strides& st, int b, int h, int row0) {
  return static_cast<const T*>(base) + b * st.b + h * st.h + static_cast<int64_t>(row0) * st.s;
}

// Zero rows [0, rows) of head h of example b of a contiguous (B, rows, H, D) tensor, 16-byte
// stores by the CTA's kThreads threads.
template <typename T, int D, int kThreads>
__device__ __forceinline__ void zero_head(void* dst, int b, int h, int rows, int heads) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  constexpr int kU = D / kPer;
  T* base = static_cast<T*>(dst);
  const int64_t units = static_cast<int64_t>(rows) * kU;  // may pass 2^31 (int64, as the offsets)
  for (int64_t i = threadIdx.x; i < units; i += kThreads) {
    const int64_t off =
        attn::bshd_contiguous_offset(b, static_cast<int>(i / kU), h, rows, heads, D) + (i % kU) * kPer;
    *reinterpret_cast<uint4*>(base + off) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// A pruned head (gate 0): zero dQ, dK, dV slices and d_gate.
template <typename T, int D, int kThreads>
__device__ __forceinline__ void zero_pruned_head(const MmaBwdArgs& a, int b, int h) {
  zero_head<T, D, kThreads>(a.dq, b, h, a.q_len, a.heads);
  zero_head<T, D, kThreads>(a.dk, b, h, a.kv_len, a.heads);
  zero_head<T, D, kThreads>(a.dv, b, h, a.kv_len, a.heads);
  if (threadIdx.x == 0) a.d_gate[b * a.heads + h] = 0.0f;
}

// acc (C fragments of 16 rows starting at row0, D columns) * factor -> contiguous (B, S, H, D),
// rows >= seq skipped.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float factor, void* dst, int b, int h,
                                           int row0, int seq, int heads) {
  const int lane = threadIdx.x & 31;
  T* base = static_cast<T*>(dst);
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const mma::Coord c = mma::frag_c(lane, 2 * r);
      const int row = row0 + c.row;
      if (row < seq)
        store_pair<T>(base + attn::bshd_contiguous_offset(b, row, h, seq, heads, D) + dt * 8 + c.col,
                      acc[dt][2 * r] * factor, acc[dt][2 * r + 1] * factor);
    }
}

template <int D>
__device__ __forceinline__ void zero_acc(float (&acc)[D / 8][4]) {
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[dt][i] = 0.0f;
}

template <int kNt>
__device__ __forceinline__ void zero_chunk(float (&x)[kNt][4], float (&y)[kNt][4]) {
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) x[nt][i] = y[nt][i] = 0.0f;
}

// delta_i = dO_i . O_i and lse2_i (log2 domain) of query rows row0 .. row0 + blockDim.x / 2 - 1
// into shared memory (rows past q_len: delta 0, lse2 inf); two threads per row, each half of D
// in 16-byte loads, summed in a fixed order.
template <typename T, int D>
__device__ __forceinline__ void row_stats(const MmaBwdArgs& a, int b, int h, int row0, float* lse2_s,
                                          float* delta_s) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  const int local = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int row = row0 + local;
  float d = 0.0f;
  if (row < a.q_len) {
    const T* o = bwd_rows<T>(a.out, a.out_st, b, h, row) + half * (D / 2);
    const T* g = bwd_rows<T>(a.dout, a.dout_st, b, h, row) + half * (D / 2);
#pragma unroll
    for (int c = 0; c < D / 2; c += kPer) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + c);
      const uint4 gv = *reinterpret_cast<const uint4*>(g + c);
      const T* op = reinterpret_cast<const T*>(&ov);
      const T* gp = reinterpret_cast<const T*>(&gv);
#pragma unroll
      for (int e = 0; e < kPer; ++e) d = attn::delta_accumulate(d, to_float<T>(gp[e]), to_float<T>(op[e]));
    }
  }
  d += __shfl_xor_sync(0xffffffffu, d, 1);
  if (half == 0) {
    delta_s[local] = d;
    lse2_s[local] = row < a.q_len ? attn::lse_to_log2(a.lse[attn::bhs_index(b, h, row, a.heads, a.q_len)]) : INFINITY;
  }
}

// One warp: the sum of delta_s over kRows rows in a fixed order (every lane gets it).
template <int kRows>
__device__ __forceinline__ float block_delta_sum(const float* delta_s) {
  const int lane = threadIdx.x & 31;
  float s = 0.0f;
  for (int i = lane; i < kRows; i += 32) s += delta_s[i];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

// Whether this lane's two key rows (key0 + 16 * warp + group, + 8) are real keys.
__device__ __forceinline__ void warp_key_flags(const MmaBwdArgs& a, const bool* mask, int key0, int warp, int lane,
                                               bool (&real)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 16 * warp + mma::group_id(lane) + 8 * r;
    real[r] = key < a.kv_len && (mask == nullptr || mask[key]);
  }
}

// Key-block chunk: S^T, dP^T accumulators (rows = the warp's keys, flags key_real; columns =
// tile queries query0 + ...) -> P^T in st and dS^T = P^T (gate dP^T - delta) in dpt.
template <int kNt>
__device__ __forceinline__ void key_chunk_to_grads(const MmaBwdArgs& a, float gate, const bool (&key_real)[2],
                                                   int query0, int lane, const float* lse2_s, const float* delta_s,
                                                   float (&st)[kNt][4], float (&dpt)[kNt][4]) {
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int query = query0 + nt * 8 + mma::frag_c(lane, i).col;
      const float p = attn::backward_prob_approx(st[nt][i], a.scale_log2, lse2_s[query], key_real[i >> 1]);
      dpt[nt][i] = attn::backward_dscore(p, gate, dpt[nt][i], delta_s[query]);
      st[nt][i] = p;
    }
}

// Query-block chunk: S, dP accumulators (rows = the warp's queries with lse2_r, delta_r of rows
// group and group + 8; columns = keys key0 + ...) -> dS = P (gate dP - delta) in s.
template <int kNt>
__device__ __forceinline__ void query_chunk_to_grads(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                                     int lane, const float (&lse2_r)[2], const float (&delta_r)[2],
                                                     float (&s)[kNt][4], const float (&dp)[kNt][4]) {
  static_assert(kNt * 8 <= 32, "one 32-key word per chunk");
  const uint32_t real = real_key_word(mask, a.kv_len, key0);  // one ballot, a bit test per score
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float p = attn::backward_prob_approx(s[nt][i], a.scale_log2, lse2_r[i >> 1],
                                                 mma::frag_c_key_real(&real, lane, nt, i));
      s[nt][i] = attn::backward_dscore(p, gate, dp[nt][i], delta_r[i >> 1]);
    }
}

// lse2 and delta of this warp's query rows 16 * warp + {group, group + 8} of a resident tile.
__device__ __forceinline__ void warp_row_stats(const float* lse2_s, const float* delta_s, int warp, int lane,
                                               float (&lse2_r)[2], float (&delta_r)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = 16 * warp + mma::group_id(lane) + 8 * r;
    lse2_r[r] = lse2_s[row];
    delta_r[r] = delta_s[row];
  }
}

// The tiled work items, shared by the kernels: a kernel is described by a struct K with
//   K::Elem, K::kD, K::kRows          gradient element type, head dim, rows per tile and block;
//   K::Tiles                          shared-memory tiles q, k, v, dout and lse2, delta;
//   K::load(tile, src, st, b, h, row0, rows)      cp.async of rows row0 .. of a head into a tile;
//   K::KeyFrags, K::load_key_frags(f, t, warp, lane)
//                                     operands of the warp's keys kept across query tiles (may
//                                     be empty: the fp32 kernel re-reads them from shared memory);
//   K::key_tile(a, mask, gate, key0, q_rows, t, f, dk, dv)
//                                     one query tile into the warp's dK, dV accumulators;
//   K::QueryFrags, K::load_query_frags(f, t, warp, lane), and
//   K::query_tile(a, mask, gate, key0, k_rows, t, f, lse2_r, delta_r, dq) likewise for dQ.

// Key-block item: keys k0 .. k0 + kRows - 1 resident (dK, dV in registers), all queries streamed
// one tile at a time (each tile's load overlaps its row statistics). Block 0 also writes d_gate:
// its query walk visits every delta once, in a fixed order.
template <typename K>
__device__ __forceinline__ void backward_key_block(const MmaBwdArgs& a, int b, int h, float gate, int block,
                                                   const typename K::Tiles& t) {
  constexpr int D = K::kD, kRows = K::kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k0 = block * kRows, k_rows = min(kRows, a.kv_len - k0);
  const bool* mask = bwd_mask(a, b);
  const bool warp_has_keys = 16 * warp < k_rows;
  K::load(t.k, a.k, a.k_st, b, h, k0, k_rows);
  K::load(t.v, a.v, a.v_st, b, h, k0, k_rows);
  typename K::KeyFrags frags;
  float dk[D / 8][4], dv[D / 8][4];
  zero_acc<D>(dk);
  zero_acc<D>(dv);
  float delta_sum = 0.0f;
  const int q_blocks = mma::bwd_blocks(a.q_len, kRows);
  for (int qb = 0; qb < q_blocks; ++qb) {
    const int q0 = qb * kRows, q_rows = min(kRows, a.q_len - q0);
    if (qb > 0) __syncthreads();  // every warp is done with the previous query tile
    K::load(t.q, a.q, a.q_st, b, h, q0, q_rows);
    K::load(t.dout, a.dout, a.dout_st, b, h, q0, q_rows);
    cp_async_commit();
    row_stats<typename K::Elem, D>(a, b, h, q0, t.lse2, t.delta);
    cp_async_wait<0>();
    __syncthreads();
    if (qb == 0 && warp_has_keys) K::load_key_frags(frags, t, warp, lane);
    if (block == 0 && warp == 0) delta_sum += block_delta_sum<kRows>(t.delta);
    if (warp_has_keys) K::key_tile(a, mask, gate, k0, q_rows, t, frags, dk, dv);
  }
  if (block == 0 && warp == 0 && lane == 0) a.d_gate[b * a.heads + h] = delta_sum / gate;
  if (warp_has_keys) {
    store_rows<typename K::Elem, D>(dk, a.scale, a.dk, b, h, k0 + 16 * warp, a.kv_len, a.heads);
    store_rows<typename K::Elem, D>(dv, gate, a.dv, b, h, k0 + 16 * warp, a.kv_len, a.heads);
  }
}

// Query-block item: queries q0 .. q0 + kRows - 1 resident with their statistics (dQ in
// registers), all keys streamed one tile at a time.
template <typename K>
__device__ __forceinline__ void backward_query_block(const MmaBwdArgs& a, int b, int h, float gate, int block,
                                                     const typename K::Tiles& t) {
  constexpr int D = K::kD, kRows = K::kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q0 = block * kRows, q_rows = min(kRows, a.q_len - q0);
  const bool* mask = bwd_mask(a, b);
  const bool warp_has_queries = 16 * warp < q_rows;
  K::load(t.q, a.q, a.q_st, b, h, q0, q_rows);
  K::load(t.dout, a.dout, a.dout_st, b, h, q0, q_rows);
  typename K::QueryFrags frags;
  float lse2_r[2], delta_r[2];
  float dq[D / 8][4];
  zero_acc<D>(dq);
  const int k_blocks = mma::bwd_blocks(a.kv_len, kRows);
  for (int kb = 0; kb < k_blocks; ++kb) {
    const int k0 = kb * kRows, k_rows = min(kRows, a.kv_len - k0);
    if (kb > 0) __syncthreads();  // every warp is done with the previous key tile
    K::load(t.k, a.k, a.k_st, b, h, k0, k_rows);
    K::load(t.v, a.v, a.v_st, b, h, k0, k_rows);
    cp_async_commit();
    if (kb == 0) row_stats<typename K::Elem, D>(a, b, h, q0, t.lse2, t.delta);
    cp_async_wait<0>();
    __syncthreads();
    if (kb == 0 && warp_has_queries) {
      K::load_query_frags(frags, t, warp, lane);
      warp_row_stats(t.lse2, t.delta, warp, lane, lse2_r, delta_r);
    }
    if (warp_has_queries) K::query_tile(a, mask, gate, k0, k_rows, t, frags, lse2_r, delta_r, dq);
  }
  if (warp_has_queries) store_rows<typename K::Elem, D>(dq, a.scale, a.dq, b, h, q0 + 16 * warp, a.q_len, a.heads);
}

// The tiled items of a head: its key blocks, then its query blocks.
template <typename K>
__device__ __forceinline__ void backward_block(const MmaBwdArgs& a, int b, int h, float gate, int part,
                                               const typename K::Tiles& t) {
  const int key_blocks = mma::bwd_blocks(a.kv_len, K::kRows);
  if (part < key_blocks) {
    backward_key_block<K>(a, b, h, gate, part, t);
  } else {
    backward_query_block<K>(a, b, h, gate, part - key_blocks, t);
  }
}

// The persistent grid: step 0 zero-fills the gradients of pruned heads (Item::zero(a, b, h)),
// then every CTA walks the work items (active (b, h), part < parts) in increasing order and runs
// Item::run(a, b, h, gate, part, tiles). (Static functions rather than lambdas, as in the
// forward: ptxas allocates registers differently with lambdas.)
template <typename Item, typename Tiles>
__device__ __forceinline__ void walk_backward_items(const MmaBwdArgs& a, int parts, const Tiles& tiles) {
  const int entries = a.batch * a.heads;
  for (int bh = blockIdx.x; bh < entries; bh += gridDim.x) {
    const int b = bh / a.heads, h = bh % a.heads;
    if (bwd_gate(a, b, h) == 0.0f) Item::zero(a, b, h);
  }
  mma::ActiveCursor cursor;
  GateChunks chunks{a.gate, static_cast<int>(a.gate_sb), static_cast<int>(a.gate_sh), a.heads, entries};
  for (int w = blockIdx.x;; w += gridDim.x) {
    const int act = mma::item_active(w, parts), part = mma::item_tile(w, parts);
    const int entry = mma::find_active(cursor, act, entries, chunks);
    if (entry < 0) break;
    const int b = entry / a.heads, h = entry % a.heads;
    __syncthreads();  // the previous item's shared-memory reads are done
    Item::run(a, b, h, bwd_gate(a, b, h), part, tiles);
  }
}

}  // namespace cuda_mma
}  // namespace sparsebert
