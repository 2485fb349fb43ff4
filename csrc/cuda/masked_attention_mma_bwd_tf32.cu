// masked_attention backward for fp32 inputs on tensor cores: 3xTF32 with mma.sync m16n8k8, D in
// {32, 64}, any query and key lengths, one launch. Selected only with
// SPARSEBERT_ATTENTION_KERNEL=mma (masked_attention.cu), next to the 3xTF32 forward
// (masked_attention_mma_tf32.cu) whose fragment sources and P re-labelling it reuses: this kernel
// has been compiled for sm_80/sm_90 and replayed lane by lane on the CPU
// (csrc/tests/test_mma_layout.cpp), but it has NOT yet run on a GPU.
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
// 32 or 16 (also with a register cap of 168: 200-400 bytes of spills); 8 needs 248-255 at D = 64
// and 149-159 at D = 32 without spills, at the price of re-reading the A operands per chunk.
constexpr int kChunk = 8;
constexpr int kNt = kChunk / 8;         // 8-wide n-tiles of S per chunk
constexpr int kThreads = mma::kThreads; // 4 warps

template <int D>
constexpr int smem_bytes() {
  return (4 * kRows * D + 2 * kRows) * 4;
}

struct Tiles {  // shared memory of one CTA
  float *q, *k, *v, *dout, *lse2, *delta;
};

__device__ __forceinline__ float gate_of(const MmaBwdArgs& a, int b, int h) {
  return a.gate[b * a.gate_sb + h * a.gate_sh];
}

__device__ __forceinline__ const float* head_rows(const void* base, const attn::Strides& st, int b, int h, int row0) {
  return static_cast<const float*>(base) + b * st.b + h * st.h + static_cast<int64_t>(row0) * st.s;
}

// Zero rows [0, rows) of head h of example b of a contiguous (B, rows, H, D) fp32 tensor.
template <int D>
__device__ __forceinline__ void zero_head(void* dst, int b, int h, int rows, int heads) {
  constexpr int kU = D / 4;
  float* base = static_cast<float*>(dst);
  for (int i = threadIdx.x; i < rows * kU; i += kThreads) {
    const int64_t off = attn::bshd_contiguous_offset(b, i / kU, h, rows, heads, D) + (i % kU) * 4;
    *reinterpret_cast<float4*>(base + off) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// acc (C fragments of 16 rows starting at row0, D columns) * factor -> contiguous (B, S, H, D)
// fp32, rows >= seq skipped; 8-byte stores of the accumulator pairs.
template <int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float factor, void* dst, int b, int h,
                                           int row0, int seq, int heads) {
  const int lane = threadIdx.x & 31;
  float* base = static_cast<float*>(dst);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const Coord c = mma::frag_c(lane, 2 * r);
    const int row = row0 + c.row;
    if (row >= seq) continue;
    float* out = base + attn::bshd_contiguous_offset(b, row, h, seq, heads, D) + c.col;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<float2*>(out + dt * 8) = make_float2(acc[dt][2 * r] * factor, acc[dt][2 * r + 1] * factor);
  }
}

template <int D>
__device__ __forceinline__ void zero_acc(float (&acc)[D / 8][4]) {
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[dt][i] = 0.0f;
}

// delta_i = dO_i . O_i and lse2_i (log2 domain) of query rows row0 .. row0 + 63 into shared
// memory (rows past q_len: delta 0, lse2 inf), two threads per row.
template <int D>
__device__ __forceinline__ void row_stats(const MmaBwdArgs& a, int b, int h, int row0, float* lse2_s,
                                          float* delta_s) {
  const int local = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int row = row0 + local;
  float d = 0.0f;
  if (row < a.q_len) {
    const float* o = head_rows(a.out, a.out_st, b, h, row) + half * (D / 2);
    const float* g = head_rows(a.dout, a.dout_st, b, h, row) + half * (D / 2);
#pragma unroll
    for (int c = 0; c < D / 2; c += 4) {
      const float4 ov = *reinterpret_cast<const float4*>(o + c);
      const float4 gv = *reinterpret_cast<const float4*>(g + c);
      d = attn::delta_accumulate(d, gv.x, ov.x);
      d = attn::delta_accumulate(d, gv.y, ov.y);
      d = attn::delta_accumulate(d, gv.z, ov.z);
      d = attn::delta_accumulate(d, gv.w, ov.w);
    }
  }
  d += __shfl_xor_sync(0xffffffffu, d, 1);
  if (half == 0) {
    delta_s[local] = d;
    lse2_s[local] = row < a.q_len ? attn::lse_to_log2(a.lse[attn::bhs_index(b, h, row, a.heads, a.q_len)]) : INFINITY;
  }
}

