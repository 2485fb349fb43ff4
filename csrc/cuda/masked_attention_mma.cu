// masked_attention forward on tensor cores with mma.sync (fp16/bf16, D in {32, 64}, any S),
// sm80 code that also runs on sm90. The default where it applies (masked_attention.cu), and
// masked_attention_compact's; SPARSEBERT_ATTENTION_KERNEL=wmma or simt turn it off. Its index
// math is replayed on the CPU (csrc/tests/test_mma_layout.cpp); it passed the CUDA tests on an
// H200.
//
// Every index (fragment layouts, ldmatrix addresses, swizzle, copy chunks, P re-labelling, work
// items) comes from sparsebert/mma_layout.h; the online softmax from sparsebert/attention_math.h.
// One CTA = 4 warps; a persistent grid walks work items (active (b, h), 64-row query tile), so
// pruned heads get no CTA time and no memory traffic. Per item:
//   Step 1: cp.async Q tile and K/V stage 0 (16-byte copies into swizzled shared memory).
//   Step 2: per 64-key tile: wait for its K/V stage, one barrier, prefetch the next stage,
//           S = Q K^T (ldmatrix + mma.sync; the warp's Q rows re-read each tile), real keys
//           from two ballot words, online softmax in registers (ex2.approx), O += P V with P
//           re-used from registers.
//   Step 3: O * gate / l, staged through the warp's rows of the Q tile, 16-byte stores; lse.
// Dense output zero-fills the slices of pruned heads with 16-byte stores after its items.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
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

// ---------------------------------------------------------------------------------------------
// One work item: query rows [q0, q0 + 64) of head h of example b, written to head slot oh.
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ __forceinline__ void attend_tile(const MmaFwdArgs& a, int b, int h, int oh, int q0, float gate,
                                            uint16_t* q_s, uint16_t* k_s, uint16_t* v_s) {
  constexpr int kKc = D / 16;               // k-chunks of S = Q K^T
  constexpr int kNt = mma::kBlockN / 8;     // key n-tiles of S
  constexpr int kDt = D / 8;                // d n-tiles of O
  constexpr int kTile = mma::kBlockM * D;   // elements of one tile
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint16_t* q = head_slice<uint16_t>(a.q, a.q_st, b, h);
  const uint16_t* k = head_slice<uint16_t>(a.k, a.k_st, b, h);
  const uint16_t* v = head_slice<uint16_t>(a.v, a.v_st, b, h);
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
    const uint16_t* ks = k_s + stage * kTile;
    const uint16_t* vs = v_s + stage * kTile;
    // The tile's real keys (a mask read issued before the products; no test at all when every
    // key is real).
    const TileKeys keys = tile_keys(a, mask, kt * mma::kBlockN);

    // Step 2b: S = Q K^T for this warp's 16 rows and the 64 keys.
    float s[kNt][4];
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < kKc; ++kc) {
      // The warp's Q fragments, re-read from shared memory every tile (one ldmatrix per k-chunk):
      // 16 registers fewer than keeping them, which lets 4 CTAs share a multiprocessor.
      uint32_t qf[4];
      const Coord cq = mma::ldsm_q(lane, kc);
      ldmatrix_x4(qf, smem_u32(q_s + mma::smem_offset(16 * warp + cq.row, cq.col, D)));
#pragma unroll
      for (int p = 0; p < kNt / 2; ++p) {
        uint32_t kf[4];
        const Coord c = mma::ldsm_k(lane, p, kc);
        ldmatrix_x4(kf, smem_u32(ks + mma::smem_offset(c.row, c.col, D)));
        mma_16816<T>(s[2 * p], qf, kf[0], kf[1]);
        mma_16816<T>(s[2 * p + 1], qf, kf[2], kf[3]);
      }
    }

    // Step 2c: log2-domain scores, keys that are not real -inf, online softmax per row (quad
    // reductions).
    online_softmax_tile(a, keys, lane, s, m, l, o);

    // Step 2d: O += P V, P re-labelled from the S accumulators as A fragments.
#pragma unroll
    for (int kc = 0; kc < mma::kBlockN / 16; ++kc) {
      uint32_t pa[4];
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        const float* c = s[mma::p_ntile(kc, reg)] + 2 * mma::p_pair(reg);
        pa[reg] = pack2<T>(c[0], c[1]);
      }
