// Open-addressing hash map from non-negative 64-bit keys to int32 values,
// with linear probing. Storage is owned by the caller so that the same code
// runs on the host and (with atomics added by the caller) on a device.
#pragma once

#include <cstdint>

#include "jsc/common.h"

namespace jsc {

constexpr int64_t kEmptyKey = -1;

JSC_HOST_DEVICE uint64_t mix_key(uint64_t x) {
  // splitmix64 finaliser: spreads clustered voxel keys over the table.
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Smallest power of two >= 2 * n (load factor at most one half), at least 16.
inline int64_t hash_table_size(int64_t n) {
  int64_t size = 16;
  while (size < 2 * n) size *= 2;
  return size;
}

struct HashTableView {
  int64_t* keys;    // [size], kEmptyKey where free
  int32_t* values;  // [size]
  int64_t size;     // a power of two

  // Inserts key -> value unless the key is present; returns the slot.
  // `inserted` tells which happened. The table must never be full.
  JSC_HOST_DEVICE int64_t insert(int64_t key, int32_t value, bool* inserted) {
    const uint64_t mask = static_cast<uint64_t>(size - 1);
    uint64_t slot = mix_key(static_cast<uint64_t>(key)) & mask;
    while (true) {
      if (keys[slot] == key) {
        *inserted = false;
        return static_cast<int64_t>(slot);
      }
      if (keys[slot] == kEmptyKey) {
        keys[slot] = key;
        values[slot] = value;
        *inserted = true;
        return static_cast<int64_t>(slot);
      }
      slot = (slot + 1) & mask;
    }
  }

  // The value stored for key, or -1.
  JSC_HOST_DEVICE int32_t find(int64_t key) const {
    const uint64_t mask = static_cast<uint64_t>(size - 1);
    uint64_t slot = mix_key(static_cast<uint64_t>(key)) & mask;
    while (true) {
      if (keys[slot] == key) return values[slot];
      if (keys[slot] == kEmptyKey) return -1;
      slot = (slot + 1) & mask;
    }
  }
};

}  // namespace jsc
