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

// Atomic access to a slot's key from host threads or device threads.
JSC_HOST_DEVICE int64_t atomic_load_key(const int64_t* key) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const volatile int64_t*>(key);
#else
  return __atomic_load_n(key, __ATOMIC_ACQUIRE);
#endif
}

// Compare-and-swap of a slot's key; returns the key found there.
JSC_HOST_DEVICE int64_t atomic_cas_key(int64_t* key, int64_t expected,
                                       int64_t desired) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(atomicCAS(
      reinterpret_cast<unsigned long long*>(key),
      static_cast<unsigned long long>(expected),
      static_cast<unsigned long long>(desired)));
#else
  __atomic_compare_exchange_n(key, &expected, desired, false, __ATOMIC_ACQ_REL,
                              __ATOMIC_ACQUIRE);
  return expected;
#endif
}

struct Slot {
  int64_t key;    // kEmptyKey where free
  int32_t value;
  int32_t unused;
};

struct HashTableView {
  Slot* slots;
  int64_t size;  // a power of two

  // Thread-safe insertion of a key alone (values are set separately): 1 if it
  // was inserted, 0 if it was present, -1 if the table is full; `*where`
  // (if given) receives the key's slot. The final set of keys does not depend
  // on the interleaving of threads (host threads or device threads).
  JSC_HOST_DEVICE int insert_key_concurrent(int64_t key,
                                            int64_t* where = nullptr) {
    const uint64_t mask = static_cast<uint64_t>(size - 1);
    uint64_t slot = home_slot(static_cast<uint64_t>(key)) & mask;
    for (int64_t probes = 0; probes < size;) {
      int64_t current = atomic_load_key(&slots[slot].key);
      if (current == kEmptyKey) {
        current = atomic_cas_key(&slots[slot].key, kEmptyKey, key);
        if (current == kEmptyKey) {
          if (where) *where = static_cast<int64_t>(slot);
          return 1;
        }
      }
      if (current == key) {
        if (where) *where = static_cast<int64_t>(slot);
        return 0;
      }
      slot = (slot + 1) & mask;  // taken by another key: probe on
      ++probes;
    }
    return -1;
  }

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
