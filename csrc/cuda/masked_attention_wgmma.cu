// masked_attention forward with Hopper's warpgroup MMA (wgmma, sm_90a; fp16/bf16, D in {32, 64},
// any S): the mma.sync forward (masked_attention_mma.cu) with its two products per key tile
// issued as wgmma by the CTA's 4 warps together. Opt-in (SPARSEBERT_ATTENTION_KERNEL=wgmma) on a
// build for sm_90a (TORCH_CUDA_ARCH_LIST containing 9.0a) and a compute capability 9.0 GPU;
// elsewhere that choice runs the mma.sync forward. It has not run on a GPU yet: it stays opt-in
// until it has passed the CUDA tests on one.
//
// Same work items, tiles, copies, online softmax and output as the mma.sync forward (the shared
// parts are mma_forward_common.cuh); per 64-key tile:
//   S = Q K^T: 4 (D = 64) or 2 (D = 32) wgmma.m64n64k16 reading Q and the K stage in place from
//           shared memory through descriptors (sparsebert/wgmma_layout.h: the tiles' swizzle is
//           the ISA's 128-byte (D = 64) or 64-byte (D = 32) canonical one), no ldmatrix;
//   O += P V: 4 wgmma.m64n{D}k16 with P from registers (the S accumulators re-labelled as A
//           fragments, as for mma.sync: wgmma's accumulator is mma.sync's C fragment per warp)
//           and V read transposed from shared memory.
// The copies reach wgmma's (async proxy) reads through fence.proxy.async before each tile's
// barrier; every wgmma batch is waited for before its registers or shared memory are touched.
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
#include "sparsebert/wgmma_layout.h"
#include "wgmma_ptx.cuh"

namespace sparsebert {
namespace cuda_mma {
namespace {

using mma::Coord;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// O += P V for one 16-key chunk: m64n64k16 (D = 64) or m64n32k16 (D = 32).
template <typename T>
__device__ __forceinline__ void wgmma_pv(float (&o)[8][4], const uint32_t (&pa)[4], uint64_t desc) {
  wgmma_rs_m64n64k16(o, pa, desc, 1, T{});
}
template <typename T>
__device__ __forceinline__ void wgmma_pv(float (&o)[4][4], const uint32_t (&pa)[4], uint64_t desc) {
  wgmma_rs_m64n32k16(o, pa, desc, 1, T{});
}

// ---------------------------------------------------------------------------------------------
// One work item: query rows [q0, q0 + 64) of head h of example b, written to head slot oh.
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ __forceinline__ void attend_tile_wgmma(const MmaFwdArgs& a, int b, int h, int oh, int q0, float gate,
                                                  uint16_t* q_s, uint16_t* k_s, uint16_t* v_s) {
  constexpr int kKc = D / 16;               // k-chunks of S = Q K^T
  constexpr int kNt = mma::kBlockN / 8;     // key n-tiles of S
  constexpr int kDt = D / 8;                // d n-tiles of O
  constexpr int kPc = mma::kBlockN / 16;    // key chunks of O += P V
  constexpr int kTile = mma::kBlockM * D;   // elements of one tile
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint16_t* q = head_slice<uint16_t>(a.q, a.q_st, b, h);
  const uint16_t* k = head_slice<uint16_t>(a.k, a.k_st, b, h);
  const uint16_t* v = head_slice<uint16_t>(a.v, a.v_st, b, h);
  const int key_tiles = static_cast<int>(attn::ceil_div(a.kv_len, mma::kBlockN));
  const uint32_t q_addr = smem_u32(q_s);

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
    // Step 2a: wait for this K/V stage, make it visible to wgmma, barrier, prefetch the next.
    const int stage = next_kv_stage<D>(a, k, v, kt, key_tiles, k_s, v_s, /*async_proxy=*/true);
    const uint32_t k_addr = smem_u32(k_s + stage * kTile);
    const uint32_t v_addr = smem_u32(v_s + stage * kTile);
    const TileKeys keys = tile_keys(a, mask, kt * mma::kBlockN);

    // Step 2b: S = Q K^T for the CTA's 64 rows (this warp holds its 16) and the 64 keys.
    float s[kNt][4];
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.0f;
    keep_regs(s);  // the zeroing stays before the fence (the first product also ignores it)
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < kKc; ++kc)
      wgmma_ss_m64n64k16(s, wgmma::k_major_desc(q_addr, D, kc), wgmma::k_major_desc(k_addr, D, kc),
                         kc > 0 ? 1 : 0, T{});
    wgmma_commit();
    wgmma_wait<0>();
    keep_regs(s);

