// Building blocks of the CPU feature kernels: neighbour-map checks, the
// pairs of a tile of output rows grouped by kernel offset, and gathered rows
// in the accumulation type.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "jsc/dtype.h"
#include "jsc/ffi_util.h"
#include "jsc/parallel.h"

namespace jsc {

// Every neighbour-map entry is -1 or a row of a table with `rows` rows. The
// entries are scanned in parallel blocks; only when one holds a bad entry is
// the map searched again, in order, for the first one to report.
inline ffi::Error check_neighbours(ffi::ThreadPool& pool, const int32_t* nbr,
                                   int64_t count, int64_t rows,
                                   const char* name) {
  constexpr int64_t kBlock = int64_t{1} << 16;
  // entry + 1 taken as uint32 is <= rows exactly when -1 <= entry < rows
  // (an int32 entry is < 2^31); the largest one per block is a vectorised
  // reduction.
  const uint32_t limit = static_cast<uint32_t>(std::min<int64_t>(rows, INT32_MAX));
  auto bad = [limit](int32_t e) { return static_cast<uint32_t>(e) + 1u > limit; };
  std::atomic<bool> any_bad{false};
  parallel_for(pool, (count + kBlock - 1) / kBlock, [&](int64_t block) {
    const int64_t end = std::min(count, (block + 1) * kBlock);
    uint32_t largest = 0;
    for (int64_t e = block * kBlock; e < end; ++e) {
      largest = std::max(largest, static_cast<uint32_t>(nbr[e]) + 1u);
    }
    if (largest > limit) any_bad.store(true, std::memory_order_relaxed);
  });
  if (!any_bad.load()) return ffi::Error::Success();
  int64_t e = 0;
  while (!bad(nbr[e])) ++e;
  return invalid(std::string(name) + " entry " + std::to_string(e) + " is " +
                 std::to_string(nbr[e]) + ", outside [-1, " +
                 std::to_string(rows) + ")");
}

// Rows per tile of the feature kernels: fewer for large kernels, so that a
// tile's pairs stay in the L2 cache.
inline int64_t tile_rows_for(int64_t K) {
  return std::clamp<int64_t>(int64_t{32768} / std::max<int64_t>(K, 1), 64, 1024);
}

// The pairs (entries >= 0) of rows [begin, end) of a checked neighbour map
// nbr [rows, K], grouped by offset: those of offset k are pos(k)[j] (the row
// minus begin) and src(k)[j] (the entry) for j < count(k), in row order. The
// tile is scanned one offset (column) at a time, which writes each offset's
// pairs in place: no sort. A -1 entry is written and not counted, so the scan
// has no branch.
class TilePairs {
 public:
  void collect(const int32_t* nbr, int64_t K, int64_t begin, int64_t end) {
    const int64_t entries = (end - begin) * K;
    if (static_cast<int64_t>(src_.size()) < entries) {
      src_.resize(entries);
      pos_.resize(entries);
    }
    start_.resize(K + 1);
    // Local pointers: stores through them cannot alias the loop's bounds.
    int32_t *src = src_.data(), *pos = pos_.data();
    int64_t m = 0;
    for (int64_t k = 0; k < K; ++k) {
      start_[k] = static_cast<int32_t>(m);
      for (int64_t r = begin; r < end; ++r) {
        const int32_t e = nbr[r * K + k];
        src[m] = e;
        pos[m] = static_cast<int32_t>(r - begin);
        m += e >= 0;
      }
    }
    start_[K] = static_cast<int32_t>(m);
  }

  int64_t count(int64_t k) const { return start_[k + 1] - start_[k]; }
  const int32_t* pos(int64_t k) const { return pos_.data() + start_[k]; }
  const int32_t* src(int64_t k) const { return src_.data() + start_[k]; }

 private:
  std::vector<int32_t> start_, pos_, src_;
};

// Rows x[src[j], :] in the accumulation type Acc, for j < m: pointers into x
// when T is Acc, else converted copies in a buffer owned here (one per thread
// and use, reused across calls). The rows are prefetched ahead: the gathers
// miss the caches.
template <typename T, typename Acc>
class RowGather {
 public:
  const Acc* const* gather(const T* x, int64_t cols, const int32_t* src, int64_t m) {
    constexpr int64_t kAhead = 32;
    if (static_cast<int64_t>(rows_.size()) < m) rows_.resize(m);
    if constexpr (!std::is_same_v<T, Acc>) {
      if (static_cast<int64_t>(converted_.size()) < m * cols) converted_.resize(m * cols);
    }
    for (int64_t j = 0; j < m; ++j) {
      if (j + kAhead < m) {
        const char* ahead = reinterpret_cast<const char*>(x + static_cast<int64_t>(src[j + kAhead]) * cols);
        for (int64_t b = 0; b < cols * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(ahead + b);
      }
      const T* row = x + static_cast<int64_t>(src[j]) * cols;
      if constexpr (std::is_same_v<T, Acc>) {
        rows_[j] = row;
      } else {
        Acc* out = converted_.data() + j * cols;
        for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<Acc>(to_float(row[c]));
        rows_[j] = out;
      }
    }
    return rows_.data();
  }

 private:
  std::vector<const Acc*> rows_;
  std::vector<Acc> converted_;
};

}  // namespace jsc
