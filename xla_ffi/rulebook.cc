// Rulebook construction on the CPU: which input row meets which output row
// through which kernel offset, as two neighbour maps (see rulebook.py).
// Sites are linearised into 64-bit keys and sorted (a radix sort; inputs
// already in (batch, coords) order, as voxelizers and strided convs leave
// them, are only checked). For a fixed kernel offset, the input site that an
// output reads moves forward through the sorted input keys as the outputs
// do, so the look-ups of each offset are one forward walk through a sorted
// array instead of random hash probes. Work is split into tiles of output
// rows, each writing only its own rows, so results do not depend on the
// number of threads.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "jsc/checks.h"
#include "jsc/ffi_util.h"
#include "jsc/geometry.h"
#include "jsc/parallel.h"
#include "jsc/signatures.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {
namespace {

using S32 = ffi::Buffer<ffi::S32>;
using S32Result = ffi::ResultBuffer<ffi::S32>;

constexpr int64_t kTileRows = 2048;  // rows per parallel task

// Sorts `keys` (all >= 0) ascending with a stable least-significant-digit
// radix sort, permuting `values` alike. Digits of at most 12 bits (the counts
// stay in the L1 cache), as few passes as the largest key needs.
template <typename Value>
void radix_sort(std::vector<int64_t>* keys, std::vector<Value>* values) {
  const int64_t n = static_cast<int64_t>(keys->size());
  const uint64_t max_key =
      n == 0 ? 0 : *std::max_element(keys->begin(), keys->end());
  int bits = 0;
  while (bits < 63 && (max_key >> bits) > 0) ++bits;
  const int passes = (bits + 11) / 12;
  if (passes == 0) return;
  const int digit_bits = (bits + passes - 1) / passes;
  const int64_t digits = int64_t{1} << digit_bits;
  std::vector<int64_t> sorted_keys(n);
  std::vector<Value> sorted_values(n);
  std::vector<int64_t> start(digits);
  for (int shift = 0; shift < bits; shift += digit_bits) {
    auto digit = [&](int64_t key) { return (key >> shift) & (digits - 1); };
    std::fill(start.begin(), start.end(), 0);
    for (const int64_t key : *keys) ++start[digit(key)];
    int64_t sum = 0;
    for (int64_t& s : start) sum += std::exchange(s, sum);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t to = start[digit((*keys)[i])]++;
      sorted_keys[to] = (*keys)[i];
      sorted_values[to] = (*values)[i];
    }
    keys->swap(sorted_keys);
    values->swap(sorted_values);
  }
}

// The active input sites in ascending key order (keys over (batch_size,
// *in_shape)), followed by one sentinel key larger than any site's.
struct SortedSites {
  std::vector<int64_t> keys;
  std::vector<int32_t> rows;
  int64_t size() const { return static_cast<int64_t>(rows.size()); }
};

std::string describe_row(const int32_t* row, int ndim) {
  std::string s = "(";
  for (int d = 0; d <= ndim; ++d) {
    s += std::to_string(row[d]) + (d < ndim ? ", " : ")");
  }
  return s;
}

// Checks every active row (batch >= 0) against batch_size and in_shape.
ffi::Error check_sites(const ConvGeometry& g, const int32_t* indices,
                       int64_t rows) {
  const int cols = g.ndim + 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = indices + r * cols;
    if (row[0] >= 0 && !site_in_grid(g, row)) {
      return invalid("indices row " + std::to_string(r) + " " +
                     describe_row(row, g.ndim) +
                     " lies outside batch_size x spatial_shape");
    }
  }
  return ffi::Error::Success();
}

// Sorts the active rows of `indices` by site; rejects duplicate sites.
ffi::Error sort_sites(const ConvGeometry& g, const int32_t* indices,
                      int64_t rows, SortedSites* sites) {
  const int cols = g.ndim + 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = indices + r * cols;
    if (row[0] < 0) continue;
    sites->keys.push_back(input_key(g, row));
    sites->rows.push_back(static_cast<int32_t>(r));
  }
  auto& keys = sites->keys;
  if (std::adjacent_find(keys.begin(), keys.end(), std::greater_equal<>()) !=
      keys.end()) {
    radix_sort(&keys, &sites->rows);
    const auto same = std::adjacent_find(keys.begin(), keys.end());
    if (same != keys.end()) {
      const int64_t i = same - keys.begin();
      return invalid("duplicate site " +
                     describe_row(indices + sites->rows[i] * cols, g.ndim) +
                     " at indices rows " + std::to_string(sites->rows[i]) +
                     " and " + std::to_string(sites->rows[i + 1]));
    }
  }
  keys.push_back(std::numeric_limits<int64_t>::max());
  return ffi::Error::Success();
}

