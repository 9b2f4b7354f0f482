// Pooling kernels on the CPU, along the same neighbour maps as convolutions
// (entry [row, offset] written nbr[r, k]; the _v2 handlers take the maps
// [K, M], the _v1 ones [M, K]):
//   GatherSum:     out[r] = sum_k x[nbr[r, k]]                 (avg pool)
//   GatherMax:     out[r] = max_k x[nbr[r, k]], argk = first k  (max pool)
//   GatherMaxGrad: dx[i] = sum_k g[o] where argk[o] == k, o = in_nbr[i, k]
// Outputs use the accumulation type; rows are split into fixed tiles.
#include <algorithm>
#include <cstdint>
#include <string>

#include "jsc/checks.h"
#include "jsc/dtype.h"
#include "jsc/ffi_util.h"
#include "jsc/gather.h"
#include "jsc/parallel.h"
#include "jsc/signatures.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {
namespace {

constexpr int64_t kTileRows = 256;

// Shapes shared by the three handlers: table [N, C] and a neighbour map
// whose entries are rows of the table.
ffi::Error check_pool_args(ffi::ThreadPool& pool, const ffi::AnyBuffer& table,
                           const ffi::Buffer<ffi::S32>& nbr, bool offsets_leading, const char* what) {
  if (auto err = check_pool_shapes(table, nbr, offsets_leading, what); err.failure()) return err;
  return check_neighbours(pool, nbr.typed_data(), nbr.element_count(),
                          table.dimensions()[0], "nbr");
}


// out[r] = sum_k x[nbr[r, k]], counting only the channels c of the entries
// where keep(k, nbr[r, k], c).
template <typename T, typename Acc, typename Keep>
void gather_sum_rows(ffi::ThreadPool& pool, const T* x, const int32_t* nbr,
                     const MapDims& map, int64_t C, Acc* out, Keep keep) {
  const int64_t K = map.K;
  parallel_for_rows(pool, map.rows, kTileRows, [&](int64_t r) {
    Acc* orow = out + r * C;
    std::fill(orow, orow + C, Acc(0));
    for (int64_t k = 0; k < K; ++k) {
      const int32_t s = nbr[map.layout.at(r, k)];
      if (s < 0) continue;
      const T* xrow = x + static_cast<int64_t>(s) * C;
      for (int64_t c = 0; c < C; ++c) {
        if (keep(k, s, c)) orow[c] += static_cast<Acc>(to_float(xrow[c]));
      }
    }
  });
}

// OffsetsLeading: neighbour maps [K, M] (the _v2 targets), else [M, K] (_v1).
template <bool OffsetsLeading>
ffi::Error GatherSumImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                         ffi::Buffer<ffi::S32> nbr,
                         ffi::Result<ffi::AnyBuffer> out) {
  if (auto err = check_pool_args(pool, x, nbr, OffsetsLeading, "gather_sum");
      err.failure())
    return err;
  const MapDims map = map_dims(nbr, OffsetsLeading);
  const int64_t C = x.dimensions()[1];
  if (auto err = check_matrix(*out, "out", map.rows, C); err.failure()) return err;
  const int32_t* nb = nbr.typed_data();
  return dispatch_float(x.element_type(), out->element_type(), "gather_sum", [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accum<T>::type;
    gather_sum_rows(pool, reinterpret_cast<const T*>(x.untyped_data()), nb, map, C,
                    reinterpret_cast<Acc*>(out->untyped_data()),
                    [](int64_t, int32_t, int64_t) { return true; });
  });
}

template <bool OffsetsLeading>
ffi::Error GatherMaxImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                         ffi::Buffer<ffi::S32> nbr,
                         ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::S32>> argk) {
  if (auto err = check_pool_args(pool, x, nbr, OffsetsLeading, "gather_max");
      err.failure())
    return err;
  const MapDims map = map_dims(nbr, OffsetsLeading);
  const int64_t C = x.dimensions()[1], rows = map.rows, K = map.K;
  if (auto err = check_matrix(*argk, "argk", rows, C); err.failure()) return err;
  if (auto err = check_matrix(*out, "out", rows, C); err.failure()) return err;
  const int32_t* nb = nbr.typed_data();
  int32_t* ak = argk->typed_data();
  return dispatch_float(x.element_type(), out->element_type(), "gather_max", [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accum<T>::type;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    Acc* o = reinterpret_cast<Acc*>(out->untyped_data());
    parallel_for_rows(pool, rows, kTileRows, [&](int64_t r) {
      Acc* orow = o + r * C;
      int32_t* arow = ak + r * C;
      std::fill(orow, orow + C, Acc(0));
      std::fill(arow, arow + C, -1);
      for (int64_t k = 0; k < K; ++k) {
        const int32_t s = nb[map.layout.at(r, k)];
        if (s < 0) continue;
        const T* xrow = xs + static_cast<int64_t>(s) * C;
        for (int64_t c = 0; c < C; ++c) {
          const Acc v = static_cast<Acc>(to_float(xrow[c]));
          if (arow[c] < 0 || v > orow[c]) {
            orow[c] = v;
            arow[c] = static_cast<int32_t>(k);
          }
        }
      }
    });
  });
}

template <bool OffsetsLeading>
ffi::Error GatherMaxGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer g,
                             ffi::Buffer<ffi::S32> argk,
                             ffi::Buffer<ffi::S32> in_nbr,
                             ffi::Result<ffi::AnyBuffer> dx) {
  // in_nbr entries are rows of g (outputs of the pool).
  if (auto err = check_pool_args(pool, g, in_nbr, OffsetsLeading, "gather_max_grad");
      err.failure())
    return err;
  const MapDims map = map_dims(in_nbr, OffsetsLeading);
  const int64_t C = g.dimensions()[1];
  if (auto err = check_matrix(argk, "argk", g.dimensions()[0], C); err.failure())
    return err;
  if (auto err = check_matrix(*dx, "dx", map.rows, C); err.failure()) return err;
  const int32_t* nb = in_nbr.typed_data();
  const int32_t* ak = argk.typed_data();
  return dispatch_float(g.element_type(), dx->element_type(), "gather_max_grad", [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accum<T>::type;
    // Only the offset that won the max in the forward pass gets the gradient.
    gather_sum_rows(pool, reinterpret_cast<const T*>(g.untyped_data()), nb, map, C,
                    reinterpret_cast<Acc*>(dx->untyped_data()),
                    [&](int64_t k, int32_t o, int64_t c) { return ak[o * C + c] == k; });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherSumV1, GatherSumImpl<false>,
                              signature::gather_sum(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherSum, GatherSumImpl<true>,
                              signature::gather_sum(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMaxV1, GatherMaxImpl<false>,
                              signature::gather_max(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMax, GatherMaxImpl<true>,
                              signature::gather_max(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMaxGradV1, GatherMaxGradImpl<false>,
                              signature::gather_max_grad(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMaxGrad, GatherMaxGradImpl<true>,
                              signature::gather_max_grad(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

}  // namespace jsc
