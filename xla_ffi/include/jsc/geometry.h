// Index logic of sparse convolutions: which output site an input site reaches
// through a kernel offset, and how sites are linearised into 64-bit keys.
// Shared by the CPU and CUDA handlers; mirrors jax_sparseconv/geometry.py.
#pragma once

#include <cstdint>

#include "jsc/common.h"

namespace jsc {

enum class ConvMode : int64_t { kSubm = 0, kRegular = 1, kTransposed = 2 };

struct ConvGeometry {
  int ndim = 0;
  ConvMode mode = ConvMode::kSubm;
  int64_t batch_size = 0;
  int64_t in_shape[kMaxDims] = {};
  int64_t out_shape[kMaxDims] = {};
  int64_t kernel[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
  int64_t padding[kMaxDims] = {};
  int64_t dilation[kMaxDims] = {};

  JSC_HOST_DEVICE int64_t kernel_volume() const {
    int64_t v = 1;
    for (int d = 0; d < ndim; ++d) v *= kernel[d];
    return v;
  }
};

// Splits a row-major kernel offset index into per-dimension offsets.
JSC_HOST_DEVICE void unravel_offset(const ConvGeometry& g, int64_t k,
                                    int64_t* offset) {
  for (int d = g.ndim - 1; d >= 0; --d) {
    offset[d] = k % g.kernel[d];
    k /= g.kernel[d];
  }
}

// The output coordinate along dim d that the input coordinate `in` reaches
// through the kernel offset `offset` along d (see unravel_offset), or -1 if
// there is none (off the grid, or between strides).
//   subm:       out = in - (offset - kernel // 2) * dilation
//   regular:    out * stride = in + padding - offset * dilation
//   transposed: out = in * stride - padding + offset * dilation
JSC_HOST_DEVICE int64_t output_coord(const ConvGeometry& g, int d, int64_t in,
                                     int64_t offset) {
  int64_t out;
  if (g.mode == ConvMode::kSubm) {
    out = in - (offset - g.kernel[d] / 2) * g.dilation[d];
  } else if (g.mode == ConvMode::kRegular) {
    const int64_t t = in + g.padding[d] - offset * g.dilation[d];
    if (t < 0 || t % g.stride[d] != 0) return -1;
    out = t / g.stride[d];
  } else {
    out = in * g.stride[d] - g.padding[d] + offset * g.dilation[d];
  }
  return out >= 0 && out < g.out_shape[d] ? out : -1;
}

// The input coordinate along dim d that the output coordinate `out` reads
// through the kernel offset `offset` along d: the inverse of output_coord,
// or -1 if there is none.
//   subm:       in = out + (offset - kernel // 2) * dilation
//   regular:    in = out * stride - padding + offset * dilation
//   transposed: in * stride = out + padding - offset * dilation
JSC_HOST_DEVICE int64_t input_coord(const ConvGeometry& g, int d, int64_t out,
                                    int64_t offset) {
  int64_t in;
  if (g.mode == ConvMode::kSubm) {
    in = out + (offset - g.kernel[d] / 2) * g.dilation[d];
  } else if (g.mode == ConvMode::kRegular) {
    in = out * g.stride[d] - g.padding[d] + offset * g.dilation[d];
  } else {
    const int64_t t = out + g.padding[d] - offset * g.dilation[d];
    if (t < 0 || t % g.stride[d] != 0) return -1;
    in = t / g.stride[d];
  }
  return in >= 0 && in < g.in_shape[d] ? in : -1;
}

// The output coordinates that input coordinates `in` (ndim values, no batch)
// reach through the kernel offset `offset` (ndim values), or false if there
// are none.
JSC_HOST_DEVICE bool output_site(const ConvGeometry& g, const int32_t* in,
                                 const int64_t* offset, int64_t* out) {
  for (int d = 0; d < g.ndim; ++d) {
    out[d] = output_coord(g, d, in[d], offset[d]);
    if (out[d] < 0) return false;
  }
  return true;
}

// Row-major key of (batch, coords) over (batch_size, *shape). Keys sort in
// the same order as the (batch, coords) tuples. The caller checks that
// batch_size * prod(shape) fits in int64.
JSC_HOST_DEVICE int64_t encode_key(int64_t batch, const int64_t* coords,
                                   const int64_t* shape, int ndim) {
  int64_t key = batch;
  for (int d = 0; d < ndim; ++d) key = key * shape[d] + coords[d];
  return key;
}

// An indices row (batch, coords...) is active (batch >= 0) and lies inside
// batch_size x in_shape.
JSC_HOST_DEVICE bool site_in_grid(const ConvGeometry& g, const int32_t* row) {
  bool ok = row[0] >= 0 && row[0] < g.batch_size;
  for (int d = 0; d < g.ndim; ++d) {
    ok = ok && row[d + 1] >= 0 && row[d + 1] < g.in_shape[d];
  }
  return ok;
}

// Key of the input site of an indices row, over (batch_size, *in_shape).
JSC_HOST_DEVICE int64_t input_key(const ConvGeometry& g, const int32_t* row) {
  int64_t coords[kMaxDims];
  for (int d = 0; d < g.ndim; ++d) coords[d] = row[d + 1];
  return encode_key(row[0], coords, g.in_shape, g.ndim);
}

// Key over (batch_size, *out_shape) of the output site that the active
// indices row `row` reaches through `offset` (see unravel_offset), or -1.
JSC_HOST_DEVICE int64_t reached_key(const ConvGeometry& g, const int32_t* row,
                                    const int64_t* offset) {
  int64_t site[kMaxDims];
  if (!output_site(g, row + 1, offset, site)) return -1;
  return encode_key(row[0], site, g.out_shape, g.ndim);
}

JSC_HOST_DEVICE void decode_key(int64_t key, const int64_t* shape, int ndim,
                                int32_t* row) {
  for (int d = ndim - 1; d >= 0; --d) {
    row[d + 1] = static_cast<int32_t>(key % shape[d]);
    key /= shape[d];
  }
  row[0] = static_cast<int32_t>(key);
}

}  // namespace jsc
