// A host emulator of the CUDA features that rulebook.cu, conv.cu and pool.cu
// use, so that the same sources compile with the host compiler (with
// JSC_CUDA_EMULATION defined) into the test module _cuda_emulated, and the
// CUDA kernels' logic is tested on machines without a GPU.
//
// A grid runs one block after another. The threads of a block are fibers of
// the calling OS thread (ucontext), switched only at __syncthreads*, so
// __shared__ variables are thread_local statics and atomics need no
// hardware. What a GPU would get wrong silently is an error here (reported
// by cudaGetLastError): a block whose threads do not all reach a barrier,
// grids or blocks beyond the CUDA limits, wmma pointers or leading
// dimensions that break the alignment rules.
//
// Races between barriers show up as results that change when the threads run
// in the reverse order (set_reverse_order); scratch memory comes filled with
// garbage. Not emulated: true concurrency, warp-level execution, memory
// spaces (every pointer is a host pointer), timing.
#pragma once

#if !defined(JSC_CUDA_EMULATION)
#error "cuda_emulation.h is for the host build of the CUDA handlers only"
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "jsc/dtype.h"
#include "xla/ffi/api/ffi.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))

// ---- runtime types and calls ------------------------------------------------

using cudaStream_t = struct CUstream_st*;

enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 719 };
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// The error of the grids run so far on this OS thread (cleared on reading),
// and its message.
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);

inline cudaError_t cudaMemsetAsync(void* ptr, int byte, size_t bytes, cudaStream_t) {
  std::memset(ptr, byte, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

namespace jsc::emulation {

// Runs `thread` (the kernel call with its arguments) for every thread of
// every block of the grid; a no-op after an error on this OS thread.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& thread);

// Records an error (the first one sticks) and ends the grid being run.
[[noreturn]] void fail(const std::string& message);

// Barrier of the current block: waits for all its threads and returns the
// number of them that passed a non-zero predicate.
int barrier(int predicate, bool counting);

// Grids run by this process (a test hook: proves the emulated handlers ran).
int64_t grids_run();

// Between barriers, run a block's threads from the last to the first (true)
// or from the first (false, the default). Kernels without races on shared or
// global memory give the same results either way.
void set_reverse_order(bool reverse);

// The stream of the emulated handlers: none (work runs when launched).
struct NoStream {};

// Scratch memory owned by the handler call, freed when it returns (the
// emulated kernels have finished by then).
class HostScratch {
 public:
  std::optional<void*> Allocate(size_t bytes, size_t alignment);

 private:
  std::vector<std::unique_ptr<std::byte[]>> blocks_;
};

}  // namespace jsc::emulation

template <>
struct xla::ffi::CtxDecoding<jsc::emulation::NoStream> {
  using Type = cudaStream_t;
  static std::optional<Type> Decode(const XLA_FFI_Api*, XLA_FFI_ExecutionContext*,
                                    DiagnosticEngine&) {
    return cudaStream_t{nullptr};
  }
};

template <>
struct xla::ffi::CtxDecoding<jsc::emulation::HostScratch> {
  using Type = jsc::emulation::HostScratch;
  static std::optional<Type> Decode(const XLA_FFI_Api*, XLA_FFI_ExecutionContext*,
                                    DiagnosticEngine&) {
    return Type{};
  }
};

// ---- device functions -------------------------------------------------------

inline void __syncthreads() { jsc::emulation::barrier(0, false); }
inline int __syncthreads_or(int predicate) { return jsc::emulation::barrier(predicate, false) > 0; }
inline int __syncthreads_count(int predicate) { return jsc::emulation::barrier(predicate, true); }

// Threads of a block never run at the same time, and blocks run one after
// another: plain read-modify-writes are atomic.
inline unsigned atomicMin(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = std::min(old, value);
  return old;
}

inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

// ---- half types (the bits of cuda_bf16.h's and cuda_fp16.h's types) --------

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float v) {  // round to nearest even, as __float2bfloat16
    uint32_t u;
    std::memcpy(&u, &v, 4);
    bits = (u & 0x7fffffff) > 0x7f800000 ? static_cast<uint16_t>((u >> 16) | 0x40)  // quiet NaN
                                         : static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
};

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float v) {  // round to nearest even, as __float2half
    const _Float16 h = static_cast<_Float16>(v);
    std::memcpy(&bits, &h, 2);
  }
};

inline float __bfloat162float(__nv_bfloat16 v) { return jsc::to_float(jsc::bf16{v.bits}); }
inline float __half2float(__half v) { return jsc::to_float(jsc::f16{v.bits}); }

// ---- wmma (mma.h): fragments hold whole matrices ----------------------------
//
// A warp's fragment is kept by its lane 0 alone, which does the warp's loads,
// products and stores; the other lanes' fragments are never read (element-wise
// updates of x, the same on every lane, stay right). Elements are kept as
// float (half values convert exactly).

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};  // float32 in memory, 10-bit mantissas in the products
}  // namespace precision

