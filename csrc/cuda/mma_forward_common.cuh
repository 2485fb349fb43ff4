// What the two mma.sync forward kernels share (masked_attention_mma.cu: fp16/bf16,
// masked_attention_mma_tf32.cu: fp32 with 3xTF32): the gate read, the persistent grid's walk over
// work items, the online-softmax step on a tile of S accumulators, and the lse store. The
// kernels differ only in how they load tiles, multiply, and write O.
#pragma once

#include <cuda_runtime.h>

#include "masked_attention_mma.cuh"
#include "mma_ptx.cuh"
#include "sparsebert/attention_math.h"
#include "sparsebert/mma_layout.h"

namespace sparsebert {
namespace cuda_mma {

__device__ __forceinline__ float gate_at(const MmaFwdArgs& a, int b, int h) {
  return a.gate[b * a.gate_sb + h * a.gate_sh];
}

// A 64-row tile of a (b, h) slice into swizzled shared memory by all 128 threads (cp.async):
// 16-bit elements (mma_ptx.cuh's load_tile_async) or fp32 (load_tile_f32).
template <int D>
__device__ __forceinline__ void load_block_tile(uint16_t* tile, const uint16_t* src, int64_t row_stride,
                                                int valid_rows) {
  load_tile_async<D, mma::kBlockM, mma::kThreads>(tile, src, row_stride, valid_rows);
}
template <int D>
__device__ __forceinline__ void load_block_tile(float* tile, const float* src, int64_t row_stride, int valid_rows) {
  load_tile_f32<D>(tile, src, row_stride, valid_rows);
}

// Head h of example b of a (B, S, H, D) input with element strides st.
template <typename Elem>
__device__ __forceinline__ const Elem* head_slice(const void* base, const attn::Strides& st, int b, int h) {
  return static_cast<const Elem*>(base) + b * st.b + h * st.h;
}

// Step 1 of an item: the Q tile (rows q0 ..) and K/V stage 0, one cp.async group.
template <int D, typename Elem>
__device__ __forceinline__ void load_first_stage(const MmaFwdArgs& a, const Elem* q, const Elem* k, const Elem* v,
                                                 int q0, Elem* q_s, Elem* k_s, Elem* v_s) {
  load_block_tile<D>(q_s, q + q0 * a.q_st.s, a.q_st.s, a.q_len - q0);
  load_block_tile<D>(k_s, k, a.k_st.s, a.kv_len);
  load_block_tile<D>(v_s, v, a.v_st.s, a.kv_len);
  cp_async_commit();
}

// Step 2a of key tile kt: wait for stage kt, barrier (it also means every warp is done with tile
// kt - 1, whose buffer is then free), prefetch stage kt + 1 into that buffer. One barrier per tile:
// Q is only ever read by the warp that owns its rows. Returns stage kt's buffer index.
// async_proxy (the wgmma forward, sm_90a): the copies are also made visible to wgmma's reads
// (fence.proxy.async before the barrier).
template <int D, typename Elem>
__device__ __forceinline__ int next_kv_stage(const MmaFwdArgs& a, const Elem* k, const Elem* v, int kt, int key_tiles,
                                             Elem* k_s, Elem* v_s, bool async_proxy = false) {
  constexpr int kTile = mma::kBlockM * D;
  const int stage = kt & 1;
  cp_async_wait<0>();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if (async_proxy) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
  __syncthreads();
  if (kt + 1 < key_tiles) {
    const int k0 = (kt + 1) * mma::kBlockN;
    load_block_tile<D>(k_s + (stage ^ 1) * kTile, k + k0 * a.k_st.s, a.k_st.s, a.kv_len - k0);
    load_block_tile<D>(v_s + (stage ^ 1) * kTile, v + k0 * a.v_st.s, a.v_st.s, a.kv_len - k0);
    cp_async_commit();
  }
  return stage;
}

// Zero rows [row0, row0 + rows) of output head slot oh of example b (16-byte stores), and its lse.
template <typename Elem, int D>
__device__ __forceinline__ void zero_out_slice(const MmaFwdArgs& a, int b, int oh, int row0, int rows) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(Elem));
  constexpr int kU = D / kPer;
  Elem* out = static_cast<Elem*>(a.out);
  const int64_t units = static_cast<int64_t>(rows) * kU;  // past 2^31 at S >= 2^27 (fp32, D=64)
  for (int64_t i = threadIdx.x; i < units; i += mma::kThreads) {
    const int s = row0 + static_cast<int>(i / kU);
    const int64_t off = (static_cast<int64_t>(b) * a.q_len + s) * a.out_heads * D +
                        static_cast<int64_t>(oh) * D + (i % kU) * kPer;
    *reinterpret_cast<uint4*>(out + off) = make_uint4(0u, 0u, 0u, 0u);
  }
  for (int i = threadIdx.x; i < rows; i += mma::kThreads)
    a.lse[attn::bhs_index(b, oh, row0 + i, a.out_heads, a.q_len)] = 0.0f;
}

