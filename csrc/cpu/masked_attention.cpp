// CPU kernels of sparsebert::masked_attention and its backward.
//
// Work is split over (batch, head) pairs with at::parallel_for. A pair whose gate is exactly 0
// only writes zeros: its q/k/v are never read. The compact forward runs the same loop over
// (batch, kept head) pairs, reading each kept head's slices in place (no gathered copies). An active pair loads its (S, D) slices from the
// strided (B, S, H, D) inputs into thread-local buffers in the accumulation type (fp32, or fp64
// for fp64), then processes queries in blocks of kQueryBlock rows: BLAS GEMMs for q k^T and
// P v, a vectorised row softmax in between. The backward recomputes P from the saved
// log-sum-exp and also produces d_head_gate = sum(dout . ctx) from the row sums of P * (dout v^T)
// (no division by the gate, no read of the stored output).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "blas.h"
#include "softmax.h"
#include "sparsebert/dispatch.h"
#include "sparsebert/masked_attention.h"
#include "sparsebert/registry.h"

namespace sparsebert::cpu {
namespace {

constexpr int64_t kQueryBlock = 128;

// Raw views of one (B, S, H, D) tensor with a contiguous last dim.
template <typename T>
struct Strided4d {
  T* data;
  int64_t sb, ss, sh;  // strides of B, S, H (D is 1)
  explicit Strided4d(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), ss(t.stride(1)), sh(t.stride(2)) {}
  T* head(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

// dst (len, D) contiguous <- scale * src rows [b, 0:len, h, :] converted to acc type.
template <typename scalar_t, typename acc_t>
void load_head(const Strided4d<const scalar_t>& src, int64_t b, int64_t h, int64_t len,
               int64_t dim, acc_t scale, acc_t* dst) {
  const scalar_t* base = src.head(b, h);
  for (int64_t s = 0; s < len; ++s) {
    const scalar_t* row = base + s * src.ss;
    acc_t* out = dst + s * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] = scale * static_cast<acc_t>(row[d]);
  }
}

// rows [b, s0:s0+len, h, :] <- src (len, D) contiguous, converted to scalar_t.
template <typename scalar_t, typename acc_t>
void store_head(const Strided4d<scalar_t>& dst, int64_t b, int64_t h, int64_t s0, int64_t len,
                int64_t dim, const acc_t* src) {
  scalar_t* base = dst.head(b, h) + s0 * dst.ss;
  for (int64_t s = 0; s < len; ++s) {
    scalar_t* row = base + s * dst.ss;
    const acc_t* in = src + s * dim;
    for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<scalar_t>(in[d]);
  }
}

template <typename scalar_t>
void zero_head(const Strided4d<scalar_t>& dst, int64_t b, int64_t h, int64_t len, int64_t dim) {
  scalar_t* base = dst.head(b, h);
  for (int64_t s = 0; s < len; ++s) std::fill_n(base + s * dst.ss, dim, scalar_t(0));
}

// keep[j] = 1 for real keys, 0 for padding; returns nullptr when there is no mask.
template <typename acc_t>
const acc_t* load_keep(const std::optional<at::Tensor>& mask, int64_t b, int64_t len,
                       std::vector<acc_t>& buf) {
  if (!mask.has_value()) return nullptr;
  const bool* row = mask->data_ptr<bool>() + b * mask->stride(0);
  for (int64_t j = 0; j < len; ++j) buf[j] = row[j * mask->stride(1)] ? acc_t(1) : acc_t(0);
  return buf.data();
}

// out (B, Sq, H_out, D) and lse (B, H_out, Sq): slot j holds input head heads_of[j], or head j
// when heads_of is null (H_out = H).
template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const GateView& gate, const std::optional<at::Tensor>& mask, double scale_d,
                  const AttentionShape& shape, const int64_t* heads_of, at::Tensor& out,
                  at::Tensor& lse) {
  using acc = acc_t<scalar_t>;
  const int64_t B = shape.batch, Sq = shape.q_len, Sk = shape.kv_len, D = shape.head_dim;
  const int64_t H = out.size(2);  // output slots: every head, or the kept ones
  const acc scale = static_cast<acc>(scale_d);
  const Strided4d<const scalar_t> qv(q), kv(k), vv(v);
  const Strided4d<scalar_t> ov(out);
  const acc* gate_ptr = gate.values.data_ptr<acc>();  // (H,) or (B, H), read in place
  acc* lse_ptr = lse.data_ptr<acc>();              // (B, H_out, Sq)

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // Thread-local buffers, in the accumulation type.
    std::vector<acc> qb(Sq * D), kb(Sk * D), vb(Sk * D), scores(kQueryBlock * Sk),
        ctx(kQueryBlock * D), keep(Sk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, slot = task % H;
      const int64_t h = heads_of ? heads_of[slot] : slot;  // the input head
      const acc g = gate_ptr[b * gate.stride_b + h * gate.stride_h];
      acc* lse_row = lse_ptr + task * Sq;
      if (g == acc(0)) {  // pruned head: never read, output exactly 0
        zero_head(ov, b, slot, Sq, D);
        std::fill_n(lse_row, Sq, acc(0));
        continue;
      }
      // Step 1: gather this head's q, k, v into contiguous acc-type buffers.
      load_head(qv, b, h, Sq, D, acc(1), qb.data());
      load_head(kv, b, h, Sk, D, acc(1), kb.data());
      load_head(vv, b, h, Sk, D, acc(1), vb.data());
      const acc* keep_ptr = load_keep(mask, b, Sk, keep);
      for (int64_t q0 = 0; q0 < Sq; q0 += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, Sq - q0);
        // Step 2: scores = q_blk k^T  (rows, Sk)
        gemm_row_major<acc>(false, true, rows, Sk, D, acc(1), qb.data() + q0 * D, D, kb.data(), D,
                            acc(0), scores.data(), Sk);
        // Step 3: P = softmax(scale * scores) over real keys, lse per row.
        softmax_rows(scores.data(), rows, Sk, keep_ptr, scale, lse_row + q0);
        // Step 4: out_blk = g * P v  (rows, D)
        gemm_row_major<acc>(false, false, rows, D, Sk, g, scores.data(), Sk, vb.data(), D, acc(0),
                            ctx.data(), D);
        store_head(ov, b, slot, q0, rows, D, ctx.data());
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const GateView& gate,
                   const std::optional<at::Tensor>& mask, const at::Tensor& out,
                   const at::Tensor& lse, double scale_d, const AttentionShape& shape,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& d_gate) {
  using acc = acc_t<scalar_t>;
  const int64_t B = shape.batch, Sq = shape.q_len, Sk = shape.kv_len, H = shape.heads,
                D = shape.head_dim;
  const acc scale = static_cast<acc>(scale_d);
  const Strided4d<const scalar_t> qv(q), kv(k), vv(v), dov(dout);  // out: unused (see step 4)
  const Strided4d<scalar_t> dqv(dq), dkv(dk), dvv(dv);
  const acc* gate_ptr = gate.values.data_ptr<acc>();  // (H,) or (B, H), read in place
  const acc* lse_ptr = lse.data_ptr<acc>();        // (B, H, Sq)
  acc* d_gate_ptr = d_gate.data_ptr<acc>();        // (B, H)

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> qb(Sq * D), kb(Sk * D), vb(Sk * D), dout_b(Sq * D),
        probs(kQueryBlock * Sk), dprobs(kQueryBlock * Sk), dq_blk(kQueryBlock * D),
        dk_acc(Sk * D), dv_acc(Sk * D), keep(Sk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const acc g = gate_ptr[b * gate.stride_b + h * gate.stride_h];
      if (g == acc(0)) {  // pruned head: all gradients exactly 0
        zero_head(dqv, b, h, Sq, D);
        zero_head(dkv, b, h, Sk, D);
        zero_head(dvv, b, h, Sk, D);
        d_gate_ptr[task] = acc(0);
        continue;
      }
      // Step 1: load q, k, v and dout as contiguous acc-type buffers.
      load_head(qv, b, h, Sq, D, acc(1), qb.data());
      load_head(kv, b, h, Sk, D, acc(1), kb.data());
      load_head(vv, b, h, Sk, D, acc(1), vb.data());
      load_head(dov, b, h, Sq, D, acc(1), dout_b.data());
      const acc* keep_ptr = load_keep(mask, b, Sk, keep);
      std::fill(dk_acc.begin(), dk_acc.end(), acc(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc(0));
      acc dout_dot_ctx = 0;
      for (int64_t q0 = 0; q0 < Sq; q0 += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, Sq - q0);
        // Step 2: recompute P = exp(scale * q k^T - lse)  (rows, Sk)
        gemm_row_major<acc>(false, true, rows, Sk, D, acc(1), qb.data() + q0 * D, D, kb.data(), D,
                            acc(0), probs.data(), Sk);
        probs_from_lse(probs.data(), rows, Sk, keep_ptr, scale, lse_ptr + task * Sq + q0);
        // Step 3: dP' = dout v^T (ungated: d ctx = g dout, so dP = g dP').
        gemm_row_major<acc>(false, true, rows, Sk, D, acc(1), dout_b.data() + q0 * D, D,
                            vb.data(), D, acc(0), dprobs.data(), Sk);
        // Step 4: r_i = sum_j P_ij dP'_ij = dout_i . ctx_i (ctx = P v), so that
        // delta_i = dout_i . out_i = g r_i and dS = P (dP - delta) = g P (dP' - r_i), kept as
        // P (dP' - r_i) in place with g folded into the GEMMs below. d_gate = sum_i r_i needs
        // no division by g and no read of the stored (rounded, gate-scaled) output.
        // P's row is first renormalised: exp(s - lse) carries the stored lse's rounding, an
        // error of about eps |max score| common to the row, which dP' - r_i cancels badly when
        // attention is nearly one-hot (large scores).
        for (int64_t i = 0; i < rows; ++i) {
          acc* ds = dprobs.data() + i * Sk;
          acc* p = probs.data() + i * Sk;
          acc total = 0, r = 0;
#pragma omp simd reduction(+ : total, r)
          for (int64_t j = 0; j < Sk; ++j) {
            total += p[j];
            r += p[j] * ds[j];
          }
          const acc inv = total > acc(0) ? acc(1) / total : acc(0);  // 0: a row with no key
          r *= inv;
#pragma omp simd
          for (int64_t j = 0; j < Sk; ++j) {
            p[j] *= inv;
            ds[j] = p[j] * (ds[j] - r);
          }
          dout_dot_ctx += r;
        }
        // Step 5: dq = scale g dS' k; dk += scale g dS'^T q; dv += g P^T dout.
        gemm_row_major<acc>(false, false, rows, D, Sk, scale * g, dprobs.data(), Sk, kb.data(), D,
                            acc(0), dq_blk.data(), D);
        store_head(dqv, b, h, q0, rows, D, dq_blk.data());
        gemm_row_major<acc>(true, false, Sk, D, rows, scale * g, dprobs.data(), Sk,
                            qb.data() + q0 * D, D, acc(1), dk_acc.data(), D);
        gemm_row_major<acc>(true, false, Sk, D, rows, g, probs.data(), Sk,
                            dout_b.data() + q0 * D, D, acc(1), dv_acc.data(), D);
      }
      store_head(dkv, b, h, 0, Sk, D, dk_acc.data());
      store_head(dvv, b, h, 0, Sk, D, dv_acc.data());
      // Step 6: d_gate = sum_s dout . ctx.
      d_gate_ptr[task] = dout_dot_ctx;
    }
  });
}

at::ScalarType stat_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "sparsebert: argument '", arg,
                    "': the CPU kernel got a tensor on ", t.device());
}

