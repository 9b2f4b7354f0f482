// The CPU extension module: hands the XLA FFI handlers to Python as capsules
// (registered by jax_sparseconv/backends/ffi.py) and reports how it was built.
#include "jsc/module.h"

namespace jsc {
JSC_DECLARE_HANDLERS();
}  // namespace jsc

NB_MODULE(_cpu, m) {
  m.doc() = "jax_sparseconv CPU kernels (XLA FFI handlers)";
  JSC_DEFINE_MODULE_ATTRS(m, jsc);
}
