// The CUDA extension module: the same targets as _cpu, with handlers for the
// "CUDA" platform (registered by jax_sparseconv/backends/ffi.py). Linked with
// the static CUDA runtime, it imports on machines without a GPU or driver.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "jsc/module.h"

namespace jsc::gpu {
JSC_DECLARE_HANDLERS();
}  // namespace jsc::gpu

NB_MODULE(_cuda, m) {
  m.doc() = "jax_sparseconv CUDA kernels (XLA FFI handlers)";
  JSC_DEFINE_MODULE_ATTRS(m, jsc::gpu);
  // The CUDA architectures compiled in (CMAKE_CUDA_ARCHITECTURES).
  nanobind::list archs;
  const std::string list = JSC_CUDA_ARCHS;
  for (size_t begin = 0; begin <= list.size();) {
    const size_t end = std::min(list.find(',', begin), list.size());
    if (end > begin) archs.append(nanobind::str(list.data() + begin, end - begin));
    begin = end + 1;
  }
  m.attr("cuda_archs") = archs;
  m.attr("cuda_version") = CUDART_VERSION;  // of the toolkit it was built with
}