std::tuple<at::Tensor, at::Tensor> masked_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& head_gate, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const AttentionShape shape =
      check_masked_attention_inputs(q_in, k_in, v_in, head_gate, key_padding_mask);
  check_cpu(q_in, "q");
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const GateView gate = gate_view(head_gate, stat_type(q));
  at::Tensor out = at::empty({shape.batch, shape.q_len, shape.heads, shape.head_dim}, q.options());
  at::Tensor lse =
      at::empty({shape.batch, shape.heads, shape.q_len}, q.options().dtype(stat_type(q)));
  SB_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_attention_cpu", [&] {
    forward_impl<scalar_t>(q, k, v, gate, key_padding_mask, scale, shape, nullptr, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& head_gate,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out_in,
    const at::Tensor& lse, double scale) {
  const AttentionShape shape =
      check_masked_attention_inputs(q_in, k_in, v_in, head_gate, key_padding_mask);
  check_masked_attention_backward_inputs(shape, q_in, dout_in, out_in, lse);
  check_cpu(q_in, "q");
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in), dout = last_dim_contiguous(dout_in),
                   out = last_dim_contiguous(out_in);
  const GateView gate = gate_view(head_gate, stat_type(q));
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor d_gate = at::empty({shape.batch, shape.heads}, q.options().dtype(stat_type(q)));
  SB_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_attention_backward_cpu", [&] {
    backward_impl<scalar_t>(dout, q, k, v, gate, key_padding_mask, out, lse, scale, shape, dq, dk,
                            dv, d_gate);
  });
  return {dq, dk, dv, d_gate};
}

