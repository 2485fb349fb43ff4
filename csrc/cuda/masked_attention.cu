// masked_attention on CUDA: host entry points (validation, allocation, path choice) and the
// dispatcher registration. Kernels: masked_attention_mma.cu, masked_attention_mma_bwd.cu and their
// fp32 variants masked_attention_mma_tf32.cu, masked_attention_mma_bwd_tf32.cu (the mma.sync
// ones); masked_attention_fwd.cu, masked_attention_bwd.cu (WMMA and SIMT).
//
// Path choice (SPARSEBERT_ATTENTION_KERNEL unset, "default" or "mma"): the mma.sync forward
// (masked_attention_mma.cu) where it applies (fp16/bf16, D 32/64, sm80+, 16-byte aligned rows),
// its 3xTF32 variant for fp32 inputs under the same conditions (masked_attention_mma_tf32.cu),
// and the one-launch mma.sync backward (masked_attention_mma_bwd.cu; one CTA per head for
// Sq, Sk <= 128, per 128-row key or query block beyond; fp32: the 3xTF32
// masked_attention_mma_bwd_tf32.cu, 64-row blocks) where moreover dout and out have 16-byte
// aligned rows. They passed the CUDA tests on an H200 and are faster there than the kernels
// below (bench/results/*-nvidia-h200.md). Elsewhere, and with SPARSEBERT_ATTENTION_KERNEL=wmma
// (the defaults before them): fp16/bf16 with head_dim 32 or 64 on sm80+ use the WMMA kernels,
// fp32, other head dims (<= 512) and older GPUs the SIMT kernels. SPARSEBERT_ATTENTION_KERNEL=simt
// forces the SIMT kernels (a debugging aid: the paths must agree). SPARSEBERT_ATTENTION_KERNEL=wgmma
// runs the forward with Hopper's wgmma instead of mma.sync (masked_attention_wgmma.cu) where the
// build has sm_90a code and the GPU is compute capability 9.0, the mma.sync kernels elsewhere and
// for the backward; opt-in: not yet run on a GPU.
// masked_attention_compact (output (B, S, H_kept, D)) runs the mma.sync forward on the kept heads
// where it applies, else it gathers the kept heads and runs the other forward.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "masked_attention_common.cuh"
#include "masked_attention_mma.cuh"
#include "sparsebert/checks.h"
#include "sparsebert/masked_attention.h"
#include "sparsebert/mma_layout.h"
#include "sparsebert/registry.h"

namespace sparsebert {
namespace {

using cuda_attn::DType;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat;  // checked to be fp32 by check_cuda_inputs
  }
}

void check_cuda_inputs(const at::Tensor& q, const AttentionShape& s) {
  SB_CHECK_ARG(q.is_cuda(), "q", "expected a CUDA tensor for the CUDA kernel, got ", q.device());
  const auto t = q.scalar_type();
  SB_CHECK_ARG(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "q",
               "the CUDA kernel supports float32, float16 and bfloat16, got ", t,
               " (float64 runs on CPU only)");
  SB_CHECK_ARG(s.head_dim <= attn::kSimtMaxHeadDim, "q", "the CUDA kernel supports head_dim D <= ",
               attn::kSimtMaxHeadDim, ", got D = ", s.head_dim);
  const int64_t int_max = std::numeric_limits<int>::max();
  SB_CHECK_ARG(s.batch * s.heads * std::max(s.q_len, s.kv_len) <= int_max &&
                   s.batch * std::max(s.q_len, s.kv_len) * s.heads * s.head_dim <= (int64_t{1} << 40),
               "q", "tensor too large for the CUDA kernel: q ", shape_str(q.sizes()));
}

attn::Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// 16-byte vector loads need a 16-byte aligned base and rows/heads that start on 16-byte boundaries.
bool vec16_ok(const at::Tensor& t) {
  const int64_t esize = t.element_size();
  const auto ptr = reinterpret_cast<uintptr_t>(t.data_ptr());
  return ptr % 16 == 0 && (t.size(3) * esize) % 16 == 0 && (t.stride(0) * esize) % 16 == 0 &&
         (t.stride(1) * esize) % 16 == 0 && (t.stride(2) * esize) % 16 == 0;
}

