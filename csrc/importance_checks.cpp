#include "sparsebert/importance.h"

#include "sparsebert/checks.h"

namespace sparsebert {

void check_group_dot_inputs(const at::Tensor& x, const at::Tensor& g, int64_t group_size,
                            const std::optional<at::Tensor>& token_mask) {
  check_rank(x, "x", 3, "(B, S, D)");
  check_float_dtype(x, "x");
  SB_CHECK_ARG(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(), "g",
               "expected shape ", shape_str(x.sizes()), " and dtype ", dtype_str(x.scalar_type()),
               ", got ", shape_str(g.sizes()), " ", dtype_str(g.scalar_type()));
  check_same_device(g, x, "g", "x");
  SB_CHECK_ARG(group_size > 0 && x.size(2) % group_size == 0, "group_size",
               "expected a positive divisor of D = ", x.size(2), ", got ", group_size);
  if (token_mask.has_value()) {
    SB_CHECK_ARG(token_mask->scalar_type() == at::kBool && token_mask->dim() == 2 &&
                     token_mask->size(0) == x.size(0) && token_mask->size(1) == x.size(1),
                 "token_mask", "expected a bool (B, S) = (", x.size(0), ", ", x.size(1),
                 ") tensor, got ", dtype_str(token_mask->scalar_type()), " ",
                 shape_str(token_mask->sizes()));
    check_same_device(*token_mask, x, "token_mask", "x");
  }
}

void check_accumulate_importance_inputs(const at::Tensor& acc, const at::Tensor& scores,
                                        int64_t power) {
  SB_CHECK_ARG(power == 1 || power == 2, "power", "expected 1 (abs) or 2 (square), got ", power);
  SB_CHECK_ARG((acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble) &&
                   acc.is_contiguous(),
               "acc", "expected a contiguous fp32/fp64 tensor, got ", dtype_str(acc.scalar_type()));
  SB_CHECK_ARG(scores.dim() == acc.dim() + 1 && scores.sizes().slice(1) == acc.sizes(), "scores",
               "expected (N, ", shape_str(acc.sizes()), "...), got ", shape_str(scores.sizes()));
  check_float_dtype(scores, "scores");
  check_same_device(scores, acc, "scores", "acc");
}

}  // namespace sparsebert
