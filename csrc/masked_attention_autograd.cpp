// Autograd of sparsebert::masked_attention, registered in C++ (dispatch key Autograd) so that a
// call pays no Python on the way to the kernel. It mirrors the Python registration in
// sparsebert/ops.py (used when this extension is not loaded):
//   forward   redispatches below autograd to the CPU/CUDA kernel (or the fake, under tracing);
//             when no input needs a gradient nothing is recorded.
//   backward  calls sparsebert::masked_attention_backward (the kernels' fused backward) with
//             dout made last-dim contiguous, or, when only the gate needs a gradient (fp32/bf16),
//             reads d_head_gate off the output (gate_grad_from_output); d_head_gate (B, H) is
//             summed over the batch for an
//             (H,) gate and cast to the gate's dtype (when the gate needs a gradient). The lse
//             output is marked non-differentiable and undefined gradients are not materialised
//             (no zeros for lse's). Forward-mode AD is refused (no jvp formula).
// The backward is not differentiable: with create_graph=True its outputs get a node that raises
// on a second derivative. masked_attention_compact's Autograd kernel (CompactFunction) runs the
// same backward on the gathered kept heads and scatters its gradients back.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "sparsebert/masked_attention.h"
#include "sparsebert/registry.h"

namespace sparsebert {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sparsebert::masked_attention", "")
                             .typed<ForwardSig>();
  return op;
}

using CompactSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&,
                                                      const std::optional<at::Tensor>&, double);

const c10::TypedOperatorHandle<CompactSig>& compact_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sparsebert::masked_attention_compact", "")
                             .typed<CompactSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sparsebert::masked_attention_backward", "")
                             .typed<BackwardSig>();
  return op;
}

// With create_graph=True, the backward kernel's outputs are recorded with a node that refuses a
// second derivative. Function::apply runs forward() with grad mode off, so the op is called as
// in a plain backward (the reference kernel, on devices without a native one, differentiates
// internally with autograd: it must not run below the autograd keys).
class BackwardNotDifferentiable
    : public torch::autograd::Function<BackwardNotDifferentiable> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& dout, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& head_gate,
                               const std::optional<at::Tensor>& key_padding_mask,
                               const at::Tensor& out, const at::Tensor& lse, double scale) {
    auto [dq, dk, dv, d_gate] =
        backward_op().call(dout, q, k, v, head_gate, key_padding_mask, out, lse, scale);
    return {dq, dk, dv, d_gate};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "sparsebert: masked_attention is differentiable once: its backward has "
                "no derivative (second derivatives, e.g. gradient penalties, are not supported)");
  }
};

// d_head_gate alone, for a backward where q, k and v need no gradient (the first layer of an
// importance pass: frozen weights over embeddings that need none). The output is the gate times
// the head's attention, out[b, s, h] = gate[b, h] ctx[b, s, h], so
//   d_gate[b, h] = sum_{s, d} dout . ctx = sum_{s, d} dout . out / gate[b, h]
// where the gate is nonzero; where it is 0 the result is the 0 every kernel's backward gives
// (selected, not divided: dout * out is NaN there for an infinite dout). Five tensor ops
// (product, sum, compare, divide, select), in fp32, instead of the attention backward. fp32 and bf16 only: fp16's output
// loses digits for a small soft gate (gate x |v| in its subnormal range), which the division
// cannot restore; fp16 (and fp64) keep the kernels' backward, which sums P * (dout V^T) (but
// the CUDA mma.sync backward, whose d_gate is delta / gate: csrc/README.md).
bool gate_grad_only_applies(const at::Tensor& out) {
  return out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16;
}

// (B, H) fp32; dout, out (B, Sq, H, D); head_gate (H,) (broadcast over the batch) or (B, H).
at::Tensor gate_grad_from_output(const at::Tensor& dout, const at::Tensor& out,
                                 const at::Tensor& head_gate) {
  const at::Tensor per_head = (dout.to(at::kFloat) * out.to(at::kFloat)).sum({1, 3});
  const at::Tensor gate = head_gate.to(at::kFloat);
  // exactly 0 where the gate is 0, also for a non-finite dout there (0 * inf is NaN)
  return at::where(gate != 0, per_head.div(gate), at::zeros({}, per_head.options()));
}

