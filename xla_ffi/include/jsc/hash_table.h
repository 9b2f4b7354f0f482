// Open-addressing hash map from non-negative 64-bit keys to int32 values,
// with linear probing; a key and its value share one 16-byte slot. Storage
// is owned by the caller so that the same code serves host and device.
#pragma once

#include <cstdint>

#include "jsc/common.h"

namespace jsc {

constexpr int64_t kEmptyKey = -1;

// Home slot of a key: runs of 8 consecutive keys (neighbours along the last
// spatial dim) share a hashed group of 8 slots, so the look-ups of a site's
// neighbours touch few cache lines; the groups are spread over the table by
// the splitmix64 finaliser.
JSC_HOST_DEVICE uint64_t home_slot(uint64_t key) {
  uint64_t x = key >> 3;
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return (x << 3) | (key & 7);
}

// Smallest power of two >= 4 * n (load factor at most a quarter: misses,
// the common case of neighbour look-ups, stop after few probes), at least 16.
inline int64_t hash_table_size(int64_t n) {
  int64_t size = 16;
  while (size < 4 * n) size *= 2;
  return size;
}

struct Slot {
  int64_t key;    // kEmptyKey where free
  int32_t value;
  int32_t unused;
};

struct HashTableView {
  Slot* slots;
  int64_t size;  // a power of two

#if !defined(__CUDACC__)
  // Thread-safe insertion of a key alone (values are set later): 1 if it
  // was inserted, 0 if it was present, -1 if the table is full. The final set
  // of keys does not depend on the interleaving of threads.
  int insert_key_concurrent(int64_t key) {
    const uint64_t mask = static_cast<uint64_t>(size - 1);
    uint64_t slot = home_slot(static_cast<uint64_t>(key)) & mask;
    for (int64_t probes = 0; probes < size;) {
      int64_t current = __atomic_load_n(&slots[slot].key, __ATOMIC_ACQUIRE);
      if (current == kEmptyKey &&
          __atomic_compare_exchange_n(&slots[slot].key, &current, key, false,
                                      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        return 1;
      }
      if (current == key) return 0;
      if (current != kEmptyKey) {  // taken by another key: probe on
        slot = (slot + 1) & mask;
        ++probes;
      }
    }
    return -1;
  }
#endif

  // The slot holding key, or -1.
  JSC_HOST_DEVICE int64_t find_slot(int64_t key) const {
    const uint64_t mask = static_cast<uint64_t>(size - 1);
    uint64_t slot = home_slot(static_cast<uint64_t>(key)) & mask;
    while (true) {
      if (slots[slot].key == key) return static_cast<int64_t>(slot);
      if (slots[slot].key == kEmptyKey) return -1;
      slot = (slot + 1) & mask;
    }
  }

  // The value stored for key, or -1.
  JSC_HOST_DEVICE int32_t find(int64_t key) const {
    const int64_t slot = find_slot(key);
    return slot < 0 ? -1 : slots[slot].value;
  }
};

}  // namespace jsc
