// masked_attention: shapes, validation and the gate normalisation shared by the CPU and CUDA kernels.
//
// Contract (see sparsebert/ops.py for the schema and sparsebert/reference.py for the oracle):
//   q: (B, Sq, H, D), k, v: (B, Sk, H, D); any strides with a contiguous last dim.
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

// head_gate as a contiguous (B, H) tensor of `dtype` (fp32 by default; the CPU kernel uses fp64 for
// fp64 inputs so gradcheck sees an exact gate) on the gate's device.
at::Tensor gate_per_example(const at::Tensor& head_gate, int64_t batch,
                            at::ScalarType dtype = at::kFloat);

}  // namespace sparsebert
