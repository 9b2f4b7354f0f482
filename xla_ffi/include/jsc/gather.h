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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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
// minus begin) and src(k)[j] (the entry) for j < count(k), in row order.
// Rows are compacted one at a time (16 entries per AVX-512 step), then the
// compacted pairs are bucketed by offset with a counting sort.
class TilePairs {
 public:
  void collect(const int32_t* nbr, int64_t K, int64_t begin, int64_t end) {
    constexpr int64_t kSlack = 16;  // a vector store may run past the pairs
    const int64_t entries = (end - begin) * K;
    if (static_cast<int64_t>(flat_src_.size()) < entries + kSlack) {
      for (auto* v : {&flat_src_, &flat_k_, &flat_pos_, &src_, &pos_}) v->resize(entries + kSlack);
    }
    // Local pointers: the vector stores may alias anything, members included.
    int32_t *flat_src = flat_src_.data(), *flat_k = flat_k_.data(), *flat_pos = flat_pos_.data();
    start_.assign(K + 1, 0);
    int32_t* count = start_.data() + 1;  // count[k]: pairs of offset k
    int64_t m = 0;
#if defined(__AVX512F__)
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* row = nbr + r * K;
      const __m512i pos = _mm512_set1_epi32(static_cast<int32_t>(r - begin));
      for (int64_t j = 0; j < K; j += 16) {
        const __mmask16 in_row = K - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - j)) - 1);
        const __m512i s = _mm512_maskz_loadu_epi32(in_row, row + j);
        const __mmask16 valid = _mm512_mask_cmpge_epi32_mask(in_row, s, _mm512_setzero_si512());
        const __m512i k = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(j)));
        _mm512_storeu_si512(flat_src + m, _mm512_maskz_compress_epi32(valid, s));
        _mm512_storeu_si512(flat_k + m, _mm512_maskz_compress_epi32(valid, k));
        _mm512_storeu_si512(flat_pos + m, pos);
        const __m512i c = _mm512_maskz_loadu_epi32(in_row, count + j);
        _mm512_mask_storeu_epi32(count + j, in_row, _mm512_mask_add_epi32(c, valid, c, _mm512_set1_epi32(1)));
        m += __builtin_popcount(valid);
      }
    }
#else
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* row = nbr + r * K;
      for (int64_t k = 0; k < K; ++k) {  // branch-free: most entries are -1
        flat_src[m] = row[k];
        flat_k[m] = static_cast<int32_t>(k);
        flat_pos[m] = static_cast<int32_t>(r - begin);
        count[k] += row[k] >= 0;
        m += row[k] >= 0;
      }
    }
#endif
    int32_t* start = start_.data();
    for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
    next_.assign(start, start + K);
    int32_t *next = next_.data(), *pos = pos_.data(), *src = src_.data();
    for (int64_t i = 0; i < m; ++i) {
      const int32_t at = next[flat_k[i]]++;
      pos[at] = flat_pos[i];
      src[at] = flat_src[i];
    }
  }

  int64_t count(int64_t k) const { return start_[k + 1] - start_[k]; }
  const int32_t* pos(int64_t k) const { return pos_.data() + start_[k]; }
  const int32_t* src(int64_t k) const { return src_.data() + start_[k]; }

 private:
  std::vector<int32_t> start_, next_, pos_, src_, flat_src_, flat_k_, flat_pos_;
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