class MaskedAttentionFunction : public torch::autograd::Function<MaskedAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& head_gate,
                               const std::optional<at::Tensor>& key_padding_mask, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = forward_op().call(q, k, v, head_gate, key_padding_mask, scale);
    ctx->save_for_backward({q, k, v, head_gate,
                            key_padding_mask.has_value() ? *key_padding_mask : at::Tensor(), out,
                            lse});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});  // a statistic the backward reuses: no gradient
    ctx->set_materialize_grads(false);       // so no zeros are made for lse's gradient
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(6);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &head_gate = saved[3];
    const std::optional<at::Tensor> mask =
        saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    const double scale = ctx->saved_data["scale"].toDouble();
    at::Tensor dq, dk, dv, d_gate;
    const bool gate_only = !ctx->needs_input_grad(0) && !ctx->needs_input_grad(1) &&
                           !ctx->needs_input_grad(2) && ctx->needs_input_grad(3);
    if (gate_only && !at::GradMode::is_enabled() && gate_grad_only_applies(saved[5])) {
      d_gate = gate_grad_from_output(grad_out, saved[5], head_gate);
    } else if (at::GradMode::is_enabled()) {
      // create_graph=True: a node that refuses to go further
      variable_list r = BackwardNotDifferentiable::apply(last_dim_contiguous(grad_out), q, k, v,
                                                         head_gate, mask, saved[5], saved[6],
                                                         scale);
      dq = r[0], dk = r[1], dv = r[2], d_gate = r[3];
    } else {
      std::tie(dq, dk, dv, d_gate) = backward_op().call(last_dim_contiguous(grad_out), q, k, v,
                                                        head_gate, mask, saved[5], saved[6],
                                                        scale);
    }
    if (ctx->needs_input_grad(3)) {  // else no reduction or cast of an unused d_head_gate
      if (head_gate.dim() == 1) d_gate = d_gate.sum(0);  // (B, H) -> (H,): shared by the batch
      if (d_gate.scalar_type() != head_gate.scalar_type())
        d_gate = d_gate.to(head_gate.scalar_type());
    }
    return {ctx->needs_input_grad(0) ? dq : at::Tensor(),
            ctx->needs_input_grad(1) ? dk : at::Tensor(),
            ctx->needs_input_grad(2) ? dv : at::Tensor(),
            ctx->needs_input_grad(3) ? d_gate : at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) has no formula here:
// refuse it rather than return outputs without tangents (read as zero). The Python wrapper
// sparsebert.ops.masked_attention runs the reference under forward-mode AD instead.
void reject_forward_ad(std::initializer_list<const at::Tensor*> tensors, const char* op) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(!t->defined() || !t->_fw_grad(/*level=*/0).defined(), "sparsebert: ", op,
                " has no forward-mode derivative (jvp); call sparsebert.ops.", op,
                ", which computes it with the reference there, or use reverse mode");
}

std::tuple<at::Tensor, at::Tensor> masked_attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& head_gate,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  reject_forward_ad({&q, &k, &v, &head_gate}, "masked_attention");
  const bool record = at::GradMode::is_enabled() &&
                      (q.requires_grad() || k.requires_grad() || v.requires_grad() ||
                       head_gate.requires_grad());
  if (!record) {  // nothing to differentiate: straight to the kernel, no graph node
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(q, k, v, head_gate, key_padding_mask, scale);
  }
  variable_list outs =
      MaskedAttentionFunction::apply(q, k, v, head_gate, key_padding_mask, scale);
  return {outs[0], outs[1]};
}

const KernelRegistration kAutograd("masked_attention", "Autograd");

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

