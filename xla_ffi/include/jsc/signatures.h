// The operands, results and attributes of each target, after the platform's
// context arguments (thread pool on the CPU; stream, scratch allocator on a
// GPU). The CPU and CUDA handlers of a target are called by the same
// ffi_call, so both bind through these. A binding can only be moved (its
// methods take *this as an rvalue), hence the forwarding references. Usage:
//   XLA_FFI_DEFINE_HANDLER_SYMBOL(Name, Impl, signature::gather_sum(ffi::Ffi::Bind().Ctx<...>()));
#pragma once

#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jsc::signature {

namespace ffi = xla::ffi;

// indices [rows, ndim + 1] -> out_indices [out_capacity, ndim + 1],
// out_nbr [out_capacity, K], in_nbr [rows, K], needed []
template <typename Binding>
auto build_rulebook(Binding&& binding) {
  using S32 = ffi::Buffer<ffi::S32>;
  using Dims = ffi::Span<const int64_t>;
  return std::move(binding).template Arg<S32>()
      .template Ret<S32>()
      .template Ret<S32>()
      .template Ret<S32>()
      .template Ret<S32>()
      .template Attr<int64_t>("mode")
      .template Attr<int64_t>("batch_size")
      .template Attr<Dims>("in_shape")
      .template Attr<Dims>("out_shape")
      .template Attr<Dims>("kernel_size")
      .template Attr<Dims>("strides")
      .template Attr<Dims>("padding")
      .template Attr<Dims>("dilation");
}

// GatherMatmul: x [N, C_in], w [K, C_in, C_out], nbr [K, M] -> out [M, C_out]
// GatherMatmulGrad: x [N, C_in], g [M, C_out], nbr [K, M] -> dw [K, C_in, C_out]
// (the V1 handlers: nbr [M, K])
// allow_tf32 (0 or 1): float32 products may round their inputs to TF32 (the
// CUDA handlers then use tensor cores; the CPU handlers never round).
template <typename Binding>
auto gather_matmul(Binding&& binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::AnyBuffer>()
      .template Attr<int64_t>("allow_tf32");
}

// x [N, C], nbr [M, K] -> out [M, C]
template <typename Binding>
auto gather_sum(Binding&& binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::AnyBuffer>();
}

// x [N, C], nbr [M, K] -> out [M, C], argk [M, C]
template <typename Binding>
auto gather_max(Binding&& binding) {
  return gather_sum(std::move(binding)).template Ret<ffi::Buffer<ffi::S32>>();
}

// g [M, C], argk [M, C], in_nbr [N, K] -> dx [N, C]
template <typename Binding>
auto gather_max_grad(Binding&& binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::AnyBuffer>();
}

}  // namespace jsc::signature
