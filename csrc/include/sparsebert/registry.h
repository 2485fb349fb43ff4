// Which native kernels this build of sparsebert._C contains, reported by build_info().
// Each kernel file adds one static KernelRegistration per (op, dispatch key) it implements.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace sparsebert {

// (op name, dispatch key) pairs, in registration order.
std::vector<std::pair<std::string, std::string>>& compiled_kernels();

struct KernelRegistration {
  KernelRegistration(const char* op, const char* dispatch_key) {
    compiled_kernels().emplace_back(op, dispatch_key);
  }
};

}  // namespace sparsebert
