// Convolution kernels on the CPU: gather rows along a neighbour map, multiply
// by the kernel slice of each offset, accumulate (see rulebook.py).
//   GatherMatmul:     out[r] = sum_k x[nbr[k, r]] @ w[k]   (forward, input grad)
//   GatherMatmulGrad: dw[k] = sum_r x[nbr[k, r]]^T g[r]    (kernel grad)
// with offset-leading maps nbr [K, M]; the V1 handlers take them [M, K].
// Work is proportional to the valid pairs; -1 entries cost one comparison.
// Every entry is checked while a tile's pairs are collected, before any row
// is gathered.
// Each output element is produced by one task in a fixed order: results do
// not depend on the number of threads.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include "jsc/checks.h"
#include "jsc/dtype.h"
#include "jsc/ffi_util.h"
#include "jsc/gather.h"
#include "jsc/parallel.h"
#include "jsc/signatures.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {
namespace {

// SIMD vectors of the widest registers the build targets, through GCC's
// vector extensions; loads and stores go through the reduced-alignment
// typedef, so rows need no alignment.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;  // 32 zmm registers
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;  // 16 ymm registers
#else
constexpr int kVectorBytes = 16;  // 16 xmm registers (SSE2); NEON has 32
#endif
// Register blocks: rows x 2 vectors of accumulators, plus 2 vectors of
// weights (or gradients) and a broadcast, must fit the register file (19 of
// 32, 15 of 16). A larger block spills its accumulators: the AVX-512 sizes on
// an AVX2 machine ran about 20x slower (issue 19's note).
constexpr int kMaxBlockRows = kVectorBytes == 64 ? 8 : 6;  // forward: output rows per block
constexpr int kOuterRows = kMaxBlockRows;  // kernel gradient: input channels per block

template <typename Acc> struct Simd;
template <> struct Simd<float> {
  typedef float type __attribute__((vector_size(kVectorBytes), aligned(4)));
};
template <> struct Simd<double> {
  typedef double type __attribute__((vector_size(kVectorBytes), aligned(8)));
};
template <typename Acc> using Vec = typename Simd<Acc>::type;
template <typename Acc> constexpr int kLanes = kVectorBytes / sizeof(Acc);

// Kernel gradient: partial sums of at most about kPartialBytes in all, in
// kMinChunks to kMaxChunks chunks; the final sum in blocks of elements.
constexpr int64_t kPartialBytes = int64_t{32} << 20;
constexpr int64_t kMinChunks = 4, kMaxChunks = 32;
constexpr int64_t kReduceBlock = 4096;

// out_rows[q][c0 : c0 + NV * lanes] += a[q][:] @ w[:, c0 : c0 + NV * lanes]
// for q < R; rows a[q] of cin entries, w [cin, cout]. R x NV vector
// accumulators.
template <typename Acc, int R, int NV>
void block_kernel(const Acc* const* a, int64_t cin, const Acc* w, int64_t cout,
                  int64_t c0, Acc* const* out_rows) {
  using V = Vec<Acc>;
  constexpr int L = kLanes<Acc>;
  V acc[R][NV] = {};
  for (int64_t ci = 0; ci < cin; ++ci) {
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = *reinterpret_cast<const V*>(w + ci * cout + c0 + v * L);
#pragma GCC unroll 8
    for (int q = 0; q < R; ++q) {
      const Acc av = a[q][ci];
      for (int v = 0; v < NV; ++v) acc[q][v] += av * wv[v];
    }
  }
  for (int q = 0; q < R; ++q) {
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(out_rows[q] + c0 + v * L) += acc[q][v];
  }
}

template <typename Acc, int R>
void rows_kernel(const Acc* const* a, int64_t cin, const Acc* w, int64_t cout,
                 Acc* const* out_rows) {
  constexpr int64_t L = kLanes<Acc>;
  int64_t c0 = 0;
  for (; c0 + 2 * L <= cout; c0 += 2 * L) block_kernel<Acc, R, 2>(a, cin, w, cout, c0, out_rows);
  if (c0 + L <= cout) {
    block_kernel<Acc, R, 1>(a, cin, w, cout, c0, out_rows);
    c0 += L;
  }
  for (int q = 0; q < R; ++q) {  // remaining columns
    for (int64_t ci = 0; ci < cin; ++ci) {
      const Acc av = a[q][ci];
      for (int64_t c = c0; c < cout; ++c) out_rows[q][c] += av * w[ci * cout + c];
    }
  }
}

// rows_kernel<Acc, r> at index r - 1, for r = 1 ... kMaxBlockRows.
template <typename Acc, size_t... I>
constexpr auto row_kernels(std::index_sequence<I...>) {
  using Kernel = void (*)(const Acc* const*, int64_t, const Acc*, int64_t, Acc* const*);
  return std::array<Kernel, sizeof...(I)>{rows_kernel<Acc, int(I) + 1>...};
}

// acc[pos[j], :] += a[j][:] @ w for j < m; rows a[j] of cin entries,
// w [cin, cout].
template <typename Acc>
void accumulate_rows(const Acc* const* a, int64_t m, const Acc* w, int64_t cin,
                     int64_t cout, const int32_t* pos, Acc* acc) {
  static constexpr auto kernels = row_kernels<Acc>(std::make_index_sequence<kMaxBlockRows>());
  Acc* rows[kMaxBlockRows];
  for (int64_t j = 0; j < m; j += kMaxBlockRows) {
    const int64_t r = std::min<int64_t>(kMaxBlockRows, m - j);
    for (int64_t q = 0; q < r; ++q) rows[q] = acc + static_cast<int64_t>(pos[j + q]) * cout;
    kernels[r - 1](a + j, cin, w, cout, rows);
  }
}

// Returns false when a neighbour entry lies outside [-1, n) (x has n rows):
// that tile gathers nothing.
template <typename T>
bool gather_matmul(ffi::ThreadPool& pool, const T* x, int64_t n, int64_t cin,
                   const T* w_in, int64_t K, int64_t cout, const int32_t* nbr,
                   MapLayout layout, int64_t rows, typename Accum<T>::type* out) {
  using Acc = typename Accum<T>::type;
  std::vector<Acc> w(K * cin * cout);
  for (size_t e = 0; e < w.size(); ++e) w[e] = static_cast<Acc>(to_float(w_in[e]));
  const int64_t tile_rows = tile_rows_for(K);
  std::atomic<bool> valid{true};
  parallel_for(pool, (rows + tile_rows - 1) / tile_rows, [&](int64_t tile) {
    thread_local TilePairs pairs;
    thread_local RowGather<T, Acc> x_rows;
    const int64_t begin = tile * tile_rows;
    const int64_t end = std::min(rows, begin + tile_rows);
    Acc* acc = out + begin * cout;
    std::fill(acc, acc + (end - begin) * cout, Acc(0));
    if (!pairs.collect(nbr, layout, K, begin, end, n)) {
      valid.store(false, std::memory_order_relaxed);
      return;
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t m = pairs.count(k);
      if (m == 0) continue;
      accumulate_rows(x_rows.gather(x, cin, pairs.src(k), m), m, w.data() + k * cin * cout,
                      cin, cout, pairs.pos(k), acc);
    }
  });
  return valid.load();
}

// dw[ci, c0 : c0 + NV * lanes] += sum_j a[j][ci] * g[j][c0 : ...] for the
// kOuterRows input channels from ci0 and j < m; rows a[j] of cin entries,
// g[j] of cout.
template <typename Acc, int NV>
void outer_block(const Acc* const* a, const Acc* const* g, int64_t m,
                 int64_t cout, int64_t ci0, int64_t c0, Acc* dw) {
  using V = Vec<Acc>;
  constexpr int L = kLanes<Acc>;
  constexpr int Q = kOuterRows;
  V acc[Q][NV] = {};
  for (int64_t j = 0; j < m; ++j) {
    V gv[NV];
    for (int v = 0; v < NV; ++v) gv[v] = *reinterpret_cast<const V*>(g[j] + c0 + v * L);
    for (int q = 0; q < Q; ++q) {
      const Acc av = a[j][ci0 + q];
      for (int v = 0; v < NV; ++v) acc[q][v] += av * gv[v];
    }
  }
  for (int q = 0; q < Q; ++q) {
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(dw + (ci0 + q) * cout + c0 + v * L) += acc[q][v];
  }
}

// dw[ci, :] += sum_j a[j][ci] * g[j][:] for j < m; rows a[j] of cin
// entries, g[j] of cout. Blocks of kOuterRows input channels x 1 or 2 vectors of outputs
// stay in registers.
template <typename Acc>
void accumulate_outer(const Acc* const* a, const Acc* const* g, int64_t m, int64_t cin,
                      int64_t cout, Acc* dw) {
  constexpr int64_t L = kLanes<Acc>;
  const int64_t vector_cols = cout / L * L;
  const int64_t blocked_cin = cin / kOuterRows * kOuterRows;
  for (int64_t ci = 0; ci < blocked_cin; ci += kOuterRows) {
    int64_t c0 = 0;
    for (; c0 + 2 * L <= vector_cols; c0 += 2 * L) outer_block<Acc, 2>(a, g, m, cout, ci, c0, dw);
    if (c0 < vector_cols) outer_block<Acc, 1>(a, g, m, cout, ci, c0, dw);
  }
  // The rest: input channels past the blocks, output channels past the vectors.
  for (int64_t ci = 0; ci < cin; ++ci) {
    const int64_t c_begin = ci < blocked_cin ? vector_cols : 0;
    for (int64_t j = 0; j < m; ++j) {
      const Acc av = a[j][ci];
      for (int64_t c = c_begin; c < cout; ++c) dw[ci * cout + c] += av * g[j][c];
    }
  }
}

// Tiles of output rows are grouped into fixed chunks (set by the shapes, not
// the thread count); each chunk sums its tiles' products into its own
// partial dw, and the partials are added in chunk order. Returns false when a
// neighbour entry lies outside [-1, n) (x has n rows).
template <typename T>
bool gather_matmul_grad(ffi::ThreadPool& pool, const T* x, int64_t n, int64_t cin,
                        const T* g, int64_t cout, const int32_t* nbr,
                        MapLayout layout, int64_t rows, int64_t K,
                        typename Accum<T>::type* dw) {
  using Acc = typename Accum<T>::type;
  const int64_t size = K * cin * cout;
  const int64_t tile_rows = tile_rows_for(K);
  const int64_t tiles = std::max<int64_t>(1, (rows + tile_rows - 1) / tile_rows);
  const int64_t wanted = std::clamp<int64_t>(kPartialBytes / (size * sizeof(Acc)), kMinChunks, kMaxChunks);
  const int64_t target_chunks = std::min(wanted, tiles);
  const int64_t tiles_per_chunk = (tiles + target_chunks - 1) / target_chunks;
  const int64_t chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  std::vector<Acc> partials((chunks - 1) * size);  // chunk 0 sums into dw
  std::atomic<bool> valid{true};
  parallel_for(pool, chunks, [&](int64_t chunk) {
    thread_local TilePairs pairs;
    thread_local RowGather<T, Acc> x_rows, g_rows;
    Acc* sum = chunk == 0 ? dw : partials.data() + (chunk - 1) * size;
    std::fill(sum, sum + size, Acc(0));
    const int64_t last = std::min(tiles, (chunk + 1) * tiles_per_chunk);
    for (int64_t tile = chunk * tiles_per_chunk; tile < last; ++tile) {
      const int64_t begin = tile * tile_rows;
      if (!pairs.collect(nbr, layout, K, begin, std::min(rows, begin + tile_rows), n)) {
        valid.store(false, std::memory_order_relaxed);
        return;
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t m = pairs.count(k);
        if (m == 0) continue;
        accumulate_outer(x_rows.gather(x, cin, pairs.src(k), m),
                         g_rows.gather(g + begin * cout, cout, pairs.pos(k), m), m, cin, cout,
                         sum + k * cin * cout);
      }
    }
  });
  parallel_for(pool, (size + kReduceBlock - 1) / kReduceBlock, [&](int64_t block) {
    const int64_t begin = block * kReduceBlock, end = std::min(size, begin + kReduceBlock);
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      const Acc* part = partials.data() + (chunk - 1) * size;
      for (int64_t e = begin; e < end; ++e) dw[e] += part[e];
    }
  });
  return valid.load();
}

