// Rulebook construction on a GPU: the same neighbour maps, output sites (in
// sorted (batch, coords) order) and needed count as rulebook.cc, built with
// the shared index logic of geometry.h and the hash table of hash_table.h.
//   1. Input sites go into a hash table (atomicCAS on 64-bit keys); the
//      smallest row of a site holds it (atomicMin), so results do not depend
//      on thread timing.
//   2. Submanifold: each (row, offset) looks its neighbour up in that table.
//      Regular and transposed: the keys of all reached output sites are
//      sorted (cub radix sort) and made unique; the first out_capacity get
//      ranks in a second hash table, the rest are only counted; then each
//      (row, offset) looks its output up.
// Differences from the CPU handler: nothing is checked that needs the data on
// the host. Rows outside batch_size x spatial_shape and all but the first row
// of a duplicated site are treated as padding instead of raising an error.
#if !defined(JSC_CUDA_EMULATION)  // the emulator brings its own cub
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>
#endif

#include <algorithm>
#include <cstdint>

#include "jsc/checks.h"
#include "jsc/cuda_util.h"
#include "jsc/ffi_util.h"
#include "jsc/geometry.h"
#include "jsc/hash_table.h"
#include "jsc/signatures.h"
#include "xla/ffi/api/ffi.h"

namespace jsc::gpu {
namespace {

using S32 = ffi::Buffer<ffi::S32>;
using S32Result = ffi::ResultBuffer<ffi::S32>;

// Inserts the site of every row inside the grid; the smallest row wins.
__global__ void insert_sites(ConvGeometry g, const int32_t* indices,
                             int64_t rows, HashTableView table) {
  const int64_t r = thread_index();
  if (r >= rows) return;
  const int32_t* row = indices + r * (g.ndim + 1);
  if (!site_in_grid(g, row)) return;
  int64_t slot;
  if (table.insert_key_concurrent(input_key(g, row), &slot) >= 0) {
    // Values start as all ones: the largest unsigned value.
    atomicMin(reinterpret_cast<unsigned*>(&table.slots[slot].value),
              static_cast<unsigned>(r));
  }
}

// active[r]: row r is inside the grid and holds its site. *count (zeroed by
// the caller) gets the number of rows with a non-negative batch index, the
// CPU's count for a submanifold rulebook.
__global__ void mark_active(ConvGeometry g, const int32_t* indices,
                            int64_t rows, HashTableView table, uint8_t* active,
                            int32_t* count) {
  const int64_t r = thread_index();
  bool listed = false;
  if (r < rows) {
    const int32_t* row = indices + r * (g.ndim + 1);
    listed = row[0] >= 0;
    active[r] = site_in_grid(g, row) && table.find(input_key(g, row)) == r;
  }
  const int block_count = __syncthreads_count(listed);
  if (threadIdx.x == 0 && block_count > 0) atomicAdd(count, block_count);
}

// Key of the output site that row r reaches through offset k, or -1.
__device__ int64_t reached(const ConvGeometry& g, const int32_t* indices,
                           const uint8_t* active, int64_t r, int64_t k) {
  if (!active[r]) return -1;
  int64_t offset[kMaxDims];
  unravel_offset(g, k, offset);
  return reached_key(g, indices + r * (g.ndim + 1), offset);
}

// Submanifold maps (both laid out as `layout`): in_nbr[r, k] is the row at
// the site r reaches through k, and out_nbr[r, K - 1 - k] the same (the
// offsets are symmetric).
__global__ void subm_maps(ConvGeometry g, const int32_t* indices, int64_t rows,
                          const uint8_t* active, HashTableView table, MapLayout layout,
                          int32_t* out_nbr, int32_t* in_nbr) {
  const int64_t K = g.kernel_volume();
  const int64_t e = thread_index();
  if (e >= rows * K) return;
  const int64_t r = e / K, k = e % K;
  const int64_t key = reached(g, indices, active, r, k);
  const int32_t j = key >= 0 ? table.find(key) : -1;
  in_nbr[layout.at(r, k)] = j;
  out_nbr[layout.at(r, K - 1 - k)] = j;
}

// keys[e] for e = r * K + k: the output key reached, or `none`.
__global__ void reached_keys(ConvGeometry g, const int32_t* indices,
                             int64_t rows, const uint8_t* active,
                             uint64_t none, uint64_t* keys) {
  const int64_t K = g.kernel_volume();
  const int64_t e = thread_index();
  if (e >= rows * K) return;
  const int64_t key = reached(g, indices, active, e / K, e % K);
  keys[e] = key >= 0 ? static_cast<uint64_t>(key) : none;
}

// From the sorted unique keys (`none` last, if present): needed, and the
// number stored, min(needed, out_capacity).
__global__ void count_outputs(const uint64_t* unique, const int* num_unique,
                              uint64_t none, int64_t out_capacity,
                              int32_t* needed, int32_t* stored) {
  int count = *num_unique;
  if (count > 0 && unique[count - 1] == none) --count;
  *needed = count;
  *stored = count < out_capacity ? count : static_cast<int32_t>(out_capacity);
}

// Output o < stored: its site in out_indices, its rank in the table.
__global__ void store_outputs(ConvGeometry g, const uint64_t* unique,
                              const int32_t* stored, int64_t out_capacity,
                              HashTableView table, int32_t* out_indices) {
  const int64_t o = thread_index();
  if (o >= out_capacity || o >= *stored) return;
  const int64_t key = static_cast<int64_t>(unique[o]);
  decode_key(key, g.out_shape, g.ndim, out_indices + o * (g.ndim + 1));
  int64_t slot = -1;
  // Unique keys in a table of at least 4 x out_capacity slots: always inserted.
  if (table.insert_key_concurrent(key, &slot) > 0) {
    table.slots[slot].value = static_cast<int32_t>(o);
  }
}

// in_nbr[r, k] = output reached (or -1); out_nbr[o, k] = r. Each (o, k) has
// at most one active input row, so every entry has one writer.
__global__ void generative_maps(ConvGeometry g, const int32_t* indices,
                                int64_t rows, const uint8_t* active,
                                HashTableView table, MapLayout out_layout,
                                MapLayout in_layout, int32_t* out_nbr, int32_t* in_nbr) {
  const int64_t K = g.kernel_volume();
  const int64_t e = thread_index();
  if (e >= rows * K) return;
  const int64_t r = e / K, k = e % K;
  const int64_t key = reached(g, indices, active, r, k);
  const int32_t o = key >= 0 ? table.find(key) : -1;
  in_nbr[in_layout.at(r, k)] = o;
  if (o >= 0) out_nbr[out_layout.at(o, k)] = static_cast<int32_t>(r);
}

// An empty hash table for n keys in scratch memory (all bytes 0xff: keys
// kEmptyKey, values -1).
ffi::Error empty_table(Scratch& scratch, cudaStream_t stream,
                       int64_t n, HashTableView* table) {
  table->size = hash_table_size(n);
  if (auto err = allocate(scratch, table->size, &table->slots); err.failure())
    return err;
  return cuda_error(cudaMemsetAsync(table->slots, 0xff, table->size * sizeof(Slot), stream),
                    "build_rulebook");
}

int end_bit(uint64_t max_key) {
  int bits = 1;
  while (bits < 64 && (max_key >> bits) != 0) ++bits;
  return bits;
}

// Regular and transposed rulebooks, after the active rows are marked.
ffi::Error build_generative(cudaStream_t stream, Scratch& scratch,
                            const ConvGeometry& g, const int32_t* indices,
                            int64_t rows, const uint8_t* active,
                            int64_t out_capacity, int32_t* out_indices,
                            bool offsets_leading, int32_t* out_nbr, int32_t* in_nbr,
                            int32_t* needed) {
  const int64_t K = g.kernel_volume();
  const int64_t pairs = rows * K;
  // Keys range below batch_size * prod(out_shape) (at most 2^62), the `none` key.
  uint64_t none = static_cast<uint64_t>(g.batch_size);
  for (int d = 0; d < g.ndim; ++d) none *= static_cast<uint64_t>(g.out_shape[d]);

  uint64_t *keys = nullptr, *sorted = nullptr;
  int* num_unique = nullptr;
  int32_t* stored = nullptr;
  size_t sort_bytes = 0, unique_bytes = 0;
  const int items = static_cast<int>(pairs);
  const int bits = end_bit(none);
  // Each cub call runs twice: first for its temporary storage size only.
  auto sort = [&](void* temp, size_t& bytes) {
    return cuda_error(cub::DeviceRadixSort::SortKeys(temp, bytes, keys, sorted, items, 0,
                                                     bits, stream),
                      "build_rulebook: sort");
  };
  // The unique keys go back into `keys`, which is free once sorted.
  auto unique = [&](void* temp, size_t& bytes) {
    return cuda_error(cub::DeviceSelect::Unique(temp, bytes, sorted, keys, num_unique,
                                                items, stream),
                      "build_rulebook: unique");
  };
  if (auto err = sort(nullptr, sort_bytes); err.failure()) return err;
  if (auto err = unique(nullptr, unique_bytes); err.failure()) return err;
  uint8_t* temp = nullptr;
  HashTableView table;
  if (auto err = allocate(scratch, pairs, &keys); err.failure()) return err;
  if (auto err = allocate(scratch, pairs, &sorted); err.failure()) return err;
  if (auto err = allocate(scratch, 1, &num_unique); err.failure()) return err;
  if (auto err = allocate(scratch, 1, &stored); err.failure()) return err;
  if (auto err = allocate(scratch, std::max(sort_bytes, unique_bytes), &temp); err.failure())
    return err;
  if (auto err = empty_table(scratch, stream, out_capacity, &table); err.failure())
    return err;

  launch(stream, pairs, reached_keys, g, indices, rows, active, none, keys);
  if (auto err = sort(temp, sort_bytes); err.failure()) return err;
  if (auto err = unique(temp, unique_bytes); err.failure()) return err;
  launch_grid(stream, dim3(1), 1, count_outputs, keys, num_unique, none,
              out_capacity, needed, stored);
  launch(stream, out_capacity, store_outputs, g, keys, stored, out_capacity,
         table, out_indices);
  launch(stream, pairs, generative_maps, g, indices, rows, active, table,
         MapLayout::make(offsets_leading, out_capacity, K), MapLayout::make(offsets_leading, rows, K),
         out_nbr, in_nbr);
  return ffi::Error::Success();
}

// OffsetsLeading: out_nbr [K, out_capacity], in_nbr [K, rows] (the _v2
// target), else [out_capacity, K] and [rows, K] (_v1).
template <bool OffsetsLeading>
ffi::Error BuildRulebookImpl(cudaStream_t stream, Scratch scratch,
                             S32 indices, S32Result out_indices,
                             S32Result out_nbr, S32Result in_nbr,
                             S32Result needed, int64_t mode, int64_t batch_size,
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
  int64_t rows, out_capacity;
  if (auto err = check_rulebook_buffers(g, indices, *out_indices, *out_nbr, *in_nbr, *needed,
                                        OffsetsLeading, &rows, &out_capacity);
      err.failure())
    return err;
  const int64_t cols = g.ndim + 1, K = g.kernel_volume();
  if (rows * K > INT32_MAX) {
    return invalid("build_rulebook on a GPU: capacity x kernel volume exceeds 2^31");
  }
  const int32_t* idx = indices.typed_data();
  int32_t* out_idx = out_indices->typed_data();
  int32_t* onbr = out_nbr->typed_data();
  int32_t* inbr = in_nbr->typed_data();
  int32_t* count = needed->typed_data();

  // Every map entry starts as -1 (all bytes 0xff), as do unstored outputs.
  auto fill = [&](int32_t* ptr, int64_t n, int byte) {
    return cuda_error(cudaMemsetAsync(ptr, byte, n * sizeof(int32_t), stream),
                      "build_rulebook");
  };
  for (auto err : {fill(onbr, out_capacity * K, 0xff), fill(inbr, rows * K, 0xff),
                   fill(out_idx, out_capacity * cols, 0xff), fill(count, 1, 0)}) {
    if (err.failure()) return err;
  }

  HashTableView sites;
  uint8_t* active;
  if (auto err = empty_table(scratch, stream, rows, &sites); err.failure()) return err;
  if (auto err = allocate(scratch, rows, &active); err.failure()) return err;
  launch(stream, rows, insert_sites, g, idx, rows, sites);
  launch(stream, rows, mark_active, g, idx, rows, sites, active, count);
  if (g.mode == ConvMode::kSubm) {
    if (auto err = cuda_error(cudaMemcpyAsync(out_idx, idx, rows * cols * sizeof(int32_t),
                                              cudaMemcpyDeviceToDevice, stream),
                              "build_rulebook");
        err.failure())
      return err;
    launch(stream, rows * K, subm_maps, g, idx, rows, active, sites,
           MapLayout::make(OffsetsLeading, rows, K), onbr, inbr);
  } else if (rows * K > 0) {  // without pairs there are no outputs: needed is 0
    if (auto err = build_generative(stream, scratch, g, idx, rows, active,
                                    out_capacity, out_idx, OffsetsLeading, onbr, inbr, count);
        err.failure())
      return err;
  }
  return launch_error("build_rulebook");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BuildRulebookV1, BuildRulebookImpl<false>,
                              signature::build_rulebook(ffi::Ffi::Bind()
                                                        .Ctx<Stream>()
                                                        .Ctx<Scratch>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BuildRulebook, BuildRulebookImpl<true>,
                              signature::build_rulebook(ffi::Ffi::Bind()
                                                        .Ctx<Stream>()
                                                        .Ctx<Scratch>()));

}  // namespace jsc::gpu
