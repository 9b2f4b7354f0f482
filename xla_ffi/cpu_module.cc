// The CPU extension module: hands the XLA FFI handlers to Python as capsules
// (registered by jax_sparseconv/backends/ffi.py) and reports how it was built.
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <thread>
#include <vector>

#include "jsc/hash_table.h"
#include "jsc/module.h"

namespace jsc {
JSC_DECLARE_HANDLERS();

// A test hook for the host-device hash table of the CUDA rulebook: inserts
// `keys` (>= 0) from two host threads with the concurrent insert, gives each
// key the index of its first occurrence, then looks up `queries` (-1: absent).
std::vector<int32_t> hash_table_lookup(const std::vector<int64_t>& keys,
                                       const std::vector<int64_t>& queries) {
  for (const int64_t key : keys) {
    if (key < 0) throw std::invalid_argument("hash_table_lookup: keys must be >= 0");
  }
  const int64_t n = static_cast<int64_t>(keys.size());
  std::vector<Slot> slots(hash_table_size(n), Slot{kEmptyKey, -1, 0});
  HashTableView table{slots.data(), static_cast<int64_t>(slots.size())};
  std::vector<int64_t> where(n);
  auto insert_every_other = [&](int64_t first) {
    for (int64_t i = first; i < n; i += 2) table.insert_key_concurrent(keys[i], &where[i]);
  };
  std::thread helper(insert_every_other, 1);
  insert_every_other(0);
  helper.join();
  for (int64_t i = 0; i < n; ++i) {
    if (slots[where[i]].value < 0) slots[where[i]].value = static_cast<int32_t>(i);
  }
  std::vector<int32_t> found;
  for (const int64_t query : queries) found.push_back(query < 0 ? -1 : table.find(query));
  return found;
}
}  // namespace jsc

NB_MODULE(_cpu, m) {
  m.doc() = "jax_sparseconv CPU kernels (XLA FFI handlers)";
  JSC_DEFINE_MODULE_ATTRS(m, jsc);
  m.def("hash_table_lookup", &jsc::hash_table_lookup,
        "Test hook: the CUDA rulebook's hash table (hash_table.h) run on the host.");
}
