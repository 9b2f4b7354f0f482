// What the extension modules _cpu and _cuda share: the list of handlers and
// the module attributes. Each module defines the handlers of its platform
// under the same target names.
#pragma once

#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

// Every handler comes in two versions: <Name>V1 takes neighbour maps [M, K],
// <Name> (target suffix _v2) the rulebook's own [K, M].
#define JSC_DECLARE_VERSIONS(Name)            \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(Name##V1);   \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(Name)

// Declares the handler symbols of one platform in the current namespace.
#define JSC_DECLARE_HANDLERS()                \
  JSC_DECLARE_VERSIONS(BuildRulebook);        \
  JSC_DECLARE_VERSIONS(GatherMatmul);         \
  JSC_DECLARE_VERSIONS(GatherMatmulGrad);     \
  JSC_DECLARE_VERSIONS(GatherSum);            \
  JSC_DECLARE_VERSIONS(GatherMax);            \
  JSC_DECLARE_VERSIONS(GatherMaxGrad)

// targets["jsc_<target>_v1"] and ["jsc_<target>_v2"]: the two versions of
// handler NS::Name.
#define JSC_REGISTER_VERSIONS(targets, NS, target, Name)                    \
  targets["jsc_" target "_v1"] = jsc::handler_capsule(NS::Name##V1);        \
  targets["jsc_" target "_v2"] = jsc::handler_capsule(NS::Name)

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
      JSC_REGISTER_VERSIONS(targets, NS, "build_rulebook", BuildRulebook);   \
      JSC_REGISTER_VERSIONS(targets, NS, "gather_matmul", GatherMatmul);     \
      JSC_REGISTER_VERSIONS(targets, NS, "gather_matmul_grad",               \
                            GatherMatmulGrad);                               \
      JSC_REGISTER_VERSIONS(targets, NS, "gather_sum", GatherSum);           \
      JSC_REGISTER_VERSIONS(targets, NS, "gather_max", GatherMax);           \
      JSC_REGISTER_VERSIONS(targets, NS, "gather_max_grad", GatherMaxGrad);  \
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