bool use_tensor_cores(const at::Tensor& q, const AttentionShape& s) {
  const char* env = std::getenv("SPARSEBERT_ATTENTION_KERNEL");
  if (env != nullptr && std::strcmp(env, "simt") == 0) return false;
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  if (s.head_dim != 32 && s.head_dim != 64) return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

bool kernel_choice_is(const char* name) {
  const char* env = std::getenv("SPARSEBERT_ATTENTION_KERNEL");
  return env != nullptr && std::strcmp(env, name) == 0;
}

// Whether the mma.sync kernels apply: not switched off (simt, wmma), fp16/bf16 (or fp32: the
// 3xTF32 variants), D 32/64, sm80+, 16-byte aligned rows of q, k, v (the backward also needs them
// for dout and out). The kernels read the dtype from q.
bool use_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionShape& s) {
  if (kernel_choice_is("simt") || kernel_choice_is("wmma")) return false;
  const at::ScalarType t = q.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16 && t != at::kFloat) return false;
  if (s.head_dim != 32 && s.head_dim != 64) return false;
  if (!(vec16_ok(q) && vec16_ok(k) && vec16_ok(v))) return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// SPARSEBERT_ATTENTION_KERNEL=wgmma: the wgmma forward (fp16/bf16) where the build has sm_90a code
// and the GPU is compute capability 9.0 exactly (sm_90a code runs nowhere else); otherwise the
// mma.sync one. Opt-in until it has passed the CUDA tests on a GPU.
bool use_wgmma() {
  if (!kernel_choice_is("wgmma") || !cuda_mma::wgmma_forward_built()) return false;
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  return p->major == 9 && p->minor == 0;
}

float scale_log2(double scale) { return static_cast<float>(scale * 1.4426950408889634); }

// The mma.sync forward into out (B, Sq, H or H_kept, D) and lse (B, H or H_kept, Sq); kept: int32 or
// int64 (H_kept,) head of each output slot (compact), or none (dense: every head, pruned ones zero).
void launch_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const GateView& gate,
                const at::Tensor& mask, const std::optional<at::Tensor>& kept, const AttentionShape& s,
                double scale, at::Tensor& out, at::Tensor& lse) {
  cuda_mma::MmaFwdArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.q_st = strides_of(q);
  a.k_st = strides_of(k);
  a.v_st = strides_of(v);
  a.gate = gate.values.data_ptr<float>();
  a.gate_sb = gate.stride_b;
  a.gate_sh = gate.stride_h;
  a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  a.kept = kept.has_value() ? kept->data_ptr() : nullptr;
  a.kept_int64 = kept.has_value() && kept->scalar_type() == at::kLong;
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.batch = static_cast<int>(s.batch);
  a.q_len = static_cast<int>(s.q_len);
  a.kv_len = static_cast<int>(s.kv_len);
  a.heads = static_cast<int>(s.heads);
  a.head_dim = static_cast<int>(s.head_dim);
  a.out_heads = static_cast<int>(out.size(2));
  a.scale_log2 = scale_log2(scale);
  a.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (q.scalar_type() == at::kFloat) {
    cuda_mma::launch_mma_forward_tf32(a, at::cuda::getCurrentCUDAStream());
  } else if (use_wgmma()) {
    cuda_mma::launch_wgmma_forward(q.scalar_type() == at::kBFloat16, a, at::cuda::getCurrentCUDAStream());
  } else {
    cuda_mma::launch_mma_forward(q.scalar_type() == at::kBFloat16, a, at::cuda::getCurrentCUDAStream());
  }
}

