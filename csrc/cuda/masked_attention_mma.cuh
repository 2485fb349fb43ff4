// masked_attention tensor-core (mma.sync) forward: kernel arguments and launcher, shared by
// masked_attention_mma.cu (kernel) and masked_attention.cu (host entry points).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "sparsebert/attention_math.h"

namespace sparsebert {
namespace cuda_mma {

struct MmaFwdArgs {
  const void* q;  // (B, Sq, H, D) fp16/bf16 (or fp32: launch_mma_forward_tf32), last dim
                  // contiguous, 16-byte aligned rows
  const void* k;  // (B, Sk, H, D)
  const void* v;  // (B, Sk, H, D)
  attn::Strides q_st, k_st, v_st;  // element strides of B, S, H
  const float* gate;               // gate[b, h] = gate[b * gate_sb + h * gate_sh]; (H,): gate_sb = 0
  int64_t gate_sb, gate_sh;
  const bool* mask;     // (B, Sk) contiguous, true = real token; nullptr = no padding
  const void* kept;     // compact output: (out_heads,) head index of each output slot, int32 or
                        // int64 (kept_int64), read in place; dense: nullptr
  bool kept_int64;
  void* out;            // (B, Sq, out_heads, D) contiguous, dtype of q
  float* lse;           // (B, out_heads, Sq) contiguous fp32
  int batch, q_len, kv_len, heads, head_dim, out_heads;
  float scale_log2;  // scale * log2(e)
  int sm_count;      // multiprocessors of the device (persistent grid size)
};

// Eligible inputs: fp16/bf16 (bf16 = true for bfloat16), head_dim 32 or 64, compute capability
// >= 8.0, 16-byte aligned base pointers and strides (checked by the caller).
void launch_mma_forward(bool bf16, const MmaFwdArgs& a, cudaStream_t stream);

// fp32 inputs, 3xTF32 (masked_attention_mma_tf32.cu): the same arguments (q, k, v, out fp32),
// head_dim 32 or 64, compute capability >= 8.0, 16-byte aligned base pointers and strides.
void launch_mma_forward_tf32(const MmaFwdArgs& a, cudaStream_t stream);

// The same forward with wgmma (masked_attention_wgmma.cu; fp16/bf16): only on a compute
// capability 9.0 GPU of a build with sm_90a code (wgmma_forward_built()).
bool wgmma_forward_built();
void launch_wgmma_forward(bool bf16, const MmaFwdArgs& a, cudaStream_t stream);

}  // namespace cuda_mma
}  // namespace sparsebert

namespace sparsebert {
namespace cuda_mma {

struct MmaBwdArgs {
  const void* dout;  // (B, Sq, H, D), last dim contiguous, 16-byte aligned rows
  const void* q;
  const void* k;
  const void* v;
  const void* out;   // forward output (B, Sq, H, D)
  attn::Strides dout_st, q_st, k_st, v_st, out_st;
  const float* gate;  // as MmaFwdArgs
  int64_t gate_sb, gate_sh;
  const bool* mask;   // (B, Sk) contiguous or nullptr
  const float* lse;   // (B, H, Sq) natural log, from the forward
  void* dq;           // (B, Sq, H, D) contiguous, dtype of q
  void* dk;           // (B, Sk, H, D) contiguous
  void* dv;           // (B, Sk, H, D) contiguous
  float* d_gate;      // (B, H) fp32, every entry written (pruned heads 0)
  int batch, q_len, kv_len, heads, head_dim;
  float scale, scale_log2;
  int sm_count;
};

// One launch for the whole backward; the caller guarantees fp16/bf16, head_dim 32 or 64,
// compute capability >= 8.0 and 16-byte aligned rows (any q_len, kv_len).
void launch_mma_backward(bool bf16, const MmaBwdArgs& a, cudaStream_t stream);

// fp32 inputs, 3xTF32 (masked_attention_mma_bwd_tf32.cu): the same arguments (every tensor fp32),
// head_dim 32 or 64, compute capability >= 8.0, 16-byte aligned rows, any q_len, kv_len.
void launch_mma_backward_tf32(const MmaBwdArgs& a, cudaStream_t stream);

}  // namespace cuda_mma
}  // namespace sparsebert