// The persistent grid: every CTA walks the work items (active (b, h), 64-row query tile) in
// increasing order. Item::zero(a, b, oh, row0, rows) zero-fills rows of output head slot oh (and
// its lse); Item::attend(a, b, h, oh, q0, gate, q_s, k_s, v_s) computes one item. Pruned heads get
// no work items: dense output zero-fills their slices after the items; compact output visits every
// kept head. (Static functions rather than lambdas: ptxas allocated registers
// differently with either kind of lambda capture, spilling in one kernel or the other.)
template <typename Item, typename Elem>
__device__ __forceinline__ void walk_work_items(const MmaFwdArgs& a, Elem* q_s, Elem* k_s,
                                                Elem* v_s) {
  const int q_tiles = static_cast<int>(attn::ceil_div(a.q_len, mma::kBlockM));

  // Work items in increasing order; an entry is (b, output head slot).
  const int entries = a.batch * a.out_heads;
  mma::ActiveCursor cursor;
  GateChunks chunks{a.gate, static_cast<int>(a.gate_sb), static_cast<int>(a.gate_sh), a.heads, entries};
  for (int w = blockIdx.x;; w += gridDim.x) {
    const int act = mma::item_active(w, q_tiles), tile = mma::item_tile(w, q_tiles);
    int entry;
    if (a.kept != nullptr) {  // compact: every kept head of every example is an item
      entry = act < entries ? act : -1;
    } else {                  // dense: the act-th (b, h) with a non-zero gate
      entry = mma::find_active(cursor, act, entries, chunks);
    }
    if (entry < 0) break;
    const int b = entry / a.out_heads, oh = entry % a.out_heads;
    const int64_t kept_h = a.kept == nullptr ? oh
                           : a.kept_int64   ? static_cast<const int64_t*>(a.kept)[oh]
                                            : static_cast<const int32_t*>(a.kept)[oh];
    const bool head_ok = kept_h >= 0 && kept_h < a.heads;  // an index out of range gives zeros
    const int h = head_ok ? static_cast<int>(kept_h) : 0;
    const float gate = head_ok ? gate_at(a, b, h) : 0.0f;
    const int q0 = tile * mma::kBlockM;
    __syncthreads();  // the previous item's shared-memory reads are done
    if (gate == 0.0f) {  // compact output of a head pruned for this example (or a bad index)
      Item::zero(a, b, oh, q0, min(mma::kBlockM, a.q_len - q0));
      continue;
    }
    Item::attend(a, b, h, oh, q0, gate, q_s, k_s, v_s);
  }

  // Last (dense output): the slices of pruned heads are zeros, taken by the CTAs from the last
  // one down (those with the fewest items), their gate bits from the scan's round when it is the
  // same (no memory latency before the first item, usually none here either).
  if (a.kept == nullptr) {
    for (int bh = gridDim.x - 1 - blockIdx.x; bh < entries; bh += gridDim.x) {
      const int bit = bh % 32;
      if (((chunks(bh - bit) >> bit) & 1u) == 0u) Item::zero(a, bh / a.heads, bh % a.heads, 0, a.q_len);
    }
  }
}

