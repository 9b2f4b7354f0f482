// The CPU extension module: hands the XLA FFI handlers to Python as capsules
// (registered by jax_sparseconv/backends/ffi.py) and reports how it was built.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

namespace jsc {
XLA_FFI_DECLARE_HANDLER_SYMBOL(BuildRulebook);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMatmul);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMatmulGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherSum);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMax);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMaxGrad);
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
    targets["jsc_gather_matmul"] = capsule(jsc::GatherMatmul);
    targets["jsc_gather_matmul_grad"] = capsule(jsc::GatherMatmulGrad);
    targets["jsc_gather_sum"] = capsule(jsc::GatherSum);
    targets["jsc_gather_max"] = capsule(jsc::GatherMax);
    targets["jsc_gather_max_grad"] = capsule(jsc::GatherMaxGrad);
    return targets;
  });
  m.attr("ffi_api_version") =
      nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.attr("compiler") = __VERSION__;
  m.attr("version") = JSC_VERSION;
}
