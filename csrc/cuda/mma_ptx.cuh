// PTX wrappers (sm80+) of the mma.sync attention kernels: cp.async, ldmatrix, mma.sync
// m16n8k16 (fp16/bf16) and m16n8k8 (tf32), and small register helpers. Their semantics
// (fragment layouts, ldmatrix lane mapping) are the PTX ISA's, replayed on the CPU by
// csrc/tests/test_mma_layout.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "sparsebert/mma_layout.h"

namespace sparsebert {
namespace cuda_mma {

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm80+).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; valid = false writes 16 zero bytes (src-size 0, nothing read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D (16x8 fp32) += A (16x16) B (16x8), A and B fp16 or bf16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D (16x8 fp32) += A (16x8) B (8x8), A and B tf32 (fp32 bit patterns; the tensor core reads
// the upper 19 bits).
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 3xTF32: D += A B with A = a_big + a_small, B = b_big + b_small (mma::tf32_split), the small
// products first; a_small b_small is dropped.
__device__ __forceinline__ void mma_1688_3xtf32(float (&d)[4], const uint32_t (&a_big)[4],
                                                const uint32_t (&a_small)[4], const uint32_t (&b_big)[2],
                                                const uint32_t (&b_small)[2]) {
  mma_1688_tf32(d, a_small, b_big[0], b_big[1]);
  mma_1688_tf32(d, a_big, b_small[0], b_small[1]);
  mma_1688_tf32(d, a_big, b_big[0], b_big[1]);
}

// Two floats -> one register of two 16-bit values (lo = first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The chunk masks of mma::find_active for a (B, H) gate read in place (entry e = (e / heads,
// e % heads), at gate[b * sb + h * sh], 32-bit offsets (GateView); active: non-zero). The gate is
// read a round of 256 entries at a time (mma::gate_round_bits: 8 per lane, loads back to back, one
// memory latency); two xor-shuffles give each group of 4 lanes its 32-entry chunk, and a chunk's
// mask is one shuffle from its group. A CTA's first item costs one latency per 256 entries before
// it, not one per 32. Call it with the same base from every lane of the warp (find_active does).
struct GateChunks {
  const float* gate;
  int sb, sh;
  int heads, total;
  int round = -1;     // first entry of the round held
  uint32_t word = 0;  // the chunk of this lane's group of 4 in that round

  __device__ __forceinline__ uint32_t operator()(int base) {
    const int first = mma::gate_round_first(base);
    if (first != round) {
      round = first;
      const int lane = threadIdx.x & 31;
      const uint32_t bits = mma::gate_round_bits(first, lane, total, heads,
                                                 [&](int b, int h) { return gate[b * sb + h * sh] != 0.0f; });
      word = bits << (mma::kGatePerLane * (lane & 3));
      word |= __shfl_xor_sync(0xffffffffu, word, 1);
      word |= __shfl_xor_sync(0xffffffffu, word, 2);
    }
    return __shfl_sync(0xffffffffu, word, mma::gate_round_chunk_lane(base));
  }
};

// Bit j set: key key0 + j is real (inside the sequence, kv_len keys, and not padding: mask, or
// nullptr for no padding). One ballot of the whole warp (every lane gets the word), one byte read
// per lane at most: the per-score test is then a bit test (mma::frag_c_key_real).
__device__ __forceinline__ uint32_t real_key_word(const bool* mask, int kv_len, int key0) {
  const int key = key0 + (threadIdx.x & 31);
  bool real = key < kv_len;
  if (real && mask != nullptr) real = mask[key];
  return __ballot_sync(0xffffffffu, real);
}


// Rows [0, rows) of a (b, h) slice (row r at src + r * row_stride) into a swizzled [rows][D]
// tile; rows >= valid_rows are zero-filled. All `threads` threads of the CTA take part: thread t
// copies chunks t + k * THREADS (mma::tile_chunk), which are the rows of its first chunk plus
// k * kRowStep at the same columns, so one source pointer per thread serves every copy round.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_async(uint16_t* tile, const uint16_t* src, int64_t row_stride,
                                                int valid_rows) {
  constexpr int kChunks = ROWS * D / 8;
  constexpr int kRowStep = THREADS / (D / 8);  // rows between a thread's copies
  static_assert(kChunks % THREADS == 0 && THREADS % (D / 8) == 0, "whole copy rounds");
  const mma::Coord c = mma::tile_chunk(threadIdx.x, D);
  const uint16_t* from = src + (c.row * row_stride + c.col);
#pragma unroll
  for (int k = 0; k < kChunks / THREADS; ++k) {
    const int row = c.row + k * kRowStep;
    const bool ok = row < valid_rows;
    cp_async_16(smem_u32(tile + mma::smem_offset(row, c.col, D)), ok ? from + k * kRowStep * row_stride : src, ok);
  }
}

// fp32 kernels (3xTF32). Rows [0, rows) of a (b, h) slice (row r at src + r * row_stride) into a
// swizzled [64][D] fp32 tile; rows >= valid_rows are zero-filled. All 128 threads take part.
template <int D>
__device__ __forceinline__ void load_tile_f32(float* tile, const float* src, int64_t row_stride,
                                              int valid_rows) {
  constexpr int kChunks = mma::kBlockM * D / 4;
  static_assert(kChunks % mma::kThreads == 0, "whole copy rounds");
#pragma unroll
  for (int k = 0; k < kChunks / mma::kThreads; ++k) {
    const mma::Coord c = mma::f32_tile_chunk(threadIdx.x + k * mma::kThreads, D);
    const bool ok = c.row < valid_rows;
    const float* from = ok ? src + (c.row * row_stride + c.col) : src;
    cp_async_16(smem_u32(tile + mma::f32_smem_offset(c.row, c.col, D)), from, ok);
  }
}

// x = big + small, both tf32 bit patterns (mma::tf32_split), as mma.sync operands.
__device__ __forceinline__ void split_to(float x, uint32_t& big, uint32_t& small) {
  const mma::Tf32Split s = mma::tf32_split(x);
  big = __float_as_uint(s.big);
  small = __float_as_uint(s.small);
}

}  // namespace cuda_mma
}  // namespace sparsebert