namespace detail {

template <typename T> struct Storage { using type = T; };
template <> struct Storage<precision::tf32> { using type = float; };

inline bool warp_leader() { return threadIdx.x % 32 == 0; }

// The alignment rules of load_matrix_sync and store_matrix_sync.
template <typename T>
void check_tile_pointer(const T* ptr, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
    jsc::emulation::fail(std::string("wmma::") + what + ": pointer not 256-bit aligned");
  }
  if (ldm * sizeof(T) % 16 != 0) {
    jsc::emulation::fail(std::string("wmma::") + what + ": ldm not a multiple of 16 bytes");
  }
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace detail

// Element (i, j) of the fragment's matrix is x[i * cols + j].
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

// Round to nearest, ties away from zero, to 10 mantissa bits (cvt.rna.tf32.f32).
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000) != 0x7f800000) u = (u + 0x1000) & 0xffffe000;
  std::memcpy(&v, &u, 4);
  return v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const typename detail::Storage<T>::type& value) {
  if (!detail::warp_leader()) return;
  std::fill(std::begin(f.x), std::end(f.x), detail::to_float(value));
}

// Element (i, j) from ptr[i * ldm + j] (row major) or ptr[i + j * ldm].
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const typename detail::Storage<T>::type* ptr,
                      unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators load with a layout_t");
  if (!detail::warp_leader()) return;
  detail::check_tile_pointer(ptr, ldm, "load_matrix_sync");
  constexpr bool by_rows = std::is_same_v<Layout, row_major>;
  for (int i = 0; i < f.rows; ++i) {
    for (int j = 0; j < f.cols; ++j) {
      f.x[i * f.cols + j] = detail::to_float(by_rows ? ptr[i * ldm + j] : ptr[i + j * ldm]);
    }
  }
}

// The products of tf32 fragments use the values as they are: the caller
// rounds them with __float_to_tf32 (as CUDA requires).
template <int M, int N, int K, typename Tc, typename Ta, typename La, typename Tb, typename Lb>
void mma_sync(fragment<accumulator, M, N, K, Tc>& d, const fragment<matrix_a, M, N, K, Ta, La>& a,
              const fragment<matrix_b, M, N, K, Tb, Lb>& b,
              const fragment<accumulator, M, N, K, Tc>& c) {
  if (!detail::warp_leader()) return;
  fragment<accumulator, M, N, K, Tc> sum;
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      sum.x[i * N + j] = s;
    }
  }
  d = sum;
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
  if (!detail::warp_leader()) return;
  detail::check_tile_pointer(ptr, ldm, "store_matrix_sync");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      (layout == mem_row_major ? ptr[i * ldm + j] : ptr[i + j * ldm]) = f.x[i * N + j];
}

}  // namespace nvcuda::wmma

// ---- cub: the device-wide algorithms of rulebook.cu and conv.cu -------------
//
// Same calling protocol: a call without temporary storage only sets its size.

namespace cub {

struct DeviceRadixSort {
  // Sort by bits [begin_bit, end_bit) of the keys only, stably, as cub does.
  template <typename Key>
  static cudaError_t SortKeys(void* temp, size_t& temp_bytes, const Key* in, Key* out,
                              int num_items, int begin_bit, int end_bit, cudaStream_t) {
    return SortPairs<Key, char>(temp, temp_bytes, in, out, nullptr, nullptr, num_items,
                                begin_bit, end_bit, nullptr);
  }

  template <typename Key, typename Value>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const Key* keys_in,
                               Key* keys_out, const Value* values_in, Value* values_out,
                               int num_items, int begin_bit, int end_bit, cudaStream_t) {
    if (temp == nullptr) {
      temp_bytes = 1;
      return cudaSuccess;
    }
    const int width = end_bit - begin_bit;
    const Key mask = width >= 64 ? ~Key{0} : (Key{1} << width) - 1;
    std::vector<int> order(num_items);
    for (int i = 0; i < num_items; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return ((keys_in[a] >> begin_bit) & mask) < ((keys_in[b] >> begin_bit) & mask);
    });
    for (int i = 0; i < num_items; ++i) {
      keys_out[i] = keys_in[order[i]];
      if (values_out) values_out[i] = values_in[order[i]];
    }
    return cudaSuccess;
  }
};

struct DeviceSelect {
  // The first item of every run of equal items, and their number.
  template <typename T, typename Count>
  static cudaError_t Unique(void* temp, size_t& temp_bytes, const T* in, T* out,
                            Count* num_selected, int num_items, cudaStream_t) {
    if (temp == nullptr) {
      temp_bytes = 1;
      return cudaSuccess;
    }
    *num_selected = static_cast<Count>(std::unique_copy(in, in + num_items, out) - out);
    return cudaSuccess;
  }
};

}  // namespace cub
