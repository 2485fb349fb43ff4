// group_dot and accumulate_importance_: argument checks shared by the CPU and CUDA kernels.
// Each failure raises ValueError naming the argument; device-type checks stay in the kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sparsebert {

// x, g: (B, S, D) floating, same shape/dtype/device, contiguous last dim; group_size divides D;
// token_mask: (B, S) bool on x's device.
void check_group_dot_inputs(const at::Tensor& x, const at::Tensor& g, int64_t group_size,
                            const std::optional<at::Tensor>& token_mask);

// acc: contiguous fp32/fp64 (G...); scores: floating (N, G...) on acc's device; power 1 or 2.
void check_accumulate_importance_inputs(const at::Tensor& acc, const at::Tensor& scores,
                                        int64_t power);

}  // namespace sparsebert