#pragma unroll
      for (int p = 0; p < kDt / 2; ++p) {
        uint32_t vf[4];
        const Coord c = mma::ldsm_v(lane, kc, p);
        ldmatrix_x4_trans(vf, smem_u32(vs + mma::smem_offset(c.row, c.col, D)));
        mma_16816<T>(o[2 * p], pa, vf[0], vf[1]);
        mma_16816<T>(o[2 * p + 1], pa, vf[2], vf[3]);
      }
    }
  }

  // Step 3: gate / l once, staged in the warp's own 16 rows of the Q tile, 16-byte stores.
  float factor[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    factor[r] = gate * attn::softmax_inv_sum(l[r]);
  }
#pragma unroll
  for (int dt = 0; dt < kDt; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const Coord c = mma::frag_c(lane, 2 * r);
      *reinterpret_cast<uint32_t*>(q_s + mma::smem_offset(16 * warp + c.row, dt * 8 + c.col, D)) =
          pack2<T>(o[dt][2 * r] * factor[r], o[dt][2 * r + 1] * factor[r]);
    }
  __syncwarp();
  uint16_t* out = static_cast<uint16_t*>(a.out);
#pragma unroll
  for (int it = 0; it < D / 16; ++it) {
    const Coord c = mma::out_chunk(lane + 32 * it, D);
    const int s_row = q0 + 16 * warp + c.row;
    if (s_row < a.q_len) {
      const int64_t off = (static_cast<int64_t>(b) * a.q_len + s_row) * a.out_heads * D +
                          static_cast<int64_t>(oh) * D + c.col;
      *reinterpret_cast<uint4*>(out + off) =
          *reinterpret_cast<const uint4*>(q_s + mma::smem_offset(16 * warp + c.row, c.col, D));
    }
  }
  store_lse(a, b, oh, q0, warp, lane, m, l);
}


// The kernel's work item, for walk_work_items (mma_forward_common.cuh).
template <typename T, int D>
struct HalfItem {
  static __device__ __forceinline__ void zero(const MmaFwdArgs& a, int b, int oh, int row0, int rows) {
    zero_out_slice<uint16_t, D>(a, b, oh, row0, rows);
  }
  static __device__ __forceinline__ void attend(const MmaFwdArgs& a, int b, int h, int oh, int q0,
                                                float gate, uint16_t* q_s, uint16_t* k_s, uint16_t* v_s) {
    attend_tile<T, D>(a, b, h, oh, q0, gate, q_s, k_s, v_s);
  }
};

// 4 CTAs per multiprocessor (128 registers) on sm_90, where the loop then has no spills; sm_80's
// ptxas spills about 100 bytes at D = 64 under that bound, so it gets 3 (168 registers, none).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SB_MMA_FWD_MIN_CTAS 3
#else
#define SB_MMA_FWD_MIN_CTAS 4
#endif

template <typename T, int D>
__global__ void __launch_bounds__(mma::kThreads, SB_MMA_FWD_MIN_CTAS) mma_forward_kernel(const MmaFwdArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800  // cp.async, m16n8k16: sm_80+ (never launched below)
  __shared__ __align__(128) uint16_t q_s[mma::kBlockM * D];
  __shared__ __align__(128) uint16_t k_s[mma::kStages * mma::kBlockN * D];
  __shared__ __align__(128) uint16_t v_s[mma::kStages * mma::kBlockN * D];
  walk_work_items<HalfItem<T, D>>(a, q_s, k_s, v_s);
#endif
}

template <typename T, int D>
void launch(const MmaFwdArgs& a, cudaStream_t stream) {
  // Resident CTAs per SM (the kernel's registers and static shared memory fix it; asked once).
  static const int ctas_per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, mma_forward_kernel<T, D>,
                                                                 mma::kThreads, 0));
    return n > 0 ? n : 1;
  }();
  const int64_t q_tiles = attn::ceil_div(a.q_len, mma::kBlockM);
  const int64_t grid = mma::grid_size(static_cast<int64_t>(a.batch) * a.out_heads * q_tiles,
                                      a.sm_count, ctas_per_sm);
  mma_forward_kernel<T, D><<<static_cast<unsigned>(grid), mma::kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_mma_forward(bool bf16, const MmaFwdArgs& a, cudaStream_t stream) {
  if (bf16) {
    a.head_dim == 32 ? launch<__nv_bfloat16, 32>(a, stream) : launch<__nv_bfloat16, 64>(a, stream);
  } else {
    a.head_dim == 32 ? launch<__half, 32>(a, stream) : launch<__half, 64>(a, stream);
  }
}

}  // namespace cuda_mma
}  // namespace sparsebert
