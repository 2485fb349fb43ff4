// masked_attention backward on tensor cores with mma.sync, one launch, for fp16/bf16, D in
// {32, 64} and S <= 128 (query and key lengths). Selected only with
// SPARSEBERT_ATTENTION_KERNEL=mma (masked_attention.cu); like the mma forward it has been
// compiled for sm_80/sm_90 and replayed on the CPU (csrc/tests/test_mma_layout.cpp) but has NOT
// yet run on a GPU.
//
// With P = exp(scale q k^T - lse), dP_raw = dO v^T, delta_i = dO_i . O_i:
//   dS = P (gate dP_raw - delta),  dQ = scale dS K,  dK = scale dS^T Q,  dV = gate P^T dO,
//   d_gate[b, h] = sum_i delta_i / gate  (= sum ctx . dO, the importance signal).
// One CTA of 8 warps per active (b, h) (persistent grid, the forward's ballot walk over the gate):
//   Step 1: Q, K, V, dO -> swizzled shared memory (cp.async); delta and lse (log2 domain) per row;
//           d_gate from the deltas in a fixed order (deterministic).
//   Step 2: warp w owns keys 16w..16w+15: S^T = K Q^T and dP^T = V dO^T per 32-query chunk, P^T
//           and dS^T in registers, then dV += P^T dO and dK += dS^T Q with P^T, dS^T re-labelled as
//           A fragments; dK, dV written once.
//   Step 3: warp w owns queries 16w..16w+15: S = Q K^T, dP = dO V^T per 32-key chunk, dS in
//           registers, dQ += dS K; dQ written once (no atomics, no fp32 buffer, no memset).
// Pruned heads: their dQ, dK, dV slices are zero-filled and d_gate is 0, nothing else is read.
#include <c10/cuda/CUDAException.h>
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
namespace {

using mma::Coord;
constexpr int kRows = mma::kBwdMaxSeq;  // 128 rows per shared tile
constexpr int kChunk = mma::kBwdChunk;  // 32 queries (phase 1) or keys (phase 2) per step

template <typename T>
__device__ __forceinline__ float bits_to_float(uint16_t x);
template <>
__device__ __forceinline__ float bits_to_float<__half>(uint16_t x) {
  return __half2float(__ushort_as_half(x));
}
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint16_t x) {
  return __bfloat162float(__ushort_as_bfloat16(x));
}

__device__ __forceinline__ float gate_of(const MmaBwdArgs& a, int b, int h) {
  return a.gate[b * a.gate_sb + h * a.gate_sh];
}

// Zero rows [0, rows) of head h of example b of a contiguous (B, rows, H, D) tensor (16 B stores).
template <int D>
__device__ __forceinline__ void zero_head(void* dst, int b, int h, int rows, int heads) {
  constexpr int kU = D / 8;
  uint16_t* base = static_cast<uint16_t*>(dst);
  for (int i = threadIdx.x; i < rows * kU; i += mma::kBwdThreads) {
    const int64_t off = attn::bshd_contiguous_offset(b, i / kU, h, rows, heads, D) + (i % kU) * 8;
    *reinterpret_cast<uint4*>(base + off) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// acc (C fragments of 16 rows starting at row0, D columns) * factor -> contiguous (B, S, H, D),
// rows >= seq skipped; pairs of 16-bit values per 4-byte store.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float factor, void* dst, int b, int h,
                                           int row0, int seq, int heads) {
  const int lane = threadIdx.x & 31;
  uint16_t* base = static_cast<uint16_t*>(dst);
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const Coord c = mma::frag_c(lane, 2 * r);
      const int row = row0 + c.row;
      if (row < seq) {
        const int64_t off = attn::bshd_contiguous_offset(b, row, h, seq, heads, D) + dt * 8 + c.col;
        *reinterpret_cast<uint32_t*>(base + off) =
            pack2<T>(acc[dt][2 * r] * factor, acc[dt][2 * r + 1] * factor);
      }
    }
}