// Warp 0: the sum of delta_s over the block's 64 rows in a fixed order (every lane gets it).
__device__ __forceinline__ float block_delta_sum(const float* delta_s) {
  const int lane = threadIdx.x & 31;
  float s = delta_s[lane] + delta_s[lane + 32];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

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

// Key block, one tile of q_rows queries: the warp's keys key0 + 16 * warp .. + 15 (in k_s, v_s).
template <int D>
__device__ __forceinline__ void key_phase_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                               int q_rows, const Tiles& t, float (&dk)[D / 8][4],
                                               float (&dv)[D / 8][4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bool key_real[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 16 * warp + mma::group_id(lane) + 8 * r;
    key_real[r] = key < a.kv_len && (mask == nullptr || mask[key]);
  }
  const int chunks = static_cast<int>(attn::ceil_div(q_rows, kChunk));
  for (int qc = 0; qc < chunks; ++qc) {
    float st[kNt][4], dpt[kNt][4];  // rows = keys, columns = queries 32 qc ..
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) st[nt][i] = dpt[nt][i] = 0.0f;
#pragma unroll 1
    for (int kc = 0; kc < D / 8; ++kc) {
      uint32_t kb[4], ks[4], vb[4], vs[4];
      rows_a<D>(t.k, warp, lane, kc, kb, ks);
      rows_a<D>(t.v, warp, lane, kc, vb, vs);
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
        uint32_t qb[2], qs[2], ob[2], os[2];
        rows_b<D>(t.q, lane, kNt * qc + nt, kc, qb, qs);
        rows_b<D>(t.dout, lane, kNt * qc + nt, kc, ob, os);
        mma_1688_3xtf32(st[nt], kb, ks, qb, qs);
        mma_1688_3xtf32(dpt[nt], vb, vs, ob, os);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int query = kChunk * qc + nt * 8 + mma::frag_c(lane, i).col;
        const float s2 = key_real[i >> 1] ? st[nt][i] * a.scale_log2 : attn::neg_inf();
        const float p = attn::backward_prob(s2, t.lse2[query]);
        dpt[nt][i] = attn::backward_dscore(p, gate, dpt[nt][i], t.delta[query]);
        st[nt][i] = p;
      }
#pragma unroll
    for (int kc = 0; kc < kNt; ++kc) {  // 8-query chunks of this 32-query chunk
      uint32_t pb[4], ps[4], db[4], ds[4];
      acc_a(st[kc], pb, ps);
      acc_a(dpt[kc], db, ds);
      // Two loops rather than one: a fused loop had ptxas hoist both operands' loads for every
      // d n-tile (255 registers and spills at D = 64).
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t ob[2], os[2];
        cols_b<D>(t.dout, lane, kNt * qc + kc, dt, ob, os);
        mma_1688_3xtf32(dv[dt], pb, ps, ob, os);
      }
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t qb[2], qs[2];
        cols_b<D>(t.q, lane, kNt * qc + kc, dt, qb, qs);
        mma_1688_3xtf32(dk[dt], db, ds, qb, qs);
      }
    }
  }
}

