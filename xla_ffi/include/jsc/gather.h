// Building blocks of the feature kernels: neighbour-map checks and packing
// of gathered rows into contiguous buffers in the accumulation type.
#pragma once

#include <cstdint>
#include <string>

#include "jsc/dtype.h"
#include "jsc/ffi_util.h"

namespace jsc {

// Every neighbour-map entry is -1 or a row of a table with `rows` rows.
inline ffi::Error check_neighbours(const int32_t* nbr, int64_t count,
                                   int64_t rows, const char* name) {
  for (int64_t e = 0; e < count; ++e) {
    if (nbr[e] < -1 || nbr[e] >= rows) {
      return invalid(std::string(name) + " entry " + std::to_string(e) +
                     " is " + std::to_string(nbr[e]) + ", outside [-1, " +
                     std::to_string(rows) + ")");
    }
  }
  return ffi::Error::Success();
}

// Rows [begin, end) that have a neighbour through offset k: their positions
// relative to `begin` in `pos`, the neighbours in `src`; returns the count.
inline int64_t collect_pairs(const int32_t* nbr, int64_t K, int64_t k,
                             int64_t begin, int64_t end, int32_t* pos,
                             int32_t* src) {
  int64_t m = 0;
  for (int64_t r = begin; r < end; ++r) {
    const int32_t s = nbr[r * K + k];
    if (s >= 0) {
      pos[m] = static_cast<int32_t>(r - begin);
      src[m++] = s;
    }
  }
  return m;
}

// packed[j, :] = x[src[j], :] converted to Acc, for j < m.
template <typename T, typename Acc>
void pack_rows(const T* x, int64_t cols, const int32_t* src, int64_t m,
               Acc* packed) {
  for (int64_t j = 0; j < m; ++j) {
    const T* row = x + static_cast<int64_t>(src[j]) * cols;
    Acc* out = packed + j * cols;
    for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<Acc>(to_float(row[c]));
  }
}

}  // namespace jsc
