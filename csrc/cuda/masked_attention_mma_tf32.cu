// masked_attention forward for fp32 inputs on tensor cores: 3xTF32 with mma.sync m16n8k8
// (D in {32, 64}, any S), sm80 code that also runs on sm90. The default for fp32 where it applies
// (masked_attention.cu), like the fp16/bf16 kernel of masked_attention_mma.cu whose structure it
// follows: its index math and 3xTF32 arithmetic are replayed on the CPU
// (csrc/tests/test_mma_layout.cpp), and it passed the CUDA tests on an H200.
//
// Every index comes from sparsebert/mma_layout.h (the "fp32 inputs" section), the online softmax
// from sparsebert/attention_math.h. One CTA = 4 warps; a persistent grid walks work items
// (active (b, h), 64-row query tile), so pruned heads get no CTA time and no memory traffic.
// Per item:
//   Step 1: cp.async Q tile and K/V stage 0 (16-byte copies into swizzled fp32 tiles).
//   Step 2: per 64-key tile: wait, barrier, prefetch the next K/V stage; S = Q K^T with
//           3xTF32, Q and K fragments read from shared memory (32-bit loads) and split per
//           k-chunk (keeping Q's split fragments in registers across key tiles took 250-255
//           registers and spilled at D = 64); mask, online softmax in registers;
//           O += P V with 3xTF32, P split from the S accumulators (keys permuted, no shuffles).
//   Step 3: O * gate / l, 8-byte stores straight from the accumulators (a quad writes one 32-byte
//           sector per row and d-tile); lse.
// Shared memory: Q [64][D] + K, V [2 stages][64][D] fp32 = 80 KB at D = 64 (dynamic), 40 KB at 32.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "masked_attention_mma.cuh"
#include "mma_forward_common.cuh"
#include "mma_ptx.cuh"
#include "sparsebert/attention_math.h"
#include "sparsebert/mma_layout.h"

