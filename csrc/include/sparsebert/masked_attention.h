// masked_attention: shapes, validation and the gate normalisation shared by the CPU and CUDA kernels.
//
// Contract (see sparsebert/ops.py for the schema and sparsebert/reference.py for the oracle):
//   q: (B, Sq, H, D), k, v: (B, Sk, H, D); any strides (the kernels copy a non-unit last dim).
//   head_gate: (H,) or (B, H); key_padding_mask: (B, Sk) bool, true = real token.
//   out: (B, Sq, H, D) contiguous, out[b, :, h] = gate[b, h] * softmax(q k^T * scale) v.
//   lse: (B, H, Sq) log-sum-exp of the scaled scores (0 for pruned heads), kept for backward;
//        fp32, or fp64 for fp64 inputs. d_head_gate (B, H) has the same dtype.
// A head with gate exactly 0 is pruned: never computed, output 0, all its gradients 0.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sparsebert {

struct AttentionShape {
  int64_t batch;      // B
  int64_t q_len;      // Sq
  int64_t kv_len;     // Sk
  int64_t heads;      // H
  int64_t head_dim;   // D
};

// Validates q, k, v, head_gate, key_padding_mask (ranks, shapes, dtypes, devices, strides,
// no fully padded row) and returns the sizes. Every failure names the argument.
AttentionShape check_masked_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& head_gate,
                                             const std::optional<at::Tensor>& key_padding_mask);

// Extra checks for the backward: dout like q, out like q, lse (B, H, Sq) of the stat dtype.
void check_masked_attention_backward_inputs(const AttentionShape& shape, const at::Tensor& q,
                                            const at::Tensor& dout, const at::Tensor& out,
                                            const at::Tensor& lse);

// masked_attention_compact's kept_heads: 1-d int32/int64 on q's device, at most H entries; values
// in [0, H) are checked for CPU tensors (on CUDA that would synchronise; the kernels write zeros
// for an index out of range).
void check_kept_heads(const at::Tensor& kept_heads, const at::Tensor& q, const AttentionShape& s);

// head_gate read in place: gate[b, h] = values[b * stride_b + h * stride_h]. An (H,) gate has
// stride_b = 0 (no expanded copy); values is converted to `dtype` only when it differs (fp32 for
// the CUDA kernels and fp16/bf16/fp32 CPU inputs, fp64 for fp64 so gradcheck sees an exact gate).
// Every offset fits in 32 bits (a view whose strides reach further is copied contiguous): the
// CUDA kernels' gate scan indexes it with int.
struct GateView {
  at::Tensor values;  // (H,) or (B, H), any strides
  int64_t stride_b;
  int64_t stride_h;
};
GateView gate_view(const at::Tensor& head_gate, at::ScalarType dtype = at::kFloat);

// t itself when its last dim has stride 1, else a contiguous copy (the kernels need unit stride
// along D; the other strides stay arbitrary).
at::Tensor last_dim_contiguous(const at::Tensor& t);

}  // namespace sparsebert
