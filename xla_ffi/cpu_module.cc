// The CPU extension module: hands the XLA FFI handlers to Python as capsules
// (registered by jax_sparseconv/backends/ffi.py) and reports how it was built.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

namespace jsc {
XLA_FFI_DECLARE_HANDLER_SYMBOL(BuildRulebook);
}  // namespace jsc

namespace {

template <typename Fn>
nb::capsule capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_cpu, m) {
  m.doc() = "jax_sparseconv CPU kernels (XLA FFI handlers)";
  m.def("registrations", []() {
    nb::dict targets;
    targets["jsc_build_rulebook"] = capsule(jsc::BuildRulebook);
    return targets;
  });
  m.attr("ffi_api_version") =
      nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.attr("compiler") = __VERSION__;
  m.attr("version") = JSC_VERSION;
}
