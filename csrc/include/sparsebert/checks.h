// Argument checks that name the offending argument and what was expected.
// Violations raise ValueError in Python (TORCH_CHECK_VALUE), never crash.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

#define SB_CHECK_ARG(cond, arg, ...) \
  TORCH_CHECK_VALUE((cond), "sparsebert: argument '", arg, "': ", __VA_ARGS__)

namespace sparsebert {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

inline void check_rank(const at::Tensor& t, const char* arg, int64_t rank, const char* layout) {
  SB_CHECK_ARG(t.dim() == rank, arg, "expected a ", rank, "-d tensor ", layout, ", got shape ",
               shape_str(t.sizes()));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* arg,
                              const char* ref_arg) {
  SB_CHECK_ARG(t.device() == ref.device(), arg, "expected it on ", ref.device(), " like '",
               ref_arg, "', got ", t.device());
}

// The Python spelling of a dtype (torch.int64), so native and wrapper messages read alike.
inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The floating-point dtypes the kernels compute in (fp8 and other float types are not).
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_float_dtype(const at::Tensor& t, const char* arg) {
  SB_CHECK_ARG(is_kernel_float(t.scalar_type()), arg,
               "expected torch.float16, torch.bfloat16, torch.float32 or torch.float64, got ",
               dtype_str(t.scalar_type()));
}

}  // namespace sparsebert