// The sites of the other grid that one site meets through the kernel,
// found dimension by dimension: along dim d, the kernel offsets that lead
// inside the other grid and the coordinates they lead to. Those along the
// last dim are in ascending coordinate order, so each combination of the
// other dims' offsets (a "line") gives a short run of ascending keys.
class Reach {
 public:
  explicit Reach(const ConvGeometry& g) : g_(g) {
    for (int d = 0; d < g.ndim; ++d) {
      offset_[d].resize(g.kernel[d]);
      coord_[d].resize(g.kernel[d]);
    }
  }

  // Number of lines: the kernel volume over the last dim's kernel size.
  int64_t lines() const { return g_.kernel_volume() / g_.kernel[g_.ndim - 1]; }

  // The sites that the indices row `row` reaches (outputs) or reads (inputs).
  template <bool kReadsInputs>
  void find(const int32_t* row) {
    for (int d = 0; d < g_.ndim; ++d) {
      count_[d] = 0;
      for (int64_t o = 0; o < g_.kernel[d]; ++o) {
        const int64_t c = kReadsInputs ? input_coord(g_, d, row[d + 1], o)
                                       : output_coord(g_, d, row[d + 1], o);
        if (c < 0) continue;
        offset_[d][count_[d]] = o;
        coord_[d][count_[d]++] = c;
      }
    }
    const int last = g_.ndim - 1;
    if (count_[last] > 1 && coord_[last][0] > coord_[last][1]) {
      std::reverse(offset_[last].begin(), offset_[last].begin() + count_[last]);
      std::reverse(coord_[last].begin(), coord_[last].begin() + count_[last]);
    }
    batch_ = row[0];
  }

  // Calls fn(line, k, key) for every site found, line by line, with keys
  // over (batch_size, *shape) ascending within a line, until fn returns
  // false.
  template <typename Fn>
  void for_each(const int64_t* shape, Fn fn) const {
    for_each_line<0>(0, batch_, shape, fn);
  }

 private:
  template <int D, typename Fn>
  bool for_each_line(int64_t line, int64_t prefix, const int64_t* shape,
                     Fn& fn) const {
    if (D == g_.ndim - 1) {
      for (int i = 0; i < count_[D]; ++i) {
        if (!fn(line, line * g_.kernel[D] + offset_[D][i],
                prefix * shape[D] + coord_[D][i]))
          return false;
      }
      return true;
    }
    if constexpr (D + 1 < kMaxDims) {
      for (int i = 0; i < count_[D]; ++i) {
        if (!for_each_line<D + 1>(line * g_.kernel[D] + offset_[D][i],
                                  prefix * shape[D] + coord_[D][i], shape, fn))
          return false;
      }
    }
    return true;
  }

  const ConvGeometry& g_;
  int64_t batch_ = 0;
  int count_[kMaxDims] = {};
  std::vector<int64_t> offset_[kMaxDims], coord_[kMaxDims];
};

// Sets the `count` entries of a map to -1, in parallel.
void clear_map(ffi::ThreadPool& pool, int32_t* data, int64_t count) {
  constexpr int64_t kBlock = int64_t{1} << 16;
  parallel_for(pool, (count + kBlock - 1) / kBlock, [&](int64_t block) {
    std::fill(data + block * kBlock, data + std::min(count, (block + 1) * kBlock), -1);
  });
}

