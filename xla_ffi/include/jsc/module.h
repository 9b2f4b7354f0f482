// What the extension modules _cpu and _cuda share: the list of handlers and
// the module attributes. Each module defines the handlers of its platform
// under the same target names.
#pragma once

#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

// Declares the handler symbols of one platform in the current namespace.
#define JSC_DECLARE_HANDLERS()                        \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(BuildRulebookV1);    \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMatmulV1);     \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMatmulGradV1); \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherSumV1);        \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMaxV1);        \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMaxGradV1);    \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(BuildRulebook);      \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMatmul);       \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMatmulGrad);   \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherSum);          \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMax);          \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(GatherMaxGrad)

// Defines registrations() (target name to handler capsule), ffi_api_version (of
// the headers), jaxlib_version (whose headers they are), compiler and version on
// module m, with the handlers of namespace NS.
//
// Target names are a contract with exported programs (README, "Export and
// serve"): a handler whose operands, attributes or semantics change gets a new
// version suffix, and the old name stays registered with its old handler.
#define JSC_DEFINE_MODULE_ATTRS(m, NS)                                        \
  do {                                                                        \
    namespace nb = nanobind;                                                  \
    m.def("registrations", []() {                                             \
      nb::dict targets;                                                       \
      /* v1: neighbour maps [M, K]; v2: the rulebook's [K, M] */           \
      targets["jsc_build_rulebook_v1"] =                                      \
          jsc::handler_capsule(NS::BuildRulebookV1);                          \
      targets["jsc_gather_matmul_v1"] =                                       \
          jsc::handler_capsule(NS::GatherMatmulV1);                           \
      targets["jsc_gather_matmul_grad_v1"] =                                  \
          jsc::handler_capsule(NS::GatherMatmulGradV1);                       \
      targets["jsc_gather_sum_v1"] = jsc::handler_capsule(NS::GatherSumV1);   \
      targets["jsc_gather_max_v1"] = jsc::handler_capsule(NS::GatherMaxV1);   \
      targets["jsc_gather_max_grad_v1"] =                                     \
          jsc::handler_capsule(NS::GatherMaxGradV1);                          \
      targets["jsc_build_rulebook_v2"] =                                      \
          jsc::handler_capsule(NS::BuildRulebook);                            \
      targets["jsc_gather_matmul_v2"] =                                       \
          jsc::handler_capsule(NS::GatherMatmul);                             \
      targets["jsc_gather_matmul_grad_v2"] =                                  \
          jsc::handler_capsule(NS::GatherMatmulGrad);                         \
      targets["jsc_gather_sum_v2"] = jsc::handler_capsule(NS::GatherSum);     \
      targets["jsc_gather_max_v2"] = jsc::handler_capsule(NS::GatherMax);     \
      targets["jsc_gather_max_grad_v2"] =                                     \
          jsc::handler_capsule(NS::GatherMaxGrad);                            \
      return targets;                                                         \
    });                                                                       \
    m.attr("ffi_api_version") =                                               \
        nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);                 \
    m.attr("jaxlib_version") = JSC_JAXLIB_VERSION;                            \
    m.attr("compiler") = __VERSION__;                                         \
    m.attr("version") = JSC_VERSION;                                          \
  } while (0)

namespace jsc {

template <typename Fn>
nanobind::capsule handler_capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "an XLA FFI handler");
  return nanobind::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace jsc
