// The test module _cuda_emulated: the CUDA handlers (rulebook.cu, conv.cu,
// pool.cu) compiled for the host emulator of cuda_emulation.h, under the
// targets of _cuda, so that tests run the CUDA kernels' code on a CPU.
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "jsc/cuda_emulation.h"
#include "jsc/module.h"

namespace jsc::gpu {
JSC_DECLARE_HANDLERS();
}  // namespace jsc::gpu

namespace jsc::emulation {
namespace {

// Kernels with the mistakes the emulator must report, and one without.
void count_odd_threads(int* counts) {
  const int count = __syncthreads_count(threadIdx.x % 2);
  if (threadIdx.x == 0) counts[blockIdx.x] = count;
}

void divergent_barrier(int*) {
  if (threadIdx.x < 32) __syncthreads();
}

void missing_barrier(int* results) {
  __shared__ int value[64];
  value[threadIdx.x] = static_cast<int>(blockIdx.x) + 1;
  // A __syncthreads() belongs here: thread 0 reads what thread 63 writes.
  if (threadIdx.x == 0) results[blockIdx.x] = value[63];
}

void misaligned_wmma(int*) {
  __shared__ __align__(32) __half tile[16 * 24];
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile + 8, 24);  // 16 bytes past a 32-byte boundary
}

// Runs kernel `name` on 3 blocks of 64 threads: (the error message or "",
// the per-block results of count_odd_threads and missing_barrier).
std::pair<std::string, std::vector<int>> self_test(const std::string& name) {
  std::vector<int> counts(3, -1);
  void (*kernel)(int*) = name == "count_odd_threads" ? count_odd_threads
                         : name == "missing_barrier" ? missing_barrier
                         : name == "divergent_barrier" ? divergent_barrier
                         : name == "misaligned_wmma" ? misaligned_wmma
                                                     : nullptr;
  if (kernel == nullptr && name != "oversized_grid") {
    throw std::invalid_argument("self_test: unknown kernel " + name);
  }
  if (kernel == nullptr) {
    run_grid(dim3(1, 1 << 16), dim3(64), [] {});
  } else {
    run_grid(dim3(3), dim3(64), [&] { kernel(counts.data()); });
  }
  const cudaError_t error = cudaGetLastError();
  return {error == cudaSuccess ? "" : cudaGetErrorString(error), counts};
}

}  // namespace
}  // namespace jsc::emulation

NB_MODULE(_cuda_emulated, m) {
  m.doc() = "jax_sparseconv CUDA handlers on a host emulator (for tests)";
  JSC_DEFINE_MODULE_ATTRS(m, jsc::gpu);
  m.def("grids_run", &jsc::emulation::grids_run,
        "The number of emulated kernel launches in this process.");
  m.def("set_reverse_order", &jsc::emulation::set_reverse_order,
        "Test hook: run each block's threads from the last to the first between barriers.");
  m.def("self_test", &jsc::emulation::self_test,
        "Test hook: runs a kernel that is correct (count_odd_threads), races (missing_barrier) "
        "or makes a mistake the emulator reports (divergent_barrier, misaligned_wmma, "
        "oversized_grid); returns (error message or '', per-block results).");
}