std::tuple<at::Tensor, at::Tensor> masked_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& head_gate,
                                                         const std::optional<at::Tensor>& key_padding_mask,
                                                         double scale) {
  const AttentionShape s = check_masked_attention_inputs(q_in, k_in, v_in, head_gate, key_padding_mask);
  check_cuda_inputs(q_in, s);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const GateView gate = gate_view(head_gate);  // fp32, (H,) read with batch stride 0
  const at::Tensor mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.batch, s.q_len, s.heads, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(at::kFloat));
  if (use_mma(q, k, v, s)) {
    launch_mma(q, k, v, gate, mask, std::nullopt, s, scale, out, lse);
    return {out, lse};
  }

  cuda_attn::FwdArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.q_st = strides_of(q);
  a.k_st = strides_of(k);
  a.v_st = strides_of(v);
  a.gate = gate.values.data_ptr<float>();
  a.gate_sb = gate.stride_b;
  a.gate_sh = gate.stride_h;
  a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.batch = static_cast<int>(s.batch);
  a.q_len = static_cast<int>(s.q_len);
  a.kv_len = static_cast<int>(s.kv_len);
  a.heads = static_cast<int>(s.heads);
  a.head_dim = static_cast<int>(s.head_dim);
  a.scale_log2 = scale_log2(scale);
  a.vec16 = vec16_ok(q) && vec16_ok(k) && vec16_ok(v);
  cuda_attn::launch_attention_forward(to_dtype(q.scalar_type()), a, use_tensor_cores(q, s),
                                      at::cuda::getCurrentCUDAStream());
  return {out, lse};
}

// The fields both backward kernels' argument structs (cuda_attn::BwdArgs, cuda_mma::MmaBwdArgs)
// share: pointers, strides, gate view, mask, sizes and scale.
template <typename Args>
void fill_backward_args(Args& a, const AttentionShape& s, const at::Tensor& dout, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const GateView& gate,
                        const at::Tensor& mask, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                        at::Tensor& dv, at::Tensor& d_gate, double scale) {
  a.dout = dout.data_ptr();
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.dout_st = strides_of(dout);
  a.q_st = strides_of(q);
  a.k_st = strides_of(k);
  a.v_st = strides_of(v);
  a.out_st = strides_of(out);
  a.gate = gate.values.data_ptr<float>();
  a.gate_sb = gate.stride_b;
  a.gate_sh = gate.stride_h;
  a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  a.lse = lse.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.d_gate = d_gate.data_ptr<float>();
  a.batch = static_cast<int>(s.batch);
  a.q_len = static_cast<int>(s.q_len);
  a.kv_len = static_cast<int>(s.kv_len);
  a.heads = static_cast<int>(s.heads);
  a.head_dim = static_cast<int>(s.head_dim);
  a.scale = static_cast<float>(scale);
  a.scale_log2 = scale_log2(scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& head_gate, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out_in,
    const at::Tensor& lse, double scale) {
  const AttentionShape s = check_masked_attention_inputs(q_in, k_in, v_in, head_gate, key_padding_mask);
  check_masked_attention_backward_inputs(s, q_in, dout_in, out_in, lse);
  check_cuda_inputs(q_in, s);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in),
                   dout = last_dim_contiguous(dout_in), out = last_dim_contiguous(out_in);
  const GateView gate = gate_view(head_gate);
  const at::Tensor mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  if (use_mma(q, k, v, s) && vec16_ok(dout) && vec16_ok(out)) {
    // The one-launch mma.sync backward (3xTF32 for fp32): every output entry written by the kernel.
    at::Tensor dq = at::empty(q.sizes(), q.options());
    at::Tensor dk = at::empty(k.sizes(), k.options());
    at::Tensor dv = at::empty(v.sizes(), v.options());
    at::Tensor d_gate = at::empty({s.batch, s.heads}, q.options().dtype(at::kFloat));
    cuda_mma::MmaBwdArgs a{};
    fill_backward_args(a, s, dout, q, k, v, out, gate, mask, lse, dq, dk, dv, d_gate, scale);
    a.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    if (q.scalar_type() == at::kFloat) {
      cuda_mma::launch_mma_backward_tf32(a, at::cuda::getCurrentCUDAStream());
    } else {
      cuda_mma::launch_mma_backward(q.scalar_type() == at::kBFloat16, a, at::cuda::getCurrentCUDAStream());
    }
    return {dq, dk, dv, d_gate};
  }
  const bool tensor_cores = use_tensor_cores(q, s);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({s.batch, s.heads, s.q_len}, f32);
  at::Tensor d_gate = at::zeros({s.batch, s.heads}, f32);
  // Tensor-core path: dq accumulated with fp32 atomics (zeroed), converted below; SIMT: written.
  at::Tensor dq = tensor_cores ? at::zeros({s.batch, s.q_len, s.heads, s.head_dim}, f32)
                               : at::empty({s.batch, s.q_len, s.heads, s.head_dim}, q.options());
  at::Tensor dk = at::empty({s.batch, s.kv_len, s.heads, s.head_dim}, k.options());
  at::Tensor dv = at::empty({s.batch, s.kv_len, s.heads, s.head_dim}, v.options());

  cuda_attn::BwdArgs a{};
  fill_backward_args(a, s, dout, q, k, v, out, gate, mask, lse, dq, dk, dv, d_gate, scale);
  a.delta = delta.data_ptr<float>();
  a.vec16 = vec16_ok(q) && vec16_ok(k) && vec16_ok(v) && vec16_ok(dout);
  cuda_attn::launch_attention_backward(to_dtype(q.scalar_type()), a, tensor_cores,
                                       at::cuda::getCurrentCUDAStream());
  if (tensor_cores) dq = dq.to(q.scalar_type());
  return {dq, dk, dv, d_gate};
}

