// Rulebook construction on the CPU: which input row meets which output row
// through which kernel offset, as two neighbour maps (see rulebook.py).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "jsc/ffi_util.h"
#include "jsc/geometry.h"
#include "jsc/hash_table.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {
namespace {

using S32 = ffi::Buffer<ffi::S32>;
using S32Result = ffi::ResultBuffer<ffi::S32>;

// A hash table with its own storage.
struct HashTable {
  std::vector<int64_t> keys;
  std::vector<int32_t> values;
  HashTableView view;

  explicit HashTable(int64_t n)
      : keys(hash_table_size(n), kEmptyKey), values(keys.size(), -1) {
    view = {keys.data(), values.data(), static_cast<int64_t>(keys.size())};
  }
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
    if (row[0] < 0) continue;
    bool ok = row[0] < g.batch_size;
    for (int d = 0; d < g.ndim; ++d) {
      ok = ok && row[d + 1] >= 0 && row[d + 1] < g.in_shape[d];
    }
    if (!ok) {
      return invalid("indices row " + std::to_string(r) + " " +
                     describe_row(row, g.ndim) +
                     " lies outside batch_size x spatial_shape");
    }
  }
  return ffi::Error::Success();
}

int64_t site_key(const ConvGeometry& g, const int32_t* row,
                 const int64_t* shape) {
  int64_t coords[kMaxDims];
  for (int d = 0; d < g.ndim; ++d) coords[d] = row[d + 1];
  return encode_key(row[0], coords, shape, g.ndim);
}

// Inserts every active site into `table` (key -> row); rejects duplicates.
ffi::Error index_sites(const ConvGeometry& g, const int32_t* indices,
                       int64_t rows, HashTable* table) {
  const int cols = g.ndim + 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = indices + r * cols;
    if (row[0] < 0) continue;
    bool inserted;
    const int64_t slot = table->view.insert(site_key(g, row, g.in_shape),
                                            static_cast<int32_t>(r), &inserted);
    if (!inserted) {
      return invalid("duplicate site " + describe_row(row, g.ndim) +
                     " at indices rows " +
                     std::to_string(table->values[slot]) + " and " +
                     std::to_string(r));
    }
  }
  return ffi::Error::Success();
}

// Submanifold: output rows are the input rows. in_nbr[i, k] is the row at
// the site that row i reaches through offset k; out_nbr is in_nbr with the
// offsets reversed, since the offsets are symmetric about the centre.
ffi::Error build_subm(const ConvGeometry& g, const int32_t* indices,
                      int64_t rows, int32_t* out_nbr, int32_t* in_nbr) {
  const int cols = g.ndim + 1;
  const int64_t K = g.kernel_volume();
  HashTable table(rows);
  if (auto err = index_sites(g, indices, rows, &table); err.failure())
    return err;
  std::fill(in_nbr, in_nbr + rows * K, -1);
  std::fill(out_nbr, out_nbr + rows * K, -1);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = indices + r * cols;
    if (row[0] < 0) continue;
    int64_t site[kMaxDims];
    for (int64_t k = 0; k < K; ++k) {
      if (!output_site(g, row + 1, k, site)) continue;
      const int32_t j = table.view.find(encode_key(row[0], site, g.out_shape,
                                                   g.ndim));
      in_nbr[r * K + k] = j;
      out_nbr[r * K + (K - 1 - k)] = j;
    }
  }
  return ffi::Error::Success();
}