// The real keys of the 64-key tile starting at key0 (all_real: every key, no per-score test).
struct TileKeys {
  uint32_t word[2];  // bit j of word w: key key0 + 32 w + j is real
  bool all_real;     // the same for every thread of the CTA
};
__device__ __forceinline__ TileKeys tile_keys(const MmaFwdArgs& a, const bool* mask, int key0) {
  static_assert(mma::kBlockN == 64, "two 32-key words per tile");
  TileKeys t;
  t.all_real = mask == nullptr && key0 + mma::kBlockN <= a.kv_len;
  if (!t.all_real) {
    t.word[0] = real_key_word(mask, a.kv_len, key0);
    t.word[1] = real_key_word(mask, a.kv_len, key0 + 32);
  }
  return t;
}

// Max over this lane's scores of row group + 8 r (accumulators 2 r and 2 r + 1 of every n-tile),
// as a tree (depth log2(2 kNt) rather than a chain of 2 kNt dependent steps).
template <int kNt>
__device__ __forceinline__ float row_max_tree(const float (&s)[kNt][4], int r) {
  float v[kNt];
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt) v[nt] = fmaxf(s[nt][2 * r], s[nt][2 * r + 1]);
#pragma unroll
  for (int width = kNt / 2; width > 0; width /= 2)
#pragma unroll
    for (int i = 0; i < width; ++i) v[i] = fmaxf(v[i], v[i + width]);
  return v[0];
}

// Step 2c of a key tile: S accumulators s[kNt][4] (this lane's rows group and group + 8) with the
// keys that are not real at -inf, the online-softmax update of the row maxima m (log2 domain) and
// partial sums l, O rescaled, and s replaced by P = exp2(scale_log2 s - m) (attention_math.h:
// online_softmax_update, exp2_shift, exp2_approx). With scale > 0 (always, in practice) the row
// max is taken on the raw scores and the scale folded into the exponent's FFMA.
template <int kNt, int kDt>
__device__ __forceinline__ void online_softmax_tile(const MmaFwdArgs& a, const TileKeys& keys, int lane,
                                                    float (&s)[kNt][4], float (&m)[2], float (&l)[2],
                                                    float (&o)[kDt][4]) {
  const bool fold = a.scale_log2 > 0.0f;  // max(c s) = c max(s)
  if (!fold) {
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] *= a.scale_log2;
  }
  if (!keys.all_real) {
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (!mma::frag_c_key_real(keys.word, lane, nt, i)) s[nt][i] = attn::neg_inf();
  }
  const float mul = fold ? a.scale_log2 : 1.0f;
  float tile_max[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) tile_max[r] = row_max_tree<kNt>(s, r);
  float alpha[2], shift[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    alpha[r] = attn::online_softmax_update(m[r], l[r], quad_max(tile_max[r]) * mul);
    shift[r] = attn::exp2_shift(m[r]);
  }
#pragma unroll
  for (int dt = 0; dt < kDt; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[dt][i] *= alpha[i >> 1];
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[nt][i] = attn::exp2_approx(fmaf(s[nt][i], mul, -shift[i >> 1]));
      l[i >> 1] += s[nt][i];
    }
}

// The lse of this warp's rows q0 + 16 * warp + {group, group + 8}, written by one lane per quad
// (l already summed over the quad).
__device__ __forceinline__ void store_lse(const MmaFwdArgs& a, int b, int oh, int q0, int warp,
                                          int lane, const float (&m)[2], const float (&l)[2]) {
  if (mma::thread_in_group(lane) != 0) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int s_row = q0 + 16 * warp + mma::group_id(lane) + 8 * r;
    if (s_row < a.q_len)
      a.lse[attn::bhs_index(b, oh, s_row, a.out_heads, a.q_len)] = attn::softmax_lse(m[r], l[r]);
  }
}

}  // namespace cuda_mma
}  // namespace sparsebert
