// dtype dispatch shared by all kernels: fp32, fp64 (CPU, for gradcheck), fp16, bf16.
#pragma once

#include <ATen/Dispatch.h>

#define SB_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace sparsebert {

// Accumulation type: fp64 stays fp64, everything else accumulates in fp32.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

}  // namespace sparsebert