// Compact output: out (B, Sq, H_kept, D), slot j = head kept_heads[j] (its gate applied).
std::tuple<at::Tensor, at::Tensor> masked_attention_compact_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& head_gate,
    const at::Tensor& kept_heads, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const AttentionShape s = check_masked_attention_inputs(q_in, k_in, v_in, head_gate, key_padding_mask);
  check_kept_heads(kept_heads, q_in, s);
  check_cuda_inputs(q_in, s);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  if (kept_heads.numel() == 0) {
    return {at::empty({s.batch, s.q_len, 0, s.head_dim}, q.options()),
            at::empty({s.batch, 0, s.q_len}, q.options().dtype(at::kFloat))};
  }
  if (!use_mma(q, k, v, s)) {  // the other kernels: gather the kept heads, dense forward
    // Index values are not checked here (that would synchronise): an index out of range reads
    // head 0 and its slot is then zeroed (out and lse), as the mma.sync kernel does.
    const at::Tensor raw = kept_heads.to(at::kLong);
    const at::Tensor bad = raw.lt(0).logical_or(raw.ge(s.heads));
    const at::Tensor idx = raw.masked_fill(bad, 0);
    auto [out, lse] = masked_attention_cuda(q.index_select(2, idx), k.index_select(2, idx),
                                            v.index_select(2, idx), head_gate.index_select(-1, idx),
                                            key_padding_mask, scale);
    out.masked_fill_(bad.view({1, 1, -1, 1}), 0);
    lse.masked_fill_(bad.view({1, -1, 1}), 0);
    return {out, lse};
  }
  const GateView gate = gate_view(head_gate);
  const at::Tensor mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  // int32 or int64 indices, read in place by the kernel (an index out of range: a zeroed slot).
  const at::Tensor kept = kept_heads.contiguous();
  const int64_t n_kept = kept.size(0);
  at::Tensor out = at::empty({s.batch, s.q_len, n_kept, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.batch, n_kept, s.q_len}, q.options().dtype(at::kFloat));
  launch_mma(q, k, v, gate, mask, kept, s, scale, out, lse);
  return {out, lse};
}

}  // namespace

static KernelRegistration kCompactRegistration("masked_attention_compact", "CUDA");
static KernelRegistration kForwardRegistration("masked_attention", "CUDA");
static KernelRegistration kBackwardRegistration("masked_attention_backward", "CUDA");

}  // namespace sparsebert

TORCH_LIBRARY_IMPL(sparsebert, CUDA, m) {
  m.impl("masked_attention", &sparsebert::masked_attention_cuda);
  m.impl("masked_attention_backward", &sparsebert::masked_attention_backward_cuda);
  m.impl("masked_attention_compact", &sparsebert::masked_attention_compact_cuda);
}
