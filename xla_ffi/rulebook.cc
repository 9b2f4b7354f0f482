// Rulebook construction on the CPU: which input row meets which output row
// through which kernel offset, as two neighbour maps (see rulebook.py).
// Input sites go into a hash table of 64-bit keys; look-ups run in parallel
// row tiles, each writing only its own rows, so results do not depend on the
// number of threads.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "jsc/checks.h"
#include "jsc/ffi_util.h"
#include "jsc/geometry.h"
#include "jsc/hash_table.h"
#include "jsc/parallel.h"
#include "jsc/signatures.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {
namespace {

using S32 = ffi::Buffer<ffi::S32>;
using S32Result = ffi::ResultBuffer<ffi::S32>;

constexpr int64_t kTileRows = 2048;  // rows per parallel task

// The active input sites as a hash set of row numbers keyed by their site.
// A slot holds only a row (4 bytes; keys are recomputed from `indices`), so
// the table of a whole scan stays in the L2 cache during the look-ups.
class RowTable {
 public:
  RowTable(const ConvGeometry& g, const int32_t* indices, int64_t rows)
      : g_(g), indices_(indices), slots_(hash_table_size(rows), -1),
        mask_(static_cast<uint64_t>(slots_.size() - 1)) {}

  // Inserts `row`; returns the row already holding its site, or -1.
  int32_t insert(int32_t row) {
    const int64_t key = key_of(row);
    for (uint64_t slot = home_slot(key) & mask_;; slot = (slot + 1) & mask_) {
      if (slots_[slot] < 0) {
        slots_[slot] = row;
        return -1;
      }
      if (key_of(slots_[slot]) == key) return slots_[slot];
    }
  }

  // The row holding the site `key`, or -1.
  int32_t find(int64_t key) const {
    for (uint64_t slot = home_slot(key) & mask_;; slot = (slot + 1) & mask_) {
      if (slots_[slot] < 0 || key_of(slots_[slot]) == key) return slots_[slot];
    }
  }

 private:
  int64_t key_of(int32_t row) const {
    return input_key(g_, indices_ + static_cast<int64_t>(row) * (g_.ndim + 1));
  }

  const ConvGeometry& g_;
  const int32_t* indices_;
  std::vector<int32_t> slots_;
  uint64_t mask_;
};

// Kernel offsets unravelled once: offsets[k * ndim + d].
std::vector<int64_t> offset_table(const ConvGeometry& g) {
  const int64_t K = g.kernel_volume();
  std::vector<int64_t> offsets(K * g.ndim);
  for (int64_t k = 0; k < K; ++k) unravel_offset(g, k, offsets.data() + k * g.ndim);
  return offsets;
}

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

// Inserts every active row into `table`; rejects duplicate sites.
ffi::Error index_sites(const ConvGeometry& g, const int32_t* indices,
                       int64_t rows, RowTable* table) {
  const int cols = g.ndim + 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = indices + r * cols;
    if (row[0] < 0) continue;
    const int32_t first = table->insert(static_cast<int32_t>(r));
    if (first >= 0) {
      return invalid("duplicate site " + describe_row(row, g.ndim) +
                     " at indices rows " + std::to_string(first) + " and " +
                     std::to_string(r));
    }
  }
  return ffi::Error::Success();
}

// Submanifold: output rows are the input rows. in_nbr[i, k] is the row at
// the site that row i reaches through offset k; out_nbr is in_nbr with the
// offsets reversed, since the offsets are symmetric about the centre.
ffi::Error build_subm(ffi::ThreadPool& pool, const ConvGeometry& g,
                      const int32_t* indices, int64_t rows, int32_t* out_nbr,
                      int32_t* in_nbr) {
  const int cols = g.ndim + 1;
  const int64_t K = g.kernel_volume();
  RowTable table(g, indices, rows);
  if (auto err = index_sites(g, indices, rows, &table); err.failure()) return err;
  const std::vector<int64_t> offsets = offset_table(g);
  parallel_for_rows(pool, rows, kTileRows, [&](int64_t r) {
    const int32_t* row = indices + r * cols;
    int32_t* in_row = in_nbr + r * K;
    int32_t* out_row = out_nbr + r * K;
    for (int64_t k = 0; k < K; ++k) {
      int32_t j = -1;
      if (row[0] >= 0) {
        const int64_t key = reached_key(g, row, offsets.data() + k * g.ndim);
        if (key >= 0) j = table.find(key);
      }
      in_row[k] = j;
      out_row[K - 1 - k] = j;
    }
  });
  return ffi::Error::Success();
}

