// Helpers for the CPU handlers: argument checks that turn bad input into an
// ffi::Error instead of an out-of-bounds access, and geometry decoding.
#pragma once

#include <cstdint>
#include <string>

#include "jsc/geometry.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {

namespace ffi = xla::ffi;

inline ffi::Error invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_sparseconv: " + msg);
}

// Checks that `buf` is a matrix with `rows` rows and `cols` columns (each if >= 0).
template <typename Buffer>
ffi::Error check_matrix(const Buffer& buf, const char* name, int64_t rows,
                        int64_t cols) {
  const auto dims = buf.dimensions();
  if (dims.size() != 2) {
    return invalid(std::string(name) + " must have rank 2, got rank " +
                   std::to_string(dims.size()));
  }
  if ((rows >= 0 && dims[0] != rows) || (cols >= 0 && dims[1] != cols)) {
    return invalid(std::string(name) + " has shape [" +
                   std::to_string(dims[0]) + ", " + std::to_string(dims[1]) +
                   "], expected [" + (rows >= 0 ? std::to_string(rows) : "*") +
                   ", " + (cols >= 0 ? std::to_string(cols) : "*") + "]");
  }
  return ffi::Error::Success();
}

// Builds a ConvGeometry from the handler attributes and validates it.
inline ffi::Error decode_geometry(int64_t mode, int64_t batch_size,
                                  ffi::Span<const int64_t> in_shape,
                                  ffi::Span<const int64_t> out_shape,
                                  ffi::Span<const int64_t> kernel,
                                  ffi::Span<const int64_t> stride,
                                  ffi::Span<const int64_t> padding,
                                  ffi::Span<const int64_t> dilation,
                                  ConvGeometry* g) {
  const size_t ndim = in_shape.size();
  if (ndim < 1 || ndim > static_cast<size_t>(kMaxDims)) {
    return invalid("spatial rank must be 1 to 4, got " + std::to_string(ndim));
  }
  if (out_shape.size() != ndim || kernel.size() != ndim ||
      stride.size() != ndim || padding.size() != ndim ||
      dilation.size() != ndim) {
    return invalid("geometry attributes disagree on the spatial rank");
  }
  if (mode < 0 || mode > 2) return invalid("unknown convolution mode");
  if (batch_size < 1) return invalid("batch_size must be positive");
  g->ndim = static_cast<int>(ndim);
  g->mode = static_cast<ConvMode>(mode);
  g->batch_size = batch_size;
  // Keys range over batch_size * prod(max(in_shape, out_shape)).
  __int128 volume = batch_size;
  for (size_t d = 0; d < ndim; ++d) {
    if (in_shape[d] < 1 || out_shape[d] < 1 || kernel[d] < 1 ||
        stride[d] < 1 || dilation[d] < 1 || padding[d] < 0) {
      return invalid("non-positive shape, kernel, stride or dilation");
    }
    g->in_shape[d] = in_shape[d];
    g->out_shape[d] = out_shape[d];
    g->kernel[d] = kernel[d];
    g->stride[d] = stride[d];
    g->padding[d] = padding[d];
    g->dilation[d] = dilation[d];
    volume *= in_shape[d] > out_shape[d] ? in_shape[d] : out_shape[d];
    if (volume > (static_cast<__int128>(1) << 62)) {
      return invalid(
          "batch_size * prod(spatial_shape) exceeds 2^62; use backend='xla'");
    }
  }
  return ffi::Error::Success();
}

}  // namespace jsc