// Submanifold look-ups: for every active row q of `indices`, taken in
// ascending site order, calls found(q, k, row) for every kernel offset
// k <= last_k through which q reads an input site, with that site's row.
// Each q is handled by one task, in a fixed order.
template <typename Found>
void search_inputs(ffi::ThreadPool& pool, const ConvGeometry& g,
                   const int32_t* indices, const SortedSites& inputs,
                   int64_t last_k, Found found) {
  const int cols = g.ndim + 1;
  const int64_t* keys = inputs.keys.data();
  const int64_t num_keys = static_cast<int64_t>(inputs.keys.size());
  const int64_t count = inputs.size();
  parallel_for(pool, (count + kTileRows - 1) / kTileRows, [&](int64_t tile) {
    Reach reach(g);
    // cursor[line]: the first key >= the line's first key of the last output
    // row searched. Outputs and so lines move forward through the sorted
    // keys; a step back (never taken by submanifold geometries) restarts
    // the search.
    std::vector<int64_t> cursor(reach.lines(), -1);
    const int64_t end = std::min(count, (tile + 1) * kTileRows);
    for (int64_t p = tile * kTileRows; p < end; ++p) {
      const int64_t q = inputs.rows[p];
      reach.find<true>(indices + q * cols);
      int64_t current_line = -1, at = 0;
      reach.for_each(g.in_shape, [&](int64_t line, int64_t k, int64_t key) {
        if (k > last_k) return false;
        if (line != current_line) {  // the first, smallest key of a line
          current_line = line;
          int64_t& c = cursor[line];
          if (c < 0 || (c > 0 && keys[c - 1] >= key)) {
            c = std::lower_bound(keys, keys + num_keys, key) - keys;
          } else {
            while (keys[c] < key) ++c;  // the sentinel key stops it
          }
          at = c;
        }
        while (keys[at] < key) ++at;
        if (keys[at] == key) found(q, k, inputs.rows[at]);
        return true;
      });
    }
  });
}

// Submanifold: output rows are the input rows, and offsets are symmetric
// about the centre: q reads row j through k exactly when j reads q through
// K - 1 - k. So only the offsets up to the centre are searched, and each
// pair found fills four entries: out_nbr[q, k] = in_nbr[q, K - 1 - k] = j and
// out_nbr[j, K - 1 - k] = in_nbr[j, k] = q. Each entry is written by one task.
// Both maps have `rows` rows, laid out as `layout`.
void build_subm(ffi::ThreadPool& pool, const ConvGeometry& g,
                const int32_t* indices, int64_t rows, const SortedSites& inputs,
                MapLayout layout, int32_t* out_nbr, int32_t* in_nbr) {
  const int64_t K = g.kernel_volume();
  clear_map(pool, out_nbr, rows * K);
  clear_map(pool, in_nbr, rows * K);
  search_inputs(pool, g, indices, inputs,
                K / 2, [&](int64_t q, int64_t k, int32_t j) {
                  out_nbr[layout.at(q, k)] = in_nbr[layout.at(q, K - 1 - k)] = j;
                  out_nbr[layout.at(j, K - 1 - k)] = in_nbr[layout.at(j, k)] =
                      static_cast<int32_t>(q);
                });
}

