// Building blocks of the CPU feature kernels: neighbour-map checks, the
// pairs of a tile of output rows grouped by kernel offset, and gathered rows
// in the accumulation type.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "jsc/common.h"
#include "jsc/dtype.h"
#include "jsc/ffi_util.h"
#include "jsc/parallel.h"

namespace jsc {

// The error for the first entry of nbr [count] outside [-1, rows), which the
// caller found to exist.
inline ffi::Error first_bad_neighbour(const int32_t* nbr, int64_t count, int64_t rows,
                                      const char* name) {
  int64_t e = 0;
  while (e + 1 < count && nbr[e] >= -1 && nbr[e] < rows) ++e;
  return invalid(std::string(name) + " entry " + std::to_string(e) + " is " +
                 std::to_string(nbr[e]) + ", outside [-1, " +
                 std::to_string(rows) + ")");
}

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
  std::atomic<bool> any_bad{false};
  parallel_for(pool, (count + kBlock - 1) / kBlock, [&](int64_t block) {
    const int64_t end = std::min(count, (block + 1) * kBlock);
    uint32_t largest = 0;
    for (int64_t e = block * kBlock; e < end; ++e) {
      largest = std::max(largest, static_cast<uint32_t>(nbr[e]) + 1u);
    }
    if (largest > limit) any_bad.store(true, std::memory_order_relaxed);
  });
  return any_bad.load() ? first_bad_neighbour(nbr, count, rows, name) : ffi::Error::Success();
}

// Rows per tile of the feature kernels: fewer for large kernels, so that a
// tile's pairs stay in the L2 cache.
inline int64_t tile_rows_for(int64_t K) {
  return std::clamp<int64_t>(int64_t{32768} / std::max<int64_t>(K, 1), 64, 1024);
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// For each 8-bit mask of valid lanes, the lane permutation that moves the
// valid lanes to the front, in order (AVX2 has no compress instruction).
constexpr std::array<std::array<int32_t, 8>, 256> compress_table() {
  std::array<std::array<int32_t, 8>, 256> table{};
  for (int mask = 0; mask < 256; ++mask) {
    int n = 0;
    for (int lane = 0; lane < 8; ++lane) {
      if (mask >> lane & 1) table[mask][n++] = lane;
    }
  }
  return table;
}
inline constexpr auto kCompress8 = compress_table();
#endif

// The pairs (entries >= 0) of rows [begin, end) of a checked neighbour map
// with K offsets laid out as `layout`, grouped by offset: those of offset k are
// pos(k)[j] (the row minus begin) and src(k)[j] (the entry) for j < count(k),
// in row order. The tile is scanned one offset at a time, which writes each
// offset's pairs in place: no sort. The same pass checks the entries: collect
// returns false (and the pairs must not be used) unless every one is -1 or a
// row below `table_rows`.
class TilePairs {
 public:
  bool collect(const int32_t* nbr, MapLayout layout, int64_t K, int64_t begin, int64_t end,
               int64_t table_rows) {
    largest_ = 0;
    const int64_t entries = (end - begin) * K + kSlack;
    if (static_cast<int64_t>(src_.size()) < entries) {
      src_.resize(entries);
      pos_.resize(entries);
    }
    start_.resize(K + 1);
    int64_t m = 0;
    for (int64_t k = 0; k < K; ++k) {
      start_[k] = static_cast<int32_t>(m);
      const int32_t* column = nbr + layout.at(begin, k);
      m += layout.row_step == 1 ? collect_run(column, end - begin, m)
                                : collect_strided(column, layout.row_step, end - begin, m);
    }
    start_[K] = static_cast<int32_t>(m);
    // entry + 1 as uint32 is <= table_rows exactly when -1 <= entry < table_rows.
    return largest_ <= static_cast<uint64_t>(table_rows);
  }

  int64_t count(int64_t k) const { return start_[k + 1] - start_[k]; }
  const int32_t* pos(int64_t k) const { return pos_.data() + start_[k]; }
  const int32_t* src(int64_t k) const { return src_.data() + start_[k]; }

 private:
  // Whole vectors are stored past the last pair (then overwritten).
  static constexpr int64_t kSlack = 16;

  // Entries column[i * step], i < n: the pairs from slot m on; their count. A
  // -1 entry is written and not counted, so the scan has no branch.
  int64_t collect_strided(const int32_t* column, int64_t step, int64_t n, int64_t m) {
    // Local pointers: stores through them cannot alias the loop's bounds.
    int32_t *src = src_.data() + m, *pos = pos_.data() + m;
    int64_t count = 0;
    uint32_t largest = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t e = column[i * step];
      src[count] = e;
      pos[count] = static_cast<int32_t>(i);
      count += e >= 0;
      largest = std::max(largest, static_cast<uint32_t>(e) + 1u);
    }
    largest_ = std::max<uint64_t>(largest_, largest);
    return count;
  }

  // The same for contiguous entries (offset-leading maps), a vector at a time:
  // the valid lanes moved to the front in registers (AVX-512 compress, not the
  // slow compressing store; AVX2 a table of permutations), then the whole
  // vector stored.
  int64_t collect_run(const int32_t* column, int64_t n, int64_t m) {
    int64_t i = 0, count = 0;
#if defined(__AVX512F__)
    int32_t *src = src_.data() + m, *pos = pos_.data() + m;
    __m512i rows = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16), zero = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    __m512i largest = zero;
    for (; i + 16 <= n; i += 16) {
      const __m512i e = _mm512_loadu_si512(column + i);
      // (the masked form: gcc 12 warns about the undefined source of the plain one)
      largest = _mm512_mask_max_epu32(largest, 0xffff, largest, _mm512_add_epi32(e, one));
      const __mmask16 valid = _mm512_cmpge_epi32_mask(e, zero);
      _mm512_storeu_si512(src + count, _mm512_maskz_compress_epi32(valid, e));
      _mm512_storeu_si512(pos + count, _mm512_maskz_compress_epi32(valid, rows));
      count += __builtin_popcount(valid);
      rows = _mm512_add_epi32(rows, sixteen);
    }
    alignas(64) uint32_t lanes[16];
    _mm512_store_si512(lanes, largest);
    largest_ = std::max<uint64_t>(largest_, *std::max_element(lanes, lanes + 16));
#elif defined(__AVX2__)
    int32_t *src = src_.data() + m, *pos = pos_.data() + m;
    __m256i rows = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i eight = _mm256_set1_epi32(8), minus_one = _mm256_set1_epi32(-1);
    const __m256i one = _mm256_set1_epi32(1);
    __m256i largest = _mm256_setzero_si256();
    for (; i + 8 <= n; i += 8) {
      const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(column + i));
      largest = _mm256_max_epu32(largest, _mm256_add_epi32(e, one));
      const int valid = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(e, minus_one)));
      const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kCompress8[valid].data()));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(src + count), _mm256_permutevar8x32_epi32(e, order));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pos + count), _mm256_permutevar8x32_epi32(rows, order));
      count += __builtin_popcount(valid);
      rows = _mm256_add_epi32(rows, eight);
    }
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), largest);
    largest_ = std::max<uint64_t>(largest_, *std::max_element(lanes, lanes + 8));
#endif
    const int64_t rest = collect_strided(column + i, 1, n - i, m + count);
    int32_t* rest_pos = pos_.data() + m + count;
    for (int64_t j = 0; j < rest; ++j) rest_pos[j] += static_cast<int32_t>(i);
    return count + rest;
  }

  std::vector<int32_t> start_, pos_, src_;
  uint64_t largest_ = 0;  // the largest entry + 1 (as uint32) seen by collect
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
