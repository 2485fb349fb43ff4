#include "sparsebert/masked_attention.h"

#include <cstdint>

#include "sparsebert/checks.h"

namespace sparsebert {

AttentionShape check_masked_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& head_gate,
                                             const std::optional<at::Tensor>& key_padding_mask) {
  check_rank(q, "q", 4, "(B, S, H, D)");
  check_rank(k, "k", 4, "(B, S, H, D)");
  check_rank(v, "v", 4, "(B, S, H, D)");
  AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  // The same wording as the Python wrapper's checks (sparsebert/ops.py).
  SB_CHECK_ARG(s.head_dim > 0, "q", "'q' has head dim D = q.shape[-1] = ", s.head_dim,
               "; expected D >= 1 (q is (B, S, H, D), got ", shape_str(q.sizes()), ")");
  SB_CHECK_ARG(s.batch > 0, "q", "'q' has B = q.shape[0] = ", s.batch, "; expected B >= 1");
  SB_CHECK_ARG(s.q_len > 0, "q", "'q' has S = q.shape[1] = ", s.q_len, "; expected S >= 1");
  SB_CHECK_ARG(s.heads > 0, "q", "'q' has H = q.shape[2] = ", s.heads, "; expected H >= 1");
  SB_CHECK_ARG(s.kv_len > 0, "k", "'k' has S = k.shape[1] = ", s.kv_len, "; expected S >= 1");
  SB_CHECK_ARG(k.size(0) == s.batch && k.size(2) == s.heads && k.size(3) == s.head_dim, "k",
               "expected (", s.batch, ", S, ", s.heads, ", ", s.head_dim, ") to match q ",
               shape_str(q.sizes()), ", got ", shape_str(k.sizes()));
  SB_CHECK_ARG(v.sizes() == k.sizes(), "v", "expected the shape of k ", shape_str(k.sizes()),
               ", got ", shape_str(v.sizes()));
  check_float_dtype(q, "q");
  SB_CHECK_ARG(k.scalar_type() == q.scalar_type(), "k", "expected dtype ",
               dtype_str(q.scalar_type()), " like q, got ", dtype_str(k.scalar_type()));
  SB_CHECK_ARG(v.scalar_type() == q.scalar_type(), "v", "expected dtype ",
               dtype_str(q.scalar_type()), " like q, got ", dtype_str(v.scalar_type()));
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");

  SB_CHECK_ARG(is_kernel_float(head_gate.scalar_type()), "head_gate",
               "expected a float16/bfloat16/float32/float64 gate (e.g. mask.float(): 1 = keep, 0 = pruned, "
               "fractions = soft gates), got ", dtype_str(head_gate.scalar_type()));
  check_same_device(head_gate, q, "head_gate", "q");
  const bool gate_ok = (head_gate.dim() == 1 && head_gate.size(0) == s.heads) ||
                       (head_gate.dim() == 2 && head_gate.size(0) == s.batch &&
                        head_gate.size(1) == s.heads);
  SB_CHECK_ARG(gate_ok, "head_gate", "expected shape (H,) = (", s.heads, ",) or (B, H) = (",
               s.batch, ", ", s.heads, "), got ", shape_str(head_gate.sizes()));

  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    SB_CHECK_ARG(m.scalar_type() == at::kBool, "key_padding_mask",
                 "expected a bool tensor (true = real token), got ", dtype_str(m.scalar_type()));
    SB_CHECK_ARG(m.dim() == 2 && m.size(0) == s.batch && m.size(1) == s.kv_len, "key_padding_mask",
                 "expected shape (B, S) = (", s.batch, ", ", s.kv_len, "), got ",
                 shape_str(m.sizes()));
    check_same_device(m, q, "key_padding_mask", "q");
    // On CUDA this check would synchronise (and break graph capture): the Python wrapper does it
    // there outside capture; here it runs for CPU tensors.
    const bool all_rows_have_a_token = !m.is_cpu() || m.any(1).all().item<bool>();
    SB_CHECK_ARG(all_rows_have_a_token, "key_padding_mask",
                 "every row needs at least one real token (true); a fully padded row has no "
                 "defined attention");
  }
  return s;
}

void check_masked_attention_backward_inputs(const AttentionShape& s, const at::Tensor& q,
                                            const at::Tensor& dout, const at::Tensor& out,
                                            const at::Tensor& lse) {
  SB_CHECK_ARG(dout.sizes() == q.sizes(), "dout", "expected the shape of q ", shape_str(q.sizes()),
               ", got ", shape_str(dout.sizes()));
  SB_CHECK_ARG(out.sizes() == q.sizes(), "out", "expected the shape of q ", shape_str(q.sizes()),
               ", got ", shape_str(out.sizes()));
  SB_CHECK_ARG(dout.scalar_type() == q.scalar_type(), "dout", "expected dtype ",
               dtype_str(q.scalar_type()), ", got ", dtype_str(dout.scalar_type()));
  SB_CHECK_ARG(out.scalar_type() == q.scalar_type(), "out", "expected dtype ",
               dtype_str(q.scalar_type()), ", got ", dtype_str(out.scalar_type()));
  const auto stat_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  SB_CHECK_ARG(lse.scalar_type() == stat_type && lse.dim() == 3 && lse.size(0) == s.batch &&
                   lse.size(1) == s.heads && lse.size(2) == s.q_len && lse.is_contiguous(),
               "lse", "expected a contiguous ", dtype_str(stat_type), " (B, H, S) = (", s.batch,
               ", ", s.heads, ", ", s.q_len, "), got ", dtype_str(lse.scalar_type()), " ",
               shape_str(lse.sizes()));
  check_same_device(dout, q, "dout", "q");
  check_same_device(out, q, "out", "q");
  check_same_device(lse, q, "lse", "q");
}

void check_kept_heads(const at::Tensor& kept_heads, const at::Tensor& q, const AttentionShape& s) {
  SB_CHECK_ARG(kept_heads.dim() == 1, "kept_heads", "expected a 1-d tensor of head indices, got shape ",
               shape_str(kept_heads.sizes()));
  SB_CHECK_ARG(kept_heads.scalar_type() == at::kLong || kept_heads.scalar_type() == at::kInt,
               "kept_heads", "expected torch.int64 or torch.int32 head indices, got ",
               dtype_str(kept_heads.scalar_type()));
  check_same_device(kept_heads, q, "kept_heads", "q");
  SB_CHECK_ARG(kept_heads.size(0) <= s.heads, "kept_heads", "expected at most H = ", s.heads,
               " indices, got ", kept_heads.size(0));
  if (kept_heads.is_cpu() && kept_heads.numel() > 0) {  // on CUDA this would synchronise
    const int64_t lo = kept_heads.min().item<int64_t>(), hi = kept_heads.max().item<int64_t>();
    SB_CHECK_ARG(lo >= 0 && hi < s.heads, "kept_heads", "expected indices in [0, H = ", s.heads,
                 "), got values in [", lo, ", ", hi, "]");
  }
}

GateView gate_view(const at::Tensor& head_gate, at::ScalarType dtype) {
  GateView g;
  g.values = head_gate.scalar_type() == dtype ? head_gate : head_gate.to(dtype);
  int64_t last = 0;  // the largest offset the view reaches
  for (int64_t d = 0; d < g.values.dim(); ++d) last += (g.values.size(d) - 1) * g.values.stride(d);
  if (last > INT32_MAX) g.values = g.values.contiguous();
  g.stride_b = g.values.dim() == 1 ? 0 : g.values.stride(0);  // (H,): one row shared by the batch
  g.stride_h = g.values.stride(-1);
  return g;
}

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace sparsebert
