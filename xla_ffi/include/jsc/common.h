// Shared definitions for host (C++) and device (CUDA) code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JSC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define JSC_HOST_DEVICE inline
#endif

namespace jsc {

// Spatial dimensions supported by every op.
constexpr int kMaxDims = 4;

}  // namespace jsc
