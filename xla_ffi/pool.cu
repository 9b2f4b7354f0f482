// Pooling kernels on a GPU, with the semantics (and map layouts) of pool.cc:
//   GatherSum:     out[r] = sum_k x[nbr[r, k]]                 (avg pool)
//   GatherMax:     out[r] = max_k x[nbr[r, k]], argk = first k  (max pool)
//   GatherMaxGrad: dx[i] = sum_k g[o] where argk[o] == k, o = in_nbr[i, k]
// One thread per output element sums over k in order: deterministic, no
// atomics. Neighbour entries outside [-1, rows) count as -1 (the CPU
// handlers reject them).
#include <cstdint>

#include "jsc/checks.h"
#include "jsc/cuda_util.h"
#include "jsc/dtype.h"
#include "jsc/ffi_util.h"
#include "jsc/signatures.h"
#include "xla/ffi/api/ffi.h"

namespace jsc::gpu {
namespace {

using S32 = ffi::Buffer<ffi::S32>;

struct KeepAll {
  __device__ bool operator()(int64_t, int32_t, int64_t) const { return true; }
};

// Only the offset that won the max in the forward pass gets the gradient.
struct KeepArgmax {
  const int32_t* argk;
  int64_t C;
  __device__ bool operator()(int64_t k, int32_t o, int64_t c) const {
    return argk[o * C + c] == k;
  }
};

// out[r, c] = sum_k x[nbr[r, k], c] over the entries where keep(k, s, c).
template <typename T, typename Acc, typename Keep>
__global__ void gather_sum_kernel(const T* x, int64_t n, const int32_t* nbr,
                                  MapDims map, int64_t C, Acc* out, Keep keep) {
  const int64_t e = thread_index();
  if (e >= map.rows * C) return;
  const int64_t r = e / C, c = e % C;
  Acc sum = 0;
  for (int64_t k = 0; k < map.K; ++k) {
    const int32_t s = safe_row(nbr[map.layout.at(r, k)], n);
    if (s >= 0 && keep(k, s, c)) sum += static_cast<Acc>(to_acc(x[s * C + c]));
  }
  out[e] = sum;
}

template <typename T, typename Acc>
__global__ void gather_max_kernel(const T* x, int64_t n, const int32_t* nbr,
                                  MapDims map, int64_t C, Acc* out, int32_t* argk) {
  const int64_t e = thread_index();
  if (e >= map.rows * C) return;
  const int64_t r = e / C, c = e % C;
  Acc best = 0;
  int32_t arg = -1;
  for (int64_t k = 0; k < map.K; ++k) {
    const int32_t s = safe_row(nbr[map.layout.at(r, k)], n);
    if (s < 0) continue;
    const Acc v = static_cast<Acc>(to_acc(x[s * C + c]));
    if (arg < 0 || v > best) {
      best = v;
      arg = static_cast<int32_t>(k);
    }
  }
  out[e] = best;
  argk[e] = arg;
}

template <typename Keep>
ffi::Error gather_sum(cudaStream_t stream, const ffi::AnyBuffer& x,
                      const S32& nbr, const MapDims& map, ffi::AnyBuffer& out, Keep keep,
                      const char* what) {
  const int64_t n = x.dimensions()[0], C = x.dimensions()[1];
  auto err = dispatch_float(x.element_type(), out.element_type(), what, [&](auto tag) {
    using T = device_t<decltype(tag)>;
    using Acc = typename Accum<decltype(tag)>::type;
    launch(stream, map.rows * C, gather_sum_kernel<T, Acc, Keep>,
           reinterpret_cast<const T*>(x.untyped_data()), n, nbr.typed_data(),
           map, C, reinterpret_cast<Acc*>(out.untyped_data()), keep);
  });
  return err.failure() ? err : launch_error(what);
}

// OffsetsLeading: neighbour maps [K, M] (the _v2 targets), else [M, K] (_v1).
template <bool OffsetsLeading>
ffi::Error GatherSumImpl(cudaStream_t stream, ffi::AnyBuffer x, S32 nbr,
                         ffi::Result<ffi::AnyBuffer> out) {
  if (auto err = check_pool_shapes(x, nbr, OffsetsLeading, "gather_sum"); err.failure()) return err;
  const MapDims map = map_dims(nbr, OffsetsLeading);
  if (auto err = check_matrix(*out, "out", map.rows, x.dimensions()[1]); err.failure())
    return err;
  return gather_sum(stream, x, nbr, map, *out, KeepAll{}, "gather_sum");
}

template <bool OffsetsLeading>
ffi::Error GatherMaxImpl(cudaStream_t stream, ffi::AnyBuffer x, S32 nbr,
                         ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<S32> argk) {
  if (auto err = check_pool_shapes(x, nbr, OffsetsLeading, "gather_max"); err.failure()) return err;
  const MapDims map = map_dims(nbr, OffsetsLeading);
  const int64_t n = x.dimensions()[0], C = x.dimensions()[1], rows = map.rows;
  if (auto err = check_matrix(*argk, "argk", rows, C); err.failure()) return err;
  if (auto err = check_matrix(*out, "out", rows, C); err.failure()) return err;
  auto err = dispatch_float(x.element_type(), out->element_type(), "gather_max", [&](auto tag) {
    using T = device_t<decltype(tag)>;
    using Acc = typename Accum<decltype(tag)>::type;
    launch(stream, rows * C, gather_max_kernel<T, Acc>,
           reinterpret_cast<const T*>(x.untyped_data()), n, nbr.typed_data(),
           map, C, reinterpret_cast<Acc*>(out->untyped_data()), argk->typed_data());
  });
  return err.failure() ? err : launch_error("gather_max");
}

template <bool OffsetsLeading>
ffi::Error GatherMaxGradImpl(cudaStream_t stream, ffi::AnyBuffer g, S32 argk,
                             S32 in_nbr, ffi::Result<ffi::AnyBuffer> dx) {
  // in_nbr entries are rows of g (outputs of the pool).
  if (auto err = check_pool_shapes(g, in_nbr, OffsetsLeading, "gather_max_grad"); err.failure())
    return err;
  const MapDims map = map_dims(in_nbr, OffsetsLeading);
  const int64_t C = g.dimensions()[1];
  if (auto err = check_matrix(argk, "argk", g.dimensions()[0], C); err.failure())
    return err;
  if (auto err = check_matrix(*dx, "dx", map.rows, C); err.failure())
    return err;
  return gather_sum(stream, g, in_nbr, map, *dx, KeepArgmax{argk.typed_data(), C},
                    "gather_max_grad");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherSumV1, GatherSumImpl<false>,
                              signature::gather_sum(ffi::Ffi::Bind().Ctx<Stream>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherSum, GatherSumImpl<true>,
                              signature::gather_sum(ffi::Ffi::Bind().Ctx<Stream>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMaxV1, GatherMaxImpl<false>,
                              signature::gather_max(ffi::Ffi::Bind().Ctx<Stream>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMax, GatherMaxImpl<true>,
                              signature::gather_max(ffi::Ffi::Bind().Ctx<Stream>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMaxGradV1, GatherMaxGradImpl<false>,
                              signature::gather_max_grad(ffi::Ffi::Bind().Ctx<Stream>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMaxGrad, GatherMaxGradImpl<true>,
                              signature::gather_max_grad(ffi::Ffi::Bind().Ctx<Stream>()));

}  // namespace jsc::gpu