namespace sparsebert {
namespace cuda_mma {
namespace {

using mma::Coord;

template <int D>
constexpr int tf32_smem_bytes() {
  return (mma::kBlockM + 2 * mma::kStages * mma::kBlockN) * D * 4;
}

// ---------------------------------------------------------------------------------------------
// One work item: query rows [q0, q0 + 64) of head h of example b, written to head slot oh.
// ---------------------------------------------------------------------------------------------
template <int D>
__device__ __forceinline__ void attend_tile_tf32(const MmaFwdArgs& a, int b, int h, int oh, int q0, float gate,
                                                 float* q_s, float* k_s, float* v_s) {
  constexpr int kKc = D / 8;                // k-chunks of S = Q K^T
  constexpr int kNt = mma::kBlockN / 8;     // key n-tiles of S (= key chunks of P V)
  constexpr int kDt = D / 8;                // d n-tiles of O
  constexpr int kTile = mma::kBlockM * D;   // floats of one tile
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* q = head_slice<float>(a.q, a.q_st, b, h);
  const float* k = head_slice<float>(a.k, a.k_st, b, h);
  const float* v = head_slice<float>(a.v, a.v_st, b, h);
  const int key_tiles = static_cast<int>(attn::ceil_div(a.kv_len, mma::kBlockN));

  // Step 1: Q tile and the first K/V stage.
  load_first_stage<D>(a, q, k, v, q0, q_s, k_s, v_s);

  float o[kDt][4];
#pragma unroll
  for (int dt = 0; dt < kDt; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[dt][i] = 0.0f;
  float m[2] = {attn::neg_inf(), attn::neg_inf()};  // rows group, group + 8 (log2 domain)
  float l[2] = {0.0f, 0.0f};                        // this lane's partial row sums
  const bool* mask = a.mask == nullptr ? nullptr : a.mask + static_cast<int64_t>(b) * a.kv_len;

  for (int kt = 0; kt < key_tiles; ++kt) {
    // Step 2a: wait for this K/V stage, barrier, prefetch the next one.
    const int stage = next_kv_stage<D>(a, k, v, kt, key_tiles, k_s, v_s);
    const float* ks = k_s + stage * kTile;
    const float* vs = v_s + stage * kTile;
    // The tile's real keys (a mask read issued before the products; no test at all when every
    // key is real).
    const TileKeys keys = tile_keys(a, mask, kt * mma::kBlockN);

    // Step 2b: S = Q K^T for this warp's 16 rows and the 64 keys (3xTF32).
    float s[kNt][4];
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.0f;
#pragma unroll 1
    for (int kc = 0; kc < kKc; ++kc) {
      uint32_t qb[4], qsm[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const Coord c = mma::tf32_q(lane, kc, r);
        split_to(q_s[mma::f32_smem_offset(16 * warp + c.row, c.col, D)], qb[r], qsm[r]);
      }
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
        uint32_t kb[2], ksm[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const Coord c = mma::tf32_k(lane, nt, kc, r);
          split_to(ks[mma::f32_smem_offset(c.row, c.col, D)], kb[r], ksm[r]);
        }
        mma_1688_3xtf32(s[nt], qb, qsm, kb, ksm);
      }
    }

    // Step 2c: log2-domain scores, keys that are not real -inf, online softmax per row (quad
    // reductions).
    online_softmax_tile(a, keys, lane, s, m, l, o);

    // Step 2d: O += P V (3xTF32), P of key chunk kc taken from the S accumulators of n-tile kc.
#pragma unroll
    for (int kc = 0; kc < kNt; ++kc) {
      uint32_t pb[4], psm[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) split_to(s[kc][mma::tf32_p_elem(r)], pb[r], psm[r]);
#pragma unroll
      for (int dt = 0; dt < kDt; ++dt) {
        uint32_t vb[2], vsm[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const Coord c = mma::tf32_v(lane, kc, dt, r);
          split_to(vs[mma::f32_smem_offset(c.row, c.col, D)], vb[r], vsm[r]);
        }
        mma_1688_3xtf32(o[dt], pb, psm, vb, vsm);
      }
    }
  }

  // Step 3: gate / l once; 8-byte stores of the accumulator pairs.
  float factor[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    factor[r] = gate * attn::softmax_inv_sum(l[r]);
  }
  float* out = static_cast<float*>(a.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const Coord c = mma::frag_c(lane, 2 * r);
    const int s_row = q0 + 16 * warp + c.row;
    if (s_row >= a.q_len) continue;
    float* row = out + (static_cast<int64_t>(b) * a.q_len + s_row) * a.out_heads * D +
                 static_cast<int64_t>(oh) * D + c.col;
#pragma unroll
    for (int dt = 0; dt < kDt; ++dt)
      *reinterpret_cast<float2*>(row + dt * 8) =
          make_float2(o[dt][2 * r] * factor[r], o[dt][2 * r + 1] * factor[r]);
  }
  store_lse(a, b, oh, q0, warp, lane, m, l);
}

// Occupancy hint per head dim, chosen from the ptxas report (nvcc 13.0): D = 64 without a hint
// (0) gets 168 registers and no spills on sm_80 and sm_90, while a hint of 1 or 2 lets ptxas take
// 250-255 registers and spill on sm_80, and 3 spills; D = 32 with 3 gets 168 registers and no
// spills, while without a hint sm_90 caps it at 128 registers and spills. Shared memory limits
// D = 64 to 2 CTAs per SM anyway (80 KB each), D = 32 runs 3 (registers).
template <int D>
constexpr int tf32_min_ctas() {
  return D == 64 ? 0 : 3;
}


// The kernel's work item, for walk_work_items (mma_forward_common.cuh).
template <int D>
struct Tf32Item {
  static __device__ __forceinline__ void zero(const MmaFwdArgs& a, int b, int oh, int row0, int rows) {
    zero_out_slice<float, D>(a, b, oh, row0, rows);
  }
  static __device__ __forceinline__ void attend(const MmaFwdArgs& a, int b, int h, int oh, int q0,
                                                float gate, float* q_s, float* k_s, float* v_s) {
    attend_tile_tf32<D>(a, b, h, oh, q0, gate, q_s, k_s, v_s);
  }
};

template <int D>
__global__ void __launch_bounds__(mma::kThreads, tf32_min_ctas<D>()) mma_forward_tf32_kernel(const MmaFwdArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800  // cp.async, m16n8k16: sm_80+ (never launched below)
  extern __shared__ __align__(128) float smem_f32[];
  float* q_s = smem_f32;
  float* k_s = q_s + mma::kBlockM * D;
  float* v_s = k_s + mma::kStages * mma::kBlockN * D;
  walk_work_items<Tf32Item<D>>(a, q_s, k_s, v_s);
#endif
}

template <int D>
void launch(const MmaFwdArgs& a, cudaStream_t stream) {
  constexpr int kSmem = tf32_smem_bytes<D>();
  // More than 48 KB of dynamic shared memory must be allowed per device: set on every launch
  // (a cheap driver call) so that a second GPU of the process gets it too.
  C10_CUDA_CHECK(cudaFuncSetAttribute(mma_forward_tf32_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      kSmem));
  static const int ctas_per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, mma_forward_tf32_kernel<D>,
                                                                 mma::kThreads, kSmem));
    return n > 0 ? n : 1;
  }();
  const int64_t q_tiles = attn::ceil_div(a.q_len, mma::kBlockM);
  const int64_t grid = mma::grid_size(static_cast<int64_t>(a.batch) * a.out_heads * q_tiles,
                                      a.sm_count, ctas_per_sm);
  mma_forward_tf32_kernel<D><<<static_cast<unsigned>(grid), mma::kThreads, kSmem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_mma_forward_tf32(const MmaFwdArgs& a, cudaStream_t stream) {
  a.head_dim == 32 ? launch<32>(a, stream) : launch<64>(a, stream);
}

}  // namespace cuda_mma
}  // namespace sparsebert