// Query block, one tile of k_rows keys key0 .. (in k_s, v_s): the warp's 16 queries (rows of the
// resident q_s, do_s; lse2_r, delta_r of its rows group and group + 8).
template <int D>
__device__ __forceinline__ void query_phase_tile(const MmaBwdArgs& a, const bool* mask, float gate, int key0,
                                                 int k_rows, const Tiles& t, const float (&lse2_r)[2],
                                                 const float (&delta_r)[2], float (&dq)[D / 8][4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunks = static_cast<int>(attn::ceil_div(k_rows, kChunk));
  for (int kcnk = 0; kcnk < chunks; ++kcnk) {
    float s[kNt][4], dp[kNt][4];  // rows = queries, columns = keys 32 kcnk ..
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = dp[nt][i] = 0.0f;
#pragma unroll 1
    for (int kc = 0; kc < D / 8; ++kc) {
      uint32_t qb[4], qs[4], ob[4], os[4];
      rows_a<D>(t.q, warp, lane, kc, qb, qs);
      rows_a<D>(t.dout, warp, lane, kc, ob, os);
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
        uint32_t kb[2], ks[2], vb[2], vs[2];
        rows_b<D>(t.k, lane, kNt * kcnk + nt, kc, kb, ks);
        rows_b<D>(t.v, lane, kNt * kcnk + nt, kc, vb, vs);
        mma_1688_3xtf32(s[nt], qb, qs, kb, ks);
        mma_1688_3xtf32(dp[nt], ob, os, vb, vs);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = key0 + kChunk * kcnk + nt * 8 + mma::frag_c(lane, i).col;
        const bool real = key < a.kv_len && (mask == nullptr || mask[key]);
        const float s2 = real ? s[nt][i] * a.scale_log2 : attn::neg_inf();
        const float p = attn::backward_prob(s2, lse2_r[i >> 1]);
        s[nt][i] = attn::backward_dscore(p, gate, dp[nt][i], delta_r[i >> 1]);
      }
#pragma unroll
    for (int kc = 0; kc < kNt; ++kc) {  // 8-key chunks of this 32-key chunk
      uint32_t db[4], ds[4];
      acc_a(s[kc], db, ds);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t kb[2], ks[2];
        cols_b<D>(t.k, lane, kNt * kcnk + kc, dt, kb, ks);
        mma_1688_3xtf32(dq[dt], db, ds, kb, ks);
      }
    }
  }
}

// Key-block item: keys k0 .. k0 + 63 resident, all queries streamed 64 rows at a time. Block 0
// also writes d_gate.
template <int D>
__device__ __forceinline__ void backward_key_block(const MmaBwdArgs& a, int b, int h, float gate, int block,
                                                   const Tiles& t) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k0 = block * kRows, k_rows = min(kRows, a.kv_len - k0);
  const bool* mask = a.mask == nullptr ? nullptr : a.mask + static_cast<int64_t>(b) * a.kv_len;
  const bool warp_has_keys = 16 * warp < k_rows;
  load_tile_f32<D>(t.k, head_rows(a.k, a.k_st, b, h, k0), a.k_st.s, k_rows);
  load_tile_f32<D>(t.v, head_rows(a.v, a.v_st, b, h, k0), a.v_st.s, k_rows);
  float dk[D / 8][4], dv[D / 8][4];
  zero_acc<D>(dk);
  zero_acc<D>(dv);
  float delta_sum = 0.0f;
  const int q_blocks = mma::bwd_blocks(a.q_len, kRows);
  for (int qb = 0; qb < q_blocks; ++qb) {
    const int q0 = qb * kRows, q_rows = min(kRows, a.q_len - q0);
    if (qb > 0) __syncthreads();  // every warp is done with the previous query tile
    load_tile_f32<D>(t.q, head_rows(a.q, a.q_st, b, h, q0), a.q_st.s, q_rows);
    load_tile_f32<D>(t.dout, head_rows(a.dout, a.dout_st, b, h, q0), a.dout_st.s, q_rows);
    cp_async_commit();
    row_stats<D>(a, b, h, q0, t.lse2, t.delta);
    cp_async_wait<0>();
    __syncthreads();
    if (block == 0 && warp == 0) delta_sum += block_delta_sum(t.delta);
    if (warp_has_keys) key_phase_tile<D>(a, mask, gate, k0, q_rows, t, dk, dv);
  }
  if (block == 0 && warp == 0 && lane == 0) a.d_gate[b * a.heads + h] = delta_sum / gate;
  if (warp_has_keys) {
    store_rows<D>(dk, a.scale, a.dk, b, h, k0 + 16 * warp, a.kv_len, a.heads);
    store_rows<D>(dv, gate, a.dv, b, h, k0 + 16 * warp, a.kv_len, a.heads);
  }
}