// Regular and transposed: output sites are every site some input reaches,
// numbered in sorted (batch, coords) order. Every (input row, offset) that
// reaches a site is listed with the site's key; sorting the list by key
// numbers the sites and gives both maps without a search. Sites past
// out_capacity are counted but not stored.
ffi::Error build_generative(ffi::ThreadPool& pool, const ConvGeometry& g,
                            const int32_t* indices, int64_t rows,
                            const SortedSites& inputs, int32_t* out_indices,
                            int64_t out_capacity, bool offsets_leading,
                            int32_t* out_nbr, int32_t* in_nbr, int32_t* needed) {
  const int cols = g.ndim + 1;
  const int64_t K = g.kernel_volume();
  const int64_t tiles = (inputs.size() + kTileRows - 1) / kTileRows;
  std::vector<std::vector<int64_t>> tile_keys(tiles), tile_pairs(tiles);
  parallel_for(pool, tiles, [&](int64_t tile) {
    Reach reach(g);
    const int64_t end = std::min(inputs.size(), (tile + 1) * kTileRows);
    for (int64_t p = tile * kTileRows; p < end; ++p) {
      const int64_t r = inputs.rows[p];
      reach.find<false>(indices + r * cols);
      reach.for_each(g.out_shape, [&](int64_t, int64_t k, int64_t key) {
        tile_keys[tile].push_back(key);
        tile_pairs[tile].push_back(r << 32 | k);
        return true;
      });
    }
  });
  std::vector<int64_t> keys, pairs;  // pairs: input row << 32 | offset
  for (int64_t t = 0; t < tiles; ++t) {
    keys.insert(keys.end(), tile_keys[t].begin(), tile_keys[t].end());
    pairs.insert(pairs.end(), tile_pairs[t].begin(), tile_pairs[t].end());
  }
  radix_sort(&keys, &pairs);

  const int64_t count =
      keys.empty() ? 0
                   : 1 + std::inner_product(keys.begin() + 1, keys.end(),
                                            keys.begin(), int64_t{0},
                                            std::plus<>(), std::not_equal_to<>());
  if (count > INT32_MAX) return invalid("more than 2^31 output sites");
  *needed = static_cast<int32_t>(count);
  const int64_t stored = std::min(count, out_capacity);
  std::fill(out_indices + stored * cols, out_indices + out_capacity * cols, -1);
  clear_map(pool, out_nbr, out_capacity * K);
  clear_map(pool, in_nbr, rows * K);
  const MapLayout out_layout = MapLayout::make(offsets_leading, out_capacity, K);
  const MapLayout in_layout = MapLayout::make(offsets_leading, rows, K);
  int64_t o = -1;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (i == 0 || keys[i] != keys[i - 1]) {
      if (++o == stored) break;
      decode_key(keys[i], g.out_shape, g.ndim, out_indices + o * cols);
    }
    const int64_t row = pairs[i] >> 32, k = pairs[i] & 0xffffffff;
    out_nbr[out_layout.at(o, k)] = static_cast<int32_t>(row);
    in_nbr[in_layout.at(row, k)] = static_cast<int32_t>(o);
  }
  return ffi::Error::Success();
}

// OffsetsLeading: out_nbr [K, out_capacity], in_nbr [K, rows] (the _v2
// target), else [out_capacity, K] and [rows, K] (_v1).
template <bool OffsetsLeading>
ffi::Error BuildRulebookImpl(ffi::ThreadPool pool, S32 indices,
                             S32Result out_indices, S32Result out_nbr,
                             S32Result in_nbr, S32Result needed, int64_t mode,
                             int64_t batch_size,
                             ffi::Span<const int64_t> in_shape,
                             ffi::Span<const int64_t> out_shape,
                             ffi::Span<const int64_t> kernel,
                             ffi::Span<const int64_t> stride,
                             ffi::Span<const int64_t> padding,
                             ffi::Span<const int64_t> dilation) {
  ConvGeometry g;
  if (auto err = decode_geometry(mode, batch_size, in_shape, out_shape, kernel,
                                 stride, padding, dilation, &g);
      err.failure()) {
    return err;
  }
  const int64_t cols = g.ndim + 1;
  int64_t rows = 0, out_capacity = 0;
  if (auto err = check_rulebook_buffers(g, indices, *out_indices, *out_nbr, *in_nbr, *needed,
                                        OffsetsLeading, &rows, &out_capacity);
      err.failure())
    return err;
  if (auto err = check_sites(g, indices.typed_data(), rows); err.failure())
    return err;

  SortedSites inputs;
  if (auto err = sort_sites(g, indices.typed_data(), rows, &inputs);
      err.failure())
    return err;
  if (g.mode == ConvMode::kSubm) {
    std::copy(indices.typed_data(), indices.typed_data() + rows * cols,
              out_indices->typed_data());
    needed->typed_data()[0] = static_cast<int32_t>(inputs.size());
    build_subm(pool, g, indices.typed_data(), rows, inputs,
               MapLayout::make(OffsetsLeading, rows, g.kernel_volume()),
               out_nbr->typed_data(), in_nbr->typed_data());
    return ffi::Error::Success();
  }
  return build_generative(pool, g, indices.typed_data(), rows, inputs,
                          out_indices->typed_data(), out_capacity, OffsetsLeading,
                          out_nbr->typed_data(), in_nbr->typed_data(),
                          needed->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BuildRulebookV1, BuildRulebookImpl<false>,
                              signature::build_rulebook(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BuildRulebook, BuildRulebookImpl<true>,
                              signature::build_rulebook(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

}  // namespace jsc
