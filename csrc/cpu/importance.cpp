// CPU kernels for importance accumulation:
//   group_dot(x, g, group_size, token_mask) -> (B, G): out[b, j] = sum over real tokens s and
//     group members d of x[b, s, d] * g[b, s, d]; one pass over x and g, no x * g temporary.
//   accumulate_importance_(acc, scores, power): acc += sum_n |scores[n]|^power, in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "sparsebert/checks.h"
#include "sparsebert/dispatch.h"
#include "sparsebert/importance.h"
#include "sparsebert/masked_attention.h"
#include "sparsebert/registry.h"

namespace sparsebert::cpu {
namespace {

template <typename scalar_t>
void group_dot_impl(const at::Tensor& x, const at::Tensor& g, int64_t group_size,
                    const std::optional<at::Tensor>& token_mask, at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), G = D / group_size;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const bool* mp = token_mask.has_value() ? token_mask->data_ptr<bool>() : nullptr;
  const int64_t msb = mp ? token_mask->stride(0) : 0, mss = mp ? token_mask->stride(1) : 0;
  acc* op = out.data_ptr<acc>();  // (B, G) contiguous

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> per_feature(D);
    for (int64_t b = begin; b < end; ++b) {
      // Step 1: per-feature sums over the real tokens of example b.
      std::fill(per_feature.begin(), per_feature.end(), acc(0));
      acc* row = per_feature.data();
      for (int64_t s = 0; s < S; ++s) {
        if (mp != nullptr && !mp[b * msb + s * mss]) continue;
        const scalar_t* xr = xp + b * x.stride(0) + s * x.stride(1);
        const scalar_t* gr = gp + b * g.stride(0) + s * g.stride(1);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) row[d] += static_cast<acc>(xr[d]) * static_cast<acc>(gr[d]);
      }
      // Step 2: reduce the features of each group.
      for (int64_t j = 0; j < G; ++j) {
        acc sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < group_size; ++d) sum += row[j * group_size + d];
        op[b * G + j] = sum;
      }
    }
  });
}

at::Tensor group_dot_cpu(const at::Tensor& x_in, const at::Tensor& g_in, int64_t group_size,
                         const std::optional<at::Tensor>& token_mask) {
  check_group_dot_inputs(x_in, g_in, group_size, token_mask);
  SB_CHECK_ARG(x_in.device().is_cpu(), "x", "the CPU kernel needs CPU tensors, got ",
               x_in.device());
  // Any strides, as the reference: rows are read with unit feature stride, so copy otherwise.
  const at::Tensor x = last_dim_contiguous(x_in), g = last_dim_contiguous(g_in);
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({x.size(0), x.size(2) / group_size}, x.options().dtype(stat));
  SB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_dot_cpu", [&] {
    group_dot_impl<scalar_t>(x, g, group_size, token_mask, out);
  });
  return out;
}

void accumulate_importance_cpu(at::Tensor& acc_tensor, const at::Tensor& scores, int64_t power) {
  check_accumulate_importance_inputs(acc_tensor, scores, power);
  SB_CHECK_ARG(acc_tensor.device().is_cpu(), "acc", "the CPU kernel needs CPU tensors, got ",
               acc_tensor.device());
  const at::Tensor s = scores.contiguous();
  const int64_t N = s.size(0), G = acc_tensor.numel();
  // The N rows are summed first (in fp64), then added to acc once, as "acc += sum": adding row
  // by row would round at acc's magnitude N times (acc = 2^24 in fp32 absorbs every +1).
  std::vector<double> sum(static_cast<size_t>(G), 0.0);
  SB_DISPATCH_FLOATING_TYPES(s.scalar_type(), "accumulate_importance_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* row = sp + n * G;
      if (power == 1) {
        for (int64_t j = 0; j < G; ++j) sum[j] += std::abs(static_cast<double>(row[j]));
      } else {
        for (int64_t j = 0; j < G; ++j) {
          const double v = static_cast<double>(row[j]);
          sum[j] += v * v;
        }
      }
    }
  });
  AT_DISPATCH_FLOATING_TYPES(acc_tensor.scalar_type(), "accumulate_importance_acc", [&] {
    scalar_t* ap = acc_tensor.data_ptr<scalar_t>();
    for (int64_t j = 0; j < G; ++j) ap[j] += static_cast<scalar_t>(sum[j]);
  });
}

const KernelRegistration kGroupDot("group_dot", "CPU");
const KernelRegistration kAccumulate("accumulate_importance_", "CPU");

}  // namespace

TORCH_LIBRARY_IMPL(sparsebert, CPU, m) {
  m.impl("group_dot", &group_dot_cpu);
  m.impl("accumulate_importance_", &accumulate_importance_cpu);
}

}  // namespace sparsebert::cpu
