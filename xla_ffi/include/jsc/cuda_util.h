// Helpers of the CUDA handlers: device element types, kernel launches, and
// scratch memory from XLA's allocator. With JSC_CUDA_EMULATION defined, the
// same handlers compile for the host emulator of cuda_emulation.h instead.
#pragma once

#if defined(JSC_CUDA_EMULATION)
#include "jsc/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <string>
#include <utility>

#include "jsc/dtype.h"
#include "jsc/ffi_util.h"
#include "xla/ffi/api/ffi.h"

namespace jsc::gpu {

// The handlers' context arguments: the stream of the call (a cudaStream_t)
// and XLA's scratch allocator.
#if defined(JSC_CUDA_EMULATION)
using Stream = emulation::NoStream;
using Scratch = emulation::HostScratch;
#else
using Stream = ffi::PlatformStream<cudaStream_t>;
using Scratch = ffi::ScratchAllocator;
#endif

// The device type of a storage tag of dispatch_float (same bits).
template <typename T> struct DeviceType { using type = T; };
template <> struct DeviceType<bf16> { using type = __nv_bfloat16; };
template <> struct DeviceType<f16> { using type = __half; };
template <typename T> using device_t = typename DeviceType<T>::type;

__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

// Neighbour-map entry s as a row of a table with `rows` rows, or -1: entries
// outside [-1, rows) are treated as -1 (the CPU handlers reject them, which on
// the GPU would need a synchronisation).
__device__ __forceinline__ int32_t safe_row(int32_t s, int64_t rows) {
  return s >= 0 && s < rows ? s : -1;
}

// kernel<<<grid, threads, 0, stream>>>(args...), or its run on the emulator.
template <typename... Params, typename... Args>
void launch_grid(cudaStream_t stream, dim3 grid, int threads,
                 void (*kernel)(Params...), Args&&... args) {
#if defined(JSC_CUDA_EMULATION)
  (void)stream;
  emulation::run_grid(grid, dim3(threads), [&] { kernel(args...); });
#else
  kernel<<<grid, threads, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

constexpr int kThreads = 256;  // threads per block of the element-wise kernels

// The kernel on ceil(n / kThreads) blocks of kThreads threads; nothing for
// n <= 0. The kernel handles index blockIdx.x * kThreads + threadIdx.x < n.
template <typename... Params, typename... Args>
void launch(cudaStream_t stream, int64_t n, void (*kernel)(Params...),
            Args&&... args) {
  if (n <= 0) return;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  launch_grid(stream, dim3(static_cast<unsigned>(blocks)), kThreads, kernel,
              std::forward<Args>(args)...);
}

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// An ffi::Error for a failed CUDA call or launch, or Success.
inline ffi::Error cuda_error(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_sparseconv: ") + what + ": " +
                              cudaGetErrorString(status));
}

// The error of the launches issued so far by this host thread.
inline ffi::Error launch_error(const char* what) {
  return cuda_error(cudaGetLastError(), what);
}

// Device scratch memory of `count` elements of T from XLA's allocator; it
// stays valid for the work the handler enqueues on its stream.
template <typename T>
ffi::Error allocate(Scratch& scratch, int64_t count, T** out) {
  const size_t bytes = static_cast<size_t>(count > 0 ? count : 1) * sizeof(T);
  auto memory = scratch.Allocate(bytes, 256);
  if (!memory.has_value()) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "jax_sparseconv: cannot allocate " + std::to_string(bytes) +
                          " bytes of device scratch memory");
  }
  *out = static_cast<T*>(*memory);
  return ffi::Error::Success();
}

}  // namespace jsc::gpu