// Query-block item: queries q0 .. q0 + 63 resident with their statistics, all keys streamed.
template <int D>
__device__ __forceinline__ void backward_query_block(const MmaBwdArgs& a, int b, int h, float gate, int block,
                                                     const Tiles& t) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q0 = block * kRows, q_rows = min(kRows, a.q_len - q0);
  const bool* mask = a.mask == nullptr ? nullptr : a.mask + static_cast<int64_t>(b) * a.kv_len;
  const bool warp_has_queries = 16 * warp < q_rows;
  load_tile_f32<D>(t.q, head_rows(a.q, a.q_st, b, h, q0), a.q_st.s, q_rows);
  load_tile_f32<D>(t.dout, head_rows(a.dout, a.dout_st, b, h, q0), a.dout_st.s, q_rows);
  float lse2_r[2], delta_r[2];
  float dq[D / 8][4];
  zero_acc<D>(dq);
  const int k_blocks = mma::bwd_blocks(a.kv_len, kRows);
  for (int kb = 0; kb < k_blocks; ++kb) {
    const int k0 = kb * kRows, k_rows = min(kRows, a.kv_len - k0);
    if (kb > 0) __syncthreads();  // every warp is done with the previous key tile
    load_tile_f32<D>(t.k, head_rows(a.k, a.k_st, b, h, k0), a.k_st.s, k_rows);
    load_tile_f32<D>(t.v, head_rows(a.v, a.v_st, b, h, k0), a.v_st.s, k_rows);
    cp_async_commit();
    if (kb == 0) row_stats<D>(a, b, h, q0, t.lse2, t.delta);
    cp_async_wait<0>();
    __syncthreads();
    if (kb == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * warp + mma::group_id(lane) + 8 * r;
        lse2_r[r] = t.lse2[row];
        delta_r[r] = t.delta[row];
      }
    }
    if (warp_has_queries) query_phase_tile<D>(a, mask, gate, k0, k_rows, t, lse2_r, delta_r, dq);
  }
  if (warp_has_queries) store_rows<D>(dq, a.scale, a.dq, b, h, q0 + 16 * warp, a.q_len, a.heads);
}

template <int D>
__global__ void __launch_bounds__(kThreads) mma_backward_tf32_kernel(const MmaBwdArgs a) {
  extern __shared__ __align__(128) float smem_f32[];
  Tiles t;
  t.q = smem_f32;
  t.k = t.q + kRows * D;
  t.v = t.k + kRows * D;
  t.dout = t.v + kRows * D;
  t.lse2 = t.dout + kRows * D;
  t.delta = t.lse2 + kRows;
  const int lane = threadIdx.x & 31;
  const int entries = a.batch * a.heads;

  // Step 0: pruned heads get zero gradients.
  for (int bh = blockIdx.x; bh < entries; bh += gridDim.x) {
    const int b = bh / a.heads, h = bh % a.heads;
    if (gate_of(a, b, h) != 0.0f) continue;
    zero_head<D>(a.dq, b, h, a.q_len, a.heads);
    zero_head<D>(a.dk, b, h, a.kv_len, a.heads);
    zero_head<D>(a.dv, b, h, a.kv_len, a.heads);
    if (threadIdx.x == 0) a.d_gate[bh] = 0.0f;
  }

  // Work items: (active (b, h), part): the key blocks, then the query blocks.
  const int parts = mma::bwd_items_per_head(a.q_len, a.kv_len, kRows);
  const int key_blocks = mma::bwd_blocks(a.kv_len, kRows);
  mma::ActiveCursor cursor;
  for (int w = blockIdx.x;; w += gridDim.x) {
    const int act = mma::item_active(w, parts), part = mma::item_tile(w, parts);
    const int entry = mma::find_active(cursor, act, entries, [&](int base) {
      const int e = base + lane;
      const bool on = e < entries && gate_of(a, e / a.heads, e % a.heads) != 0.0f;
      return __ballot_sync(0xffffffffu, on);
    });
    if (entry < 0) break;
    const int b = entry / a.heads, h = entry % a.heads;
    const float gate = gate_of(a, b, h);
    __syncthreads();  // the previous item's shared-memory reads are done
    if (part < key_blocks) {
      backward_key_block<D>(a, b, h, gate, part, t);
    } else {
      backward_query_block<D>(a, b, h, gate, part - key_blocks, t);
    }
  }
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