// allow_tf32 is ignored: products on the CPU are always full float32.
// OffsetsLeading: nbr [K, M] (the _v2 targets), else [M, K] (_v1).
template <bool OffsetsLeading>
ffi::Error GatherMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                            ffi::AnyBuffer w, ffi::Buffer<ffi::S32> nbr,
                            ffi::Result<ffi::AnyBuffer> out, int64_t /*allow_tf32*/) {
  MatmulDims d{};
  if (auto err = check_gather_matmul(x, w, nbr, *out, OffsetsLeading, &d); err.failure()) return err;
  const int64_t n = d.n, cin = d.cin, K = d.K, cout = d.cout, rows = d.rows;
  bool valid = true;
  auto err = dispatch_float(x.element_type(), out->element_type(), "gather_matmul", [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accum<T>::type;
    valid = gather_matmul(pool, reinterpret_cast<const T*>(x.untyped_data()), n, cin,
                          reinterpret_cast<const T*>(w.untyped_data()), K, cout,
                          nbr.typed_data(), d.layout, rows,
                          reinterpret_cast<Acc*>(out->untyped_data()));
  });
  if (err.failure()) return err;
  return valid ? ffi::Error::Success() : first_bad_neighbour(nbr.typed_data(), rows * K, n, "nbr");
}