// Compact output (B, Sq, H_kept, D) and lse (B, H_kept, Sq): slot j is head kept_heads[j]. The
// forward above walks (batch, slot) pairs and reads each kept head's q/k/v and gate in place, so
// the other heads are never touched (a gather of their slices cost more than the attention).
std::tuple<at::Tensor, at::Tensor> masked_attention_compact_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& head_gate, const at::Tensor& kept_heads,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const AttentionShape shape =
      check_masked_attention_inputs(q_in, k_in, v_in, head_gate, key_padding_mask);
  check_kept_heads(kept_heads, q_in, shape);  // on the CPU: every index in [0, H)
  check_cpu(q_in, "q");
  const int64_t kept = kept_heads.size(0);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const at::Tensor heads_of = kept_heads.to(at::kLong).contiguous();  // (H_kept,)
  const GateView gate = gate_view(head_gate, stat_type(q));
  at::Tensor out = at::empty({shape.batch, shape.q_len, kept, shape.head_dim}, q.options());
  at::Tensor lse = at::empty({shape.batch, kept, shape.q_len}, q.options().dtype(stat_type(q)));
  if (kept == 0) return {out, lse};
  SB_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_attention_compact_cpu", [&] {
    forward_impl<scalar_t>(q, k, v, gate, key_padding_mask, scale, shape,
                           heads_of.data_ptr<int64_t>(), out, lse);
  });
  return {out, lse};
}

const KernelRegistration kCompact("masked_attention_compact", "CPU");
const KernelRegistration kForward("masked_attention", "CPU");
const KernelRegistration kBackward("masked_attention_backward", "CPU");

}  // namespace

TORCH_LIBRARY_IMPL(sparsebert, CPU, m) {
  m.impl("masked_attention", &masked_attention_cpu);
  m.impl("masked_attention_backward", &masked_attention_backward_cpu);
  m.impl("masked_attention_compact", &masked_attention_compact_cpu);
}

}  // namespace sparsebert::cpu
