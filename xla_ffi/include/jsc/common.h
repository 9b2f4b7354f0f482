// Shared definitions for host (C++) and device (CUDA) code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JSC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define JSC_HOST_DEVICE inline
#endif

namespace jsc {

// Spatial dimensions supported by every op.
constexpr int kMaxDims = 4;

// Where entry (row r, kernel offset k) of a neighbour map lies: the _v1
// convolution targets take maps [rows, K] (row-leading), the _v2 ones the
// rulebook's own [K, rows] (offset-leading), so an offset's entries for a run
// of rows are contiguous.
struct MapLayout {
  int64_t row_step, offset_step;
  static MapLayout make(bool offsets_leading, int64_t rows, int64_t K) {
    return offsets_leading ? MapLayout{1, rows} : MapLayout{K, 1};
  }
  JSC_HOST_DEVICE int64_t at(int64_t r, int64_t k) const { return r * row_step + k * offset_step; }
};

}  // namespace jsc