// masked_attention_compact's backward is masked_attention's on the kept heads: their q, k, v and
// gate slices are gathered (index_select), the fused backward runs on them with the compact
// out and lse, and the gradients are scattered back (index_add: a head listed twice gets both
// contributions; heads not kept get zeros). The forward stays the one-kernel fast path.
class CompactFunction : public torch::autograd::Function<CompactFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& head_gate,
                               const at::Tensor& kept_heads,
                               const std::optional<at::Tensor>& key_padding_mask, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = compact_op().call(q, k, v, head_gate, kept_heads, key_padding_mask, scale);
    ctx->save_for_backward({q, k, v, head_gate, kept_heads,
                            key_padding_mask.has_value() ? *key_padding_mask : at::Tensor(), out,
                            lse});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];  // (B, Sq, K, D)
    if (!grad_out.defined()) return variable_list(7);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &head_gate = saved[3];
    const at::Tensor index = saved[4].to(at::kLong);  // (K,)
    const std::optional<at::Tensor> mask =
        saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    const double scale = ctx->saved_data["scale"].toDouble();
    // (sym_ sizes: under torch.compile's dynamic shapes the sizes are symbolic)
    if (index.sym_size(0) == 0) {  // no head kept: no attention to differentiate, zero gradients
      auto zero = [&ctx](int i, const at::Tensor& like) {
        return ctx->needs_input_grad(i) ? at::zeros_like(like, at::MemoryFormat::Contiguous)
                                        : at::Tensor();
      };
      return {zero(0, q), zero(1, k), zero(2, v), zero(3, head_gate),
              at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const at::Tensor qk = q.index_select(2, index), kk = k.index_select(2, index),
                     vk = v.index_select(2, index);  // (B, S, K, D) each
    const at::Tensor gate = head_gate.index_select(-1, index);  // (K,) or (B, K)
    at::Tensor dq, dk, dv, d_gate;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a node that refuses to go further
      variable_list r = BackwardNotDifferentiable::apply(last_dim_contiguous(grad_out), qk, kk,
                                                         vk, gate, mask, saved[6], saved[7],
                                                         scale);
      dq = r[0], dk = r[1], dv = r[2], d_gate = r[3];
    } else {
      std::tie(dq, dk, dv, d_gate) = backward_op().call(last_dim_contiguous(grad_out), qk, kk,
                                                        vk, gate, mask, saved[6], saved[7],
                                                        scale);
    }
    // (B, S, K, D) -> (B, S, H, D), zeros at the heads not kept
    auto scatter = [&index](const at::Tensor& grad, const at::Tensor& like) {
      return at::zeros_like(like, at::MemoryFormat::Contiguous)
          .index_add_(2, index, grad.to(like.dtype()));
    };
    at::Tensor gate_grad;
    if (ctx->needs_input_grad(3)) {  // (B, K) -> (B, H), then (H,) for a gate shared by the batch
      gate_grad = at::zeros_symint({d_gate.sym_size(0), head_gate.sym_size(-1)}, d_gate.options())
                      .index_add_(1, index, d_gate);
      if (head_gate.dim() == 1) gate_grad = gate_grad.sum(0);
      gate_grad = gate_grad.to(head_gate.scalar_type());
    }
    return {ctx->needs_input_grad(0) ? scatter(dq, q) : at::Tensor(),
            ctx->needs_input_grad(1) ? scatter(dk, k) : at::Tensor(),
            ctx->needs_input_grad(2) ? scatter(dv, v) : at::Tensor(),
            gate_grad,
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> masked_attention_compact_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& head_gate,
    const at::Tensor& kept_heads, const std::optional<at::Tensor>& key_padding_mask,
    double scale) {
  reject_forward_ad({&q, &k, &v, &head_gate}, "masked_attention_compact");
  if (!any_requires_grad({&q, &k, &v, &head_gate})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return compact_op().call(q, k, v, head_gate, kept_heads, key_padding_mask, scale);
  }
  variable_list r =
      CompactFunction::apply(q, k, v, head_gate, kept_heads, key_padding_mask, scale);
  return {r[0], r[1]};
}

const KernelRegistration kCompactAutograd("masked_attention_compact", "Autograd");

}  // namespace
}  // namespace sparsebert

TORCH_LIBRARY_IMPL(sparsebert, Autograd, m) {
  m.impl("masked_attention", &sparsebert::masked_attention_autograd);
  m.impl("masked_attention_compact", &sparsebert::masked_attention_compact_autograd);
}