template <typename T, int D>
__device__ __forceinline__ void backward_head(const MmaBwdArgs& a, int b, int h, float gate, uint16_t* q_s,
                                              uint16_t* k_s, uint16_t* v_s, uint16_t* do_s, float* lse2_s,
                                              float* delta_s) {
  constexpr int kKc = D / 16;  // k-chunks over D
  constexpr int kDt = D / 8;   // d n-tiles
  constexpr int kNt = kChunk / 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sq = a.q_len, sk = a.kv_len;

  // Step 1: tiles, then delta, lse2 and d_gate.
  load_tile_async<D, kRows, mma::kBwdThreads>(
      q_s, static_cast<const uint16_t*>(a.q) + b * a.q_st.b + h * a.q_st.h, a.q_st.s, sq);
  load_tile_async<D, kRows, mma::kBwdThreads>(
      k_s, static_cast<const uint16_t*>(a.k) + b * a.k_st.b + h * a.k_st.h, a.k_st.s, sk);
  load_tile_async<D, kRows, mma::kBwdThreads>(
      v_s, static_cast<const uint16_t*>(a.v) + b * a.v_st.b + h * a.v_st.h, a.v_st.s, sk);
  const uint16_t* dout = static_cast<const uint16_t*>(a.dout) + b * a.dout_st.b + h * a.dout_st.h;
  load_tile_async<D, kRows, mma::kBwdThreads>(do_s, dout, a.dout_st.s, sq);
  cp_async_commit();
  {
    const int row = threadIdx.x >> 1, half = threadIdx.x & 1;  // two threads per row
    float d = 0.0f;
    if (row < sq) {
      const uint16_t* o = static_cast<const uint16_t*>(a.out) + b * a.out_st.b + h * a.out_st.h +
                          row * a.out_st.s + half * (D / 2);
      const uint16_t* g = dout + row * a.dout_st.s + half * (D / 2);
#pragma unroll
      for (int c = 0; c < D / 2; c += 8) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + c);
        const uint4 gv = *reinterpret_cast<const uint4*>(g + c);
        const uint16_t* op = reinterpret_cast<const uint16_t*>(&ov);
        const uint16_t* gp = reinterpret_cast<const uint16_t*>(&gv);
#pragma unroll
        for (int e = 0; e < 8; ++e) d = attn::delta_accumulate(d, bits_to_float<T>(gp[e]), bits_to_float<T>(op[e]));
      }
    }
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    if (half == 0) {
      delta_s[row] = d;  // 0 past the end
      lse2_s[row] = row < sq ? attn::lse_to_log2(a.lse[attn::bhs_index(b, h, row, a.heads, sq)]) : INFINITY;
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  if (warp == 0) {  // d_gate = sum_i delta_i / gate, in a fixed order
    float s = 0.0f;
    for (int i = lane; i < kRows; i += 32) s += delta_s[i];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) a.d_gate[b * a.heads + h] = s / gate;
  }
  const bool* mask = a.mask == nullptr ? nullptr : a.mask + static_cast<int64_t>(b) * sk;

  // Step 2: dK, dV for keys 16w .. 16w + 15.
  if (16 * warp < sk) {
    uint32_t kf[kKc][4], vf[kKc][4];
#pragma unroll
    for (int kc = 0; kc < kKc; ++kc) {
      const Coord c = mma::ldsm_q(lane, kc);
      ldmatrix_x4(kf[kc], smem_u32(k_s + mma::smem_offset(16 * warp + c.row, c.col, D)));
      ldmatrix_x4(vf[kc], smem_u32(v_s + mma::smem_offset(16 * warp + c.row, c.col, D)));
    }
    float dk[kDt][4], dv[kDt][4];
#pragma unroll
    for (int dt = 0; dt < kDt; ++dt)
#pragma unroll
      for (int i = 0; i < 4; ++i) dk[dt][i] = dv[dt][i] = 0.0f;
    bool key_real[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = 16 * warp + mma::group_id(lane) + 8 * r;
      key_real[r] = key < sk && (mask == nullptr || mask[key]);
    }
    const int chunks = static_cast<int>(attn::ceil_div(sq, kChunk));
    for (int qc = 0; qc < chunks; ++qc) {
      float st[kNt][4], dpt[kNt][4];  // rows = keys, columns = queries 32 qc ..
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) st[nt][i] = dpt[nt][i] = 0.0f;
#pragma unroll
      for (int kc = 0; kc < kKc; ++kc)
#pragma unroll
        for (int p = 0; p < kNt / 2; ++p) {
          const Coord c = mma::ldsm_k(lane, (kChunk / 16) * qc + p, kc);
          uint32_t bq[4], bo[4];
          ldmatrix_x4(bq, smem_u32(q_s + mma::smem_offset(c.row, c.col, D)));
          ldmatrix_x4(bo, smem_u32(do_s + mma::smem_offset(c.row, c.col, D)));
          mma_16816<T>(st[2 * p], kf[kc], bq[0], bq[1]);
          mma_16816<T>(st[2 * p + 1], kf[kc], bq[2], bq[3]);
          mma_16816<T>(dpt[2 * p], vf[kc], bo[0], bo[1]);
          mma_16816<T>(dpt[2 * p + 1], vf[kc], bo[2], bo[3]);
        }
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int query = kChunk * qc + nt * 8 + mma::frag_c(lane, i).col;
          const float s2 = key_real[i >> 1] ? st[nt][i] * a.scale_log2 : attn::neg_inf();
          const float p = attn::backward_prob(s2, lse2_s[query]);
          dpt[nt][i] = attn::backward_dscore(p, gate, dpt[nt][i], delta_s[query]);
          st[nt][i] = p;
        }
