// Shape and dtype checks of the handler operands, shared by the CPU and CUDA
// handlers. They read shapes only, never buffer contents (which live in
// device memory for the CUDA handlers).
#pragma once

#include <cstdint>
#include <string>

#include "jsc/ffi_util.h"
#include "jsc/geometry.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {

using S32Buffer = ffi::Buffer<ffi::S32>;

// "[M, K]" (v1 targets) or "[K, M]" (v2, offsets_leading): a neighbour map's shape.
inline const char* map_shape(bool offsets_leading) { return offsets_leading ? "[K, M]" : "[M, K]"; }

// The rows, offsets and layout of a rank-2 neighbour map, [M, K] or, offsets_leading,
// [K, M].
struct MapDims {
  int64_t rows, K;
  MapLayout layout;
};
inline MapDims map_dims(const S32Buffer& nbr, bool offsets_leading) {
  const auto d = nbr.dimensions();
  const int64_t rows = d[offsets_leading ? 1 : 0], K = d[offsets_leading ? 0 : 1];
  return {rows, K, MapLayout::make(offsets_leading, rows, K)};
}

// A neighbour map `name` of `rows` rows (any number where rows < 0) and K
// offsets: [rows, K], or [K, rows] where offsets_leading.
inline ffi::Error check_map(const S32Buffer& nbr, const char* name, int64_t rows, int64_t K,
                            bool offsets_leading) {
  return offsets_leading ? check_matrix(nbr, name, K, rows) : check_matrix(nbr, name, rows, K);
}

// Operands of jsc_build_rulebook: indices [rows, ndim + 1], out_indices
// [out_capacity, ndim + 1], out_nbr [out_capacity, K] and in_nbr [rows, K]
// (v1) or [K, out_capacity] and [K, rows] (v2, offsets_leading), needed [].
// Sets *rows and *out_capacity.
inline ffi::Error check_rulebook_buffers(const ConvGeometry& g,
                                         const S32Buffer& indices,
                                         const S32Buffer& out_indices,
                                         const S32Buffer& out_nbr,
                                         const S32Buffer& in_nbr,
                                         const S32Buffer& needed, bool offsets_leading,
                                         int64_t* rows, int64_t* out_capacity) {
  const int64_t cols = g.ndim + 1;
  const int64_t K = g.kernel_volume();
  *rows = indices.dimensions().size() == 2 ? indices.dimensions()[0] : -1;
  if (auto err = check_matrix(indices, "indices", -1, cols); err.failure())
    return err;
  if (auto err = check_map(out_nbr, "out_nbr", -1, K, offsets_leading); err.failure())
    return err;
  *out_capacity = map_dims(out_nbr, offsets_leading).rows;
  if (auto err = check_matrix(out_indices, "out_indices", *out_capacity, cols);
      err.failure())
    return err;
  if (auto err = check_map(in_nbr, "in_nbr", *rows, K, offsets_leading); err.failure())
    return err;
  if (needed.element_count() != 1) return invalid("needed must be a scalar");
  if (g.mode == ConvMode::kSubm && *out_capacity != *rows) {
    return invalid("a submanifold rulebook has out_capacity == capacity");
  }
  return ffi::Error::Success();
}

struct MatmulDims {
  int64_t n, cin, K, cout, rows;  // x [n, cin], w [K, cin, cout], nbr [rows, K] or [K, rows]
  MapLayout layout;               // of nbr
};

// Operands of jsc_gather_matmul: x [N, Cin], w [K, Cin, Cout], nbr [M, K]
// (v1) or [K, M] (v2, offsets_leading), out [M, Cout] (its dtype is checked by
// dispatch_float).
inline ffi::Error check_gather_matmul(const ffi::AnyBuffer& x,
                                      const ffi::AnyBuffer& w,
                                      const S32Buffer& nbr,
                                      const ffi::AnyBuffer& out,
                                      bool offsets_leading, MatmulDims* d) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || nbr.dimensions().size() != 2) {
    return invalid(std::string("gather_matmul expects x [N, Cin], w [K, Cin, Cout], nbr ") +
                   map_shape(offsets_leading));
  }
  const MapDims map = map_dims(nbr, offsets_leading);
  *d = {xd[0], xd[1], wd[0], wd[2], map.rows, map.layout};
  if (wd[1] != d->cin || map.K != d->K || x.element_type() != w.element_type()) {
    return invalid("gather_matmul: x, w and nbr disagree on Cin, K or dtype");
  }
  return check_matrix(out, "out", d->rows, d->cout);
}

// Operands of jsc_gather_matmul_grad: x [N, Cin], g [M, Cout], nbr [M, K]
// (v1) or [K, M] (v2, offsets_leading), dw [K, Cin, Cout].
inline ffi::Error check_gather_matmul_grad(const ffi::AnyBuffer& x,
                                           const ffi::AnyBuffer& g,
                                           const S32Buffer& nbr,
                                           const ffi::AnyBuffer& dw,
                                           bool offsets_leading, MatmulDims* d) {
  const auto xd = x.dimensions(), gd = g.dimensions();
  if (xd.size() != 2 || gd.size() != 2 || nbr.dimensions().size() != 2) {
    return invalid(std::string("gather_matmul_grad expects x [N, Cin], g [M, Cout], nbr ") +
                   map_shape(offsets_leading));
  }
  const MapDims map = map_dims(nbr, offsets_leading);
  *d = {xd[0], xd[1], map.K, gd[1], map.rows, map.layout};
  if (gd[0] != d->rows || x.element_type() != g.element_type()) {
    return invalid("gather_matmul_grad: g and nbr disagree on rows, or x and g on dtype");
  }
  const auto dd = dw.dimensions();
  if (dd.size() != 3 || dd[0] != d->K || dd[1] != d->cin || dd[2] != d->cout) {
    return invalid("gather_matmul_grad: dw must be [K, Cin, Cout]");
  }
  return ffi::Error::Success();
}

// Pooling operands: a table [N, C] and a neighbour map [M, K] (v1) or [K, M]
// (v2, offsets_leading) into it.
inline ffi::Error check_pool_shapes(const ffi::AnyBuffer& table,
                                    const S32Buffer& nbr, bool offsets_leading, const char* what) {
  if (table.dimensions().size() != 2 || nbr.dimensions().size() != 2) {
    return invalid(std::string(what) + " expects [N, C] features and a " + map_shape(offsets_leading) +
                   " neighbour map");
  }
  return ffi::Error::Success();
}

}  // namespace jsc
