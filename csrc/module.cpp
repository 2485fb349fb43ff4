// The sparsebert._C extension module. Importing it registers the native kernels into the torch
// dispatcher (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); op schemas live in sparsebert/ops.py.
#include <torch/extension.h>

#include "sparsebert/registry.h"

#ifndef SPARSEBERT_CUDA_ARCH_LIST
#define SPARSEBERT_CUDA_ARCH_LIST ""
#endif

#ifndef SPARSEBERT_CUDA_VERSION
#define SPARSEBERT_CUDA_VERSION ""
#endif

// The fingerprint of the op schemas in sparsebert/ops.py this library was built against
// (sparsebert/schema.py; setup.py and CMakeLists.txt pass it). Python reads these bytes from the
// file before loading it: a library built from other schemas is refused with a warning instead
// of torch aborting the process while the kernels register.
#ifndef SPARSEBERT_SCHEMA_FINGERPRINT
#error "SPARSEBERT_SCHEMA_FINGERPRINT is not defined (build with setup.py or CMakeLists.txt)"
#endif
extern "C" __attribute__((used, visibility("default"))) const char sparsebert_op_schemas[] =
    "sparsebert-op-schemas:" SPARSEBERT_SCHEMA_FINGERPRINT;

namespace sparsebert {

std::vector<std::pair<std::string, std::string>>& compiled_kernels() {
  static std::vector<std::pair<std::string, std::string>> kernels;
  return kernels;
}

}  // namespace sparsebert

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
#ifdef SPARSEBERT_WITH_CUDA
  info["cuda_version"] = SPARSEBERT_CUDA_VERSION;  // the CUDA of the torch it was built with
  info["cuda_arch_list"] = SPARSEBERT_CUDA_ARCH_LIST;
#else
  info["cuda_version"] = pybind11::none();
  info["cuda_arch_list"] = pybind11::none();
#endif
#ifdef NDEBUG
  info["debug"] = false;
#else
  info["debug"] = true;
#endif
  pybind11::dict kernels;
  for (const auto& [op, key] : sparsebert::compiled_kernels()) {
    if (!kernels.contains(key.c_str())) kernels[key.c_str()] = pybind11::list();
    kernels[key.c_str()].cast<pybind11::list>().append(op);
  }
  info["kernels"] = kernels;
  info["op_schemas"] = SPARSEBERT_SCHEMA_FINGERPRINT;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsebert native kernels (registered into the torch dispatcher on import)";
  m.def("build_info", &build_info,
        "Torch version built against, CUDA version and arch list (or None), compiled kernels");
}