#pragma unroll
      for (int kc = 0; kc < kChunk / 16; ++kc) {
        uint32_t pa[4], da[4];
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          const int nt = mma::p_ntile(kc, reg), e = 2 * mma::p_pair(reg);
          pa[reg] = pack2<T>(st[nt][e], st[nt][e + 1]);
          da[reg] = pack2<T>(dpt[nt][e], dpt[nt][e + 1]);
        }
#pragma unroll
        for (int p = 0; p < kDt / 2; ++p) {
          const Coord c = mma::ldsm_v(lane, (kChunk / 16) * qc + kc, p);
          uint32_t bo[4], bq[4];
          ldmatrix_x4_trans(bo, smem_u32(do_s + mma::smem_offset(c.row, c.col, D)));
          ldmatrix_x4_trans(bq, smem_u32(q_s + mma::smem_offset(c.row, c.col, D)));
          mma_16816<T>(dv[2 * p], pa, bo[0], bo[1]);
          mma_16816<T>(dv[2 * p + 1], pa, bo[2], bo[3]);
          mma_16816<T>(dk[2 * p], da, bq[0], bq[1]);
          mma_16816<T>(dk[2 * p + 1], da, bq[2], bq[3]);
        }
      }
    }
    store_rows<T, D>(dk, a.scale, a.dk, b, h, 16 * warp, sk, a.heads);
    store_rows<T, D>(dv, gate, a.dv, b, h, 16 * warp, sk, a.heads);
  }

  // Step 3: dQ for queries 16w .. 16w + 15.
  if (16 * warp < sq) {
    uint32_t qf[kKc][4], of[kKc][4];
#pragma unroll
    for (int kc = 0; kc < kKc; ++kc) {
      const Coord c = mma::ldsm_q(lane, kc);
      ldmatrix_x4(qf[kc], smem_u32(q_s + mma::smem_offset(16 * warp + c.row, c.col, D)));
      ldmatrix_x4(of[kc], smem_u32(do_s + mma::smem_offset(16 * warp + c.row, c.col, D)));
    }
    float lse2_r[2], delta_r[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * warp + mma::group_id(lane) + 8 * r;
      lse2_r[r] = lse2_s[row];
      delta_r[r] = delta_s[row];
    }
    float dq[kDt][4];
#pragma unroll
    for (int dt = 0; dt < kDt; ++dt)
#pragma unroll
      for (int i = 0; i < 4; ++i) dq[dt][i] = 0.0f;
    const int chunks = static_cast<int>(attn::ceil_div(sk, kChunk));
    for (int kcnk = 0; kcnk < chunks; ++kcnk) {
      float s[kNt][4], dp[kNt][4];  // rows = queries, columns = keys 32 kcnk ..
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[nt][i] = dp[nt][i] = 0.0f;
#pragma unroll
      for (int kc = 0; kc < kKc; ++kc)
#pragma unroll
        for (int p = 0; p < kNt / 2; ++p) {
          const Coord c = mma::ldsm_k(lane, (kChunk / 16) * kcnk + p, kc);
          uint32_t bk[4], bv[4];
          ldmatrix_x4(bk, smem_u32(k_s + mma::smem_offset(c.row, c.col, D)));
          ldmatrix_x4(bv, smem_u32(v_s + mma::smem_offset(c.row, c.col, D)));
          mma_16816<T>(s[2 * p], qf[kc], bk[0], bk[1]);
          mma_16816<T>(s[2 * p + 1], qf[kc], bk[2], bk[3]);
          mma_16816<T>(dp[2 * p], of[kc], bv[0], bv[1]);
          mma_16816<T>(dp[2 * p + 1], of[kc], bv[2], bv[3]);
        }
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = kChunk * kcnk + nt * 8 + mma::frag_c(lane, i).col;
          const bool real = key < sk && (mask == nullptr || mask[key]);
          const float s2 = real ? s[nt][i] * a.scale_log2 : attn::neg_inf();
          const float p = attn::backward_prob(s2, lse2_r[i >> 1]);
          s[nt][i] = attn::backward_dscore(p, gate, dp[nt][i], delta_r[i >> 1]);
        }
#pragma unroll
      for (int kc = 0; kc < kChunk / 16; ++kc) {
        uint32_t da[4];
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          const int nt = mma::p_ntile(kc, reg), e = 2 * mma::p_pair(reg);
          da[reg] = pack2<T>(s[nt][e], s[nt][e + 1]);
        }
#pragma unroll
        for (int p = 0; p < kDt / 2; ++p) {
          const Coord c = mma::ldsm_v(lane, (kChunk / 16) * kcnk + kc, p);
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, smem_u32(k_s + mma::smem_offset(c.row, c.col, D)));
          mma_16816<T>(dq[2 * p], da, bk[0], bk[1]);
          mma_16816<T>(dq[2 * p + 1], da, bk[2], bk[3]);
        }
      }
    }
    store_rows<T, D>(dq, a.scale, a.dq, b, h, 16 * warp, sq, a.heads);
  }
}