template <bool OffsetsLeading>
ffi::Error GatherMatmulGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                                ffi::AnyBuffer g, ffi::Buffer<ffi::S32> nbr,
                                ffi::Result<ffi::AnyBuffer> dw, int64_t /*allow_tf32*/) {
  MatmulDims d{};
  if (auto err = check_gather_matmul_grad(x, g, nbr, *dw, OffsetsLeading, &d); err.failure())
    return err;
  const int64_t n = d.n, cin = d.cin, K = d.K, cout = d.cout, rows = d.rows;
  bool valid = true;
  auto err = dispatch_float(x.element_type(), dw->element_type(), "gather_matmul_grad", [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accum<T>::type;
    valid = gather_matmul_grad(pool, reinterpret_cast<const T*>(x.untyped_data()), n, cin,
                               reinterpret_cast<const T*>(g.untyped_data()), cout,
                               nbr.typed_data(), d.layout, rows, K,
                               reinterpret_cast<Acc*>(dw->untyped_data()));
  });
  if (err.failure()) return err;
  return valid ? ffi::Error::Success() : first_bad_neighbour(nbr.typed_data(), rows * K, n, "nbr");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmulV1, GatherMatmulImpl<false>,
                              signature::gather_matmul(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmul, GatherMatmulImpl<true>,
                              signature::gather_matmul(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmulGradV1, GatherMatmulGradImpl<false>,
                              signature::gather_matmul(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmulGrad, GatherMatmulGradImpl<true>,
                              signature::gather_matmul(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

}  // namespace jsc