    // Step 2c: log2-domain scores, keys that are not real -inf, online softmax per row.
    online_softmax_tile(a, keys, lane, s, m, l, o);

    // Step 2d: O += P V, P re-labelled from the S accumulators as A fragments (registers that
    // must stay untouched until the batch is waited for).
    uint32_t pa[kPc][4];
#pragma unroll
    for (int kc = 0; kc < kPc; ++kc)
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        const float* c = s[mma::p_ntile(kc, reg)] + 2 * mma::p_pair(reg);
        pa[kc][reg] = pack2<T>(c[0], c[1]);
      }
    // The rescaled O and the packed P are final before the fence (the batch reads both).
    keep_regs(o);
    keep_regs(pa);
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < kPc; ++kc) wgmma_pv<T>(o, pa[kc], wgmma::mn_major_desc(v_addr, D, kc));
    wgmma_commit();
    wgmma_wait<0>();
    keep_regs(o);
    keep_regs(pa);
  }

  // Step 3: gate / l once, staged in the warp's own 16 rows of the Q tile, 16-byte stores. A
  // warp's waits cover its own view of the warpgroup's batches; the barrier makes sure that no
  // warp's part of the last S = Q K^T still reads Q when another warp overwrites its rows.
  __syncthreads();
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
struct WgmmaItem {
  static __device__ __forceinline__ void zero(const MmaFwdArgs& a, int b, int oh, int row0, int rows) {
    zero_out_slice<uint16_t, D>(a, b, oh, row0, rows);
  }
  static __device__ __forceinline__ void attend(const MmaFwdArgs& a, int b, int h, int oh, int q0,
                                                float gate, uint16_t* q_s, uint16_t* k_s, uint16_t* v_s) {
    attend_tile_wgmma<T, D>(a, b, h, oh, q0, gate, q_s, k_s, v_s);
  }
};
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <typename T, int D>
__global__ void __launch_bounds__(mma::kThreads, 4) wgmma_forward_kernel(const MmaFwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Tiles start at multiples of a swizzle atom (1024 B for D = 64, 512 B for D = 32): the
  // descriptors' base offset is 0.
  __shared__ __align__(1024) uint16_t q_s[mma::kBlockM * D];
  __shared__ __align__(1024) uint16_t k_s[mma::kStages * mma::kBlockN * D];
  __shared__ __align__(1024) uint16_t v_s[mma::kStages * mma::kBlockN * D];
  walk_work_items<WgmmaItem<T, D>>(a, q_s, k_s, v_s);
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a code: the host never launches it then (wgmma_forward_built)
#endif
}

template <typename T, int D>
void launch(const MmaFwdArgs& a, cudaStream_t stream) {
  static const int ctas_per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, wgmma_forward_kernel<T, D>,
                                                                 mma::kThreads, 0));
    return n > 0 ? n : 1;
  }();
  const int64_t q_tiles = attn::ceil_div(a.q_len, mma::kBlockM);
  const int64_t grid = mma::grid_size(static_cast<int64_t>(a.batch) * a.out_heads * q_tiles,
                                      a.sm_count, ctas_per_sm);
  wgmma_forward_kernel<T, D><<<static_cast<unsigned>(grid), mma::kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool wgmma_forward_built() {
#if defined(SPARSEBERT_HAS_SM90A)
  return true;
#else
  return false;
#endif
}

void launch_wgmma_forward(bool bf16, const MmaFwdArgs& a, cudaStream_t stream) {
  if (bf16) {
    a.head_dim == 32 ? launch<__nv_bfloat16, 32>(a, stream) : launch<__nv_bfloat16, 64>(a, stream);
  } else {
    a.head_dim == 32 ? launch<__half, 32>(a, stream) : launch<__half, 64>(a, stream);
  }
}

}  // namespace cuda_mma
}  // namespace sparsebert