// Regular and transposed: output sites are every site some input reaches,
// numbered in sorted (batch, coords) order. Sites past out_capacity are
// counted but not stored. `active`: the rows that hold a site (the rest are
// padding).
ffi::Error build_generative(ffi::ThreadPool& pool, const ConvGeometry& g,
                            const int32_t* indices, int64_t rows, int64_t active,
                            int32_t* out_indices, int64_t out_capacity,
                            int32_t* out_nbr, int32_t* in_nbr,
                            int32_t* needed) {
  const int cols = g.ndim + 1;
  const int64_t K = g.kernel_volume();
  {
    RowTable inputs(g, indices, rows);
    if (auto err = index_sites(g, indices, rows, &inputs); err.failure())
      return err;
  }
  const std::vector<int64_t> offsets = offset_table(g);
  // Calls fn(row, k, key) for every output site reached.
  auto for_reached = [&](int64_t r, auto fn) {
    const int32_t* row = indices + r * cols;
    if (row[0] < 0) return;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t key = reached_key(g, row, offsets.data() + k * g.ndim);
      if (key >= 0) fn(k, key);
    }
  };

  // Distinct output sites, inserted concurrently; a table that gets over a
  // quarter full is rebuilt four times larger (the key set is the same for
  // any interleaving, and ranks come from sorting it). Sized by the active
  // rows, not the capacity, so padding rows cost nothing here.
  int64_t expected = std::max<int64_t>(2 * active, 1);
  std::vector<Slot> slots;
  HashTableView seen;
  while (true) {
    slots.assign(hash_table_size(expected), Slot{kEmptyKey, -1, 0});
    seen = {slots.data(), static_cast<int64_t>(slots.size())};
    std::atomic<int64_t> count{0};
    std::atomic<bool> full{false};
    parallel_for_rows(pool, rows, kTileRows, [&](int64_t r) {
      for_reached(r, [&](int64_t, int64_t key) {
        if (full.load(std::memory_order_relaxed)) return;
        const int result = seen.insert_key_concurrent(key);
        if (result < 0 || (result > 0 && count.fetch_add(1, std::memory_order_relaxed) + 1 > seen.size / 4)) {
          full.store(true, std::memory_order_relaxed);
        }
      });
    });
    if (!full.load()) break;
    expected *= 4;
  }
  std::vector<int64_t> unique_keys;
  for (const Slot& slot : slots) {
    if (slot.key != kEmptyKey) unique_keys.push_back(slot.key);
  }
  std::sort(unique_keys.begin(), unique_keys.end());
  const int64_t count = static_cast<int64_t>(unique_keys.size());
  if (count > INT32_MAX) return invalid("more than 2^31 output sites");
  *needed = static_cast<int32_t>(count);

  const int64_t stored = std::min(count, out_capacity);
  for (int64_t o = 0; o < count; ++o) {
    seen.slots[seen.find_slot(unique_keys[o])].value =
        o < stored ? static_cast<int32_t>(o) : -1;
  }
  for (int64_t o = 0; o < stored; ++o) {
    decode_key(unique_keys[o], g.out_shape, g.ndim, out_indices + o * cols);
  }
  std::fill(out_indices + stored * cols, out_indices + out_capacity * cols, -1);
  std::fill(out_nbr, out_nbr + out_capacity * K, -1);
  std::fill(in_nbr, in_nbr + rows * K, -1);
  // Each (row, k) and each (output, k) is written by exactly one task.
  parallel_for_rows(pool, rows, kTileRows, [&](int64_t r) {
    for_reached(r, [&](int64_t k, int64_t key) {
      const int32_t o = seen.find(key);
      in_nbr[r * K + k] = o;
      if (o >= 0) out_nbr[o * K + k] = static_cast<int32_t>(r);
    });
  });
  return ffi::Error::Success();
}

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
  if (auto err = check_rulebook_buffers(g, indices, *out_indices, *out_nbr,
                                        *in_nbr, *needed, &rows, &out_capacity);
      err.failure())
    return err;
  if (auto err = check_sites(g, indices.typed_data(), rows); err.failure())
    return err;

  int64_t active = 0;
  for (int64_t r = 0; r < rows; ++r) active += indices.typed_data()[r * cols] >= 0;
  if (g.mode == ConvMode::kSubm) {
    std::copy(indices.typed_data(), indices.typed_data() + rows * cols,
              out_indices->typed_data());
    needed->typed_data()[0] = static_cast<int32_t>(active);
    return build_subm(pool, g, indices.typed_data(), rows,
                      out_nbr->typed_data(), in_nbr->typed_data());
  }
  return build_generative(pool, g, indices.typed_data(), rows, active,
                          out_indices->typed_data(), out_capacity,
                          out_nbr->typed_data(), in_nbr->typed_data(),
                          needed->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BuildRulebook, BuildRulebookImpl,
                              signature::build_rulebook(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

}  // namespace jsc