template <int D>
constexpr int smem_bytes() {
  return 4 * kRows * D * 2 + 2 * kRows * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(mma::kBwdThreads) mma_backward_kernel(const MmaBwdArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem);
  uint16_t* k_s = q_s + kRows * D;
  uint16_t* v_s = k_s + kRows * D;
  uint16_t* do_s = v_s + kRows * D;
  float* lse2_s = reinterpret_cast<float*>(do_s + kRows * D);
  float* delta_s = lse2_s + kRows;
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

  mma::ActiveCursor cursor;
  for (int w = blockIdx.x;; w += gridDim.x) {
    const int entry = mma::find_active(cursor, w, entries, [&](int base) {
      const int e = base + lane;
      const bool on = e < entries && gate_of(a, e / a.heads, e % a.heads) != 0.0f;
      return __ballot_sync(0xffffffffu, on);
    });
    if (entry < 0) break;
    const int b = entry / a.heads, h = entry % a.heads;
    __syncthreads();  // the previous head's shared-memory reads are done
    backward_head<T, D>(a, b, h, gate_of(a, b, h), q_s, k_s, v_s, do_s, lse2_s, delta_s);
  }
}

template <typename T, int D>
void launch(const MmaBwdArgs& a, cudaStream_t stream) {
  // More than 48 KB of dynamic shared memory must be allowed per device: set on every launch
  // (a cheap driver call) so that a second GPU of the process gets it too.
  C10_CUDA_CHECK(cudaFuncSetAttribute(mma_backward_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<D>()));
  static const int ctas_per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, mma_backward_kernel<T, D>,
                                                                 mma::kBwdThreads, smem_bytes<D>()));
    return n > 0 ? n : 1;
  }();
  const int64_t grid = mma::grid_size(static_cast<int64_t>(a.batch) * a.heads, a.sm_count, ctas_per_sm);
  mma_backward_kernel<T, D><<<static_cast<unsigned>(grid), mma::kBwdThreads, smem_bytes<D>(), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
