// Element types of the feature kernels: storage type T, accumulation type
// Acc (float for half types and float32, double for float64), conversions.
#pragma once

#include <cstdint>
#include <cstring>

#include <string>

#include "jsc/ffi_util.h"
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

// Calls fn(T{}) with the storage type T of the input dtype, after checking
// that the output dtype is T's accumulation type. Other dtypes are an error.
template <typename Fn>
xla::ffi::Error dispatch_float(xla::ffi::DataType input, xla::ffi::DataType output,
                               const char* what, Fn&& fn) {
  auto run = [&](auto tag) {
    if (output != FfiType<typename Accum<decltype(tag)>::type>::value) {
      return invalid(std::string(what) + ": the output must have the accumulation dtype");
    }
    fn(tag);
    return xla::ffi::Error::Success();
  };
  switch (input) {
    case xla::ffi::F32: return run(float{});
    case xla::ffi::F64: return run(double{});
    case xla::ffi::BF16: return run(bf16{});
    case xla::ffi::F16: return run(f16{});
    default: return invalid(std::string(what) + ": unsupported dtype");
  }
}

}  // namespace jsc
