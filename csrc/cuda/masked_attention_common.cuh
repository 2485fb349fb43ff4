// masked_attention CUDA: kernel arguments, launcher declarations and small device helpers shared
// by masked_attention_fwd.cu, masked_attention_bwd.cu and masked_attention.cu (host entry points).
// The arithmetic itself lives in sparsebert/attention_math.h (tested on the CPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sparsebert/attention_math.h"

namespace sparsebert {
namespace cuda_attn {

enum class DType { kFloat, kHalf, kBFloat16 };

// Everything the forward kernels need (passed by value).
struct FwdArgs {
  const void* q;  // (B, Sq, H, D) strided, last dim contiguous
  const void* k;  // (B, Sk, H, D) strided
  const void* v;  // (B, Sk, H, D) strided
  attn::Strides q_st, k_st, v_st;
  const float* gate;  // fp32, gate[b, h] = gate[b * gate_sb + h * gate_sh] ((H,): gate_sb = 0)
  int64_t gate_sb, gate_sh;
  const bool* mask;   // (B, Sk) contiguous, true = real token; nullptr = no padding
  void* out;          // (B, Sq, H, D) contiguous, dtype of q
  float* lse;         // (B, H, Sq) contiguous
  int batch, q_len, kv_len, heads, head_dim;
  float scale_log2;  // scale * log2(e)
  bool vec16;        // q, k, v base pointers and strides allow 16-byte loads
};

// Everything the backward kernels need.
struct BwdArgs {
  const void* dout;  // (B, Sq, H, D) strided
  const void* q;
  const void* k;
  const void* v;
  const void* out;  // (B, Sq, H, D) strided, forward output
  attn::Strides dout_st, q_st, k_st, v_st, out_st;
  const float* gate;  // fp32, gate[b, h] = gate[b * gate_sb + h * gate_sh] ((H,): gate_sb = 0)
  int64_t gate_sb, gate_sh;
  const bool* mask;   // (B, Sk) or nullptr
  const float* lse;   // (B, H, Sq) natural-log lse from the forward
  float* delta;       // (B, H, Sq) scratch: sum_d dout * out
  void* dq;           // SIMT path: (B, Sq, H, D) dtype of q. WMMA path: fp32 accumulator (zeroed)
  void* dk;           // (B, Sk, H, D) contiguous
  void* dv;           // (B, Sk, H, D) contiguous
  float* d_gate;      // (B, H) fp32, zeroed; kernels atomically add
  int batch, q_len, kv_len, heads, head_dim;
  float scale;       // softmax scale (dq, dk)
  float scale_log2;  // scale * log2(e)
  bool vec16;        // q, k, v, dout allow 16-byte loads
};

// Launchers (defined in the _fwd / _bwd .cu files). `tensor_cores` selects the WMMA kernels; the
// caller guarantees dtype in {half, bf16}, head_dim in {32, 64} and compute capability >= 8.0.
void launch_attention_forward(DType dtype, const FwdArgs& a, bool tensor_cores, cudaStream_t stream);
void launch_attention_backward(DType dtype, const BwdArgs& a, bool tensor_cores, cudaStream_t stream);

#ifdef __CUDACC__

// ---------------------------------------------------------------------------------------------
// Device helpers.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Sum over aligned groups of `group` lanes (a power of two <= 32, the same for the whole warp);
// every lane of a group ends with the group's sum. Must be reached by all 32 lanes.
__device__ __forceinline__ float group_sum(float v, int group) {
  for (int off = group >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Copy rows [row0, row0 + ROWS) of one (b, h) slice of a 16-bit (B, S, H, D) view into a shared
// tile [ROWS][LD]; rows >= nrows are zero-filled (so that no uninitialised value can reach a
// product: 0 * NaN would be NaN). `src` points at (b, row 0, h, 0); row r is at src + r * row_stride.
// vec16: 16-byte loads (8 elements), else element-wise. All threads of the CTA take part.
template <typename T, int D, int ROWS, int LD, int THREADS>
__device__ __forceinline__ void load_tile_16b(T* dst, const T* src, int64_t row_stride, int row0,
                                              int nrows, bool vec16) {
  static_assert(sizeof(T) == 2 && D % 8 == 0 && LD % 8 == 0, "16-bit tiles, 16-byte rows");
  if (vec16) {
    constexpr int kPerRow = D / 8;
    for (int i = threadIdx.x; i < ROWS * kPerRow; i += THREADS) {
      const int r = i / kPerRow, c = (i % kPerRow) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (row0 + r < nrows) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * row_stride + c);
      *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * D; i += THREADS) {
      const int r = i / D, c = i % D;
      dst[r * LD + c] = (row0 + r < nrows) ? src[(row0 + r) * row_stride + c] : from_float<T>(0.0f);
    }
  }
}

// Same for any T, converted to fp32, dense rows [rows][D] (SIMT path; D is a run-time value).
template <typename T>
__device__ __forceinline__ void load_tile_f32(float* dst, const T* src, int64_t row_stride, int row0,
                                              int nrows, int rows, int head_dim) {
  for (int i = threadIdx.x; i < rows * head_dim; i += blockDim.x) {
    const int r = i / head_dim, c = i % head_dim;
    dst[i] = (row0 + r < nrows) ? to_float(src[(row0 + r) * row_stride + c]) : 0.0f;
  }
}

// Key bias of keys [k0, k0 + n) of example b into shared memory (0 real, -inf padded/outside).
__device__ __forceinline__ void load_key_bias(float* bias, const bool* mask, int b, int k0, int n,
                                              int kv_len) {
  for (int c = threadIdx.x; c < n; c += blockDim.x) {
    const int key = k0 + c;
    const bool in_range = key < kv_len;
    const bool real = (mask == nullptr || !in_range) ? true : mask[static_cast<int64_t>(b) * kv_len + key];
    bias[c] = attn::key_bias(in_range, real);
  }
}

// Zero `rows` rows starting at row0 of the (b, h) slice of a contiguous (B, S, H, D) tensor
// (rows >= seq skipped). Used by the CTAs of pruned heads. All threads of the CTA take part.
template <typename T>
__device__ __forceinline__ void zero_rows(T* dst, int b, int h, int row0, int rows, int seq, int heads,
                                          int head_dim) {
  for (int i = threadIdx.x; i < rows * head_dim; i += blockDim.x) {
    const int r = i / head_dim, d = i % head_dim;
    if (row0 + r < seq)
      dst[attn::bshd_contiguous_offset(b, row0 + r, h, seq, heads, head_dim) + d] = from_float<T>(0.0f);
  }
}

#endif  // __CUDACC__

}  // namespace cuda_attn
}  // namespace sparsebert