// Regular and transposed: output sites are every site some input reaches,
// numbered in sorted (batch, coords) order. Sites past out_capacity are
// counted but not stored.
ffi::Error build_generative(const ConvGeometry& g, const int32_t* indices,
                            int64_t rows, int32_t* out_indices,
                            int64_t out_capacity, int32_t* out_nbr,
                            int32_t* in_nbr, int32_t* needed) {
  const int cols = g.ndim + 1;
  const int64_t K = g.kernel_volume();
  {
    HashTable inputs(rows);
    if (auto err = index_sites(g, indices, rows, &inputs); err.failure())
      return err;
  }
  std::vector<int64_t> reached(rows * K, kEmptyKey);
  std::vector<int64_t> unique_keys;
  {
    // Distinct output sites are bounded by the reached pairs and the grid.
    int64_t grid = g.batch_size;
    for (int d = 0; d < g.ndim && grid < rows * K; ++d) grid *= g.out_shape[d];
    HashTable seen(std::min(rows * K, grid));
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t* row = indices + r * cols;
      if (row[0] < 0) continue;
      int64_t site[kMaxDims];
      for (int64_t k = 0; k < K; ++k) {
        if (!output_site(g, row + 1, k, site)) continue;
        const int64_t key = encode_key(row[0], site, g.out_shape, g.ndim);
        reached[r * K + k] = key;
        bool inserted;
        seen.view.insert(key, 0, &inserted);
        if (inserted) unique_keys.push_back(key);
      }
    }
  }
  std::sort(unique_keys.begin(), unique_keys.end());
  const int64_t count = static_cast<int64_t>(unique_keys.size());
  if (count > INT32_MAX) return invalid("more than 2^31 output sites");
  *needed = static_cast<int32_t>(count);

  const int64_t stored = std::min(count, out_capacity);
  HashTable rank(stored);
  for (int64_t o = 0; o < stored; ++o) {
    bool inserted;
    rank.view.insert(unique_keys[o], static_cast<int32_t>(o), &inserted);
    decode_key(unique_keys[o], g.out_shape, g.ndim, out_indices + o * cols);
  }
  std::fill(out_indices + stored * cols, out_indices + out_capacity * cols, -1);
  std::fill(out_nbr, out_nbr + out_capacity * K, -1);
  for (int64_t i = 0; i < rows * K; ++i) {
    const int32_t o = reached[i] == kEmptyKey ? -1 : rank.view.find(reached[i]);
    in_nbr[i] = o;
    if (o >= 0) out_nbr[o * K + i % K] = static_cast<int32_t>(i / K);
  }
  return ffi::Error::Success();
}

ffi::Error BuildRulebookImpl(S32 indices, S32Result out_indices,
                             S32Result out_nbr, S32Result in_nbr,
                             S32Result needed, int64_t mode,
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
  const int64_t K = g.kernel_volume();
  const int64_t rows = indices.dimensions().size() == 2
                           ? indices.dimensions()[0]
                           : -1;
  if (auto err = check_matrix(indices, "indices", -1, cols); err.failure())
    return err;
  const int64_t out_capacity =
      out_nbr->dimensions().size() == 2 ? out_nbr->dimensions()[0] : -1;
  if (auto err = check_matrix(*out_nbr, "out_nbr", -1, K); err.failure())
    return err;
  if (auto err = check_matrix(*out_indices, "out_indices", out_capacity, cols);
      err.failure())
    return err;
  if (auto err = check_matrix(*in_nbr, "in_nbr", rows, K); err.failure())
    return err;
  if (needed->element_count() != 1) return invalid("needed must be a scalar");
  if (g.mode == ConvMode::kSubm && out_capacity != rows) {
    return invalid("a submanifold rulebook has out_capacity == capacity");
  }
  if (auto err = check_sites(g, indices.typed_data(), rows); err.failure())
    return err;

  if (g.mode == ConvMode::kSubm) {
    std::copy(indices.typed_data(), indices.typed_data() + rows * cols,
              out_indices->typed_data());
    int64_t active = 0;
    for (int64_t r = 0; r < rows; ++r) active += indices.typed_data()[r * cols] >= 0;
    needed->typed_data()[0] = static_cast<int32_t>(active);
    return build_subm(g, indices.typed_data(), rows, out_nbr->typed_data(),
                      in_nbr->typed_data());
  }
  return build_generative(g, indices.typed_data(), rows,
                          out_indices->typed_data(), out_capacity,
                          out_nbr->typed_data(), in_nbr->typed_data(),
                          needed->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BuildRulebook, BuildRulebookImpl,
                              ffi::Ffi::Bind()
                                  .Arg<S32>()     // indices [rows, ndim + 1]
                                  .Ret<S32>()     // out_indices
                                  .Ret<S32>()     // out_nbr [out_capacity, K]
                                  .Ret<S32>()     // in_nbr [rows, K]
                                  .Ret<S32>()     // needed []
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("batch_size")
                                  .Attr<ffi::Span<const int64_t>>("in_shape")
                                  .Attr<ffi::Span<const int64_t>>("out_shape")
                                  .Attr<ffi::Span<const int64_t>>("kernel_size")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<ffi::Span<const int64_t>>("dilation"));

}  // namespace jsc
