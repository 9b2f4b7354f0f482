// Element types of the feature kernels: storage type T, accumulation type
// Acc (float for half types and float32, double for float64), conversions.
#pragma once

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace jsc {

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float to_float(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float to_float(f16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1f, mant = v.bits & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (mant << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((mant & 0x400) == 0) { mant <<= 1; --exp; }
    bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

template <typename T> struct Accum { using type = float; };
template <> struct Accum<double> { using type = double; };

template <typename T> struct FfiType;
template <> struct FfiType<float> { static constexpr auto value = xla::ffi::F32; };
template <> struct FfiType<double> { static constexpr auto value = xla::ffi::F64; };
template <> struct FfiType<bf16> { static constexpr auto value = xla::ffi::BF16; };
template <> struct FfiType<f16> { static constexpr auto value = xla::ffi::F16; };

// Calls fn(T{}) with the storage type of `type`; false for other types.
template <typename Fn>
bool dispatch_float(xla::ffi::DataType type, Fn&& fn) {
  switch (type) {
    case xla::ffi::F32: fn(float{}); return true;
    case xla::ffi::F64: fn(double{}); return true;
    case xla::ffi::BF16: fn(bf16{}); return true;
    case xla::ffi::F16: fn(f16{}); return true;
    default: return false;
  }
}

}  // namespace jsc
