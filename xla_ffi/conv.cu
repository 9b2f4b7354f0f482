// Convolution kernels on a GPU, with the semantics of conv.cc:
//   GatherMatmul:     out[r] = sum_k x[nbr[k, r]] @ w[k]   (forward, input grad)
//   GatherMatmulGrad: dw[k] = sum_r x[nbr[k, r]]^T g[r]    (kernel grad)
// with offset-leading maps nbr [K, M]; the V1 handlers take them [M, K].
// Both are implicit GEMMs on 64 x 64 output tiles: rows are gathered through
// the neighbour map into shared memory, 16 reduction steps at a time, and
// multiplied there. bfloat16 and float16 use tensor cores (wmma, float32
// accumulation; products of half values are exact in float32); float32 uses
// them in TF32 where allow_tf32 says so (inputs rounded to 10-bit mantissas,
// as XLA's GPU matmuls do at default precision), CUDA-core FMAs in full
// precision otherwise, as float64 always does. Tiles of 16 gathered rows that
// have no neighbour are skipped. As in spconv's implicit GEMM, the rows are
// taken in the order of their neighbour masks (bit k: a neighbour through
// offset k), so that the rows of a tile mostly share their offsets and a tile
// skips the offsets that none of its rows has.
// Deterministic: every output tile is summed by one thread block in a fixed
// order; the kernel gradient splits the rows into a number of ranges fixed by
// the shapes, sums each range into scratch memory and adds the ranges in
// order in a second pass. No floating-point atomics.
// Neighbour entries outside [-1, N) count as -1 (the CPU handlers reject them).
#if !defined(JSC_CUDA_EMULATION)  // the emulator brings its own wmma and cub
#include <cub/device/device_radix_sort.cuh>
#include <mma.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "jsc/checks.h"
#include "jsc/cuda_util.h"
#include "jsc/dtype.h"
#include "jsc/ffi_util.h"
#include "jsc/signatures.h"
#include "xla/ffi/api/ffi.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "jax_sparseconv's CUDA kernels need compute capability 8.0 or newer (bfloat16 wmma)"
#endif

namespace jsc::gpu {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBM = 64;       // tile rows (output rows; input channels for dw)
constexpr int kBN = 64;       // tile columns (output channels)
constexpr int kBK = 16;       // reduction step
constexpr int kPitch = 72;    // row pitch of the shared tiles (elements)
constexpr int kTileThreads = 128;

// Where a tile's row m goes in the output: row m below `count`, else nowhere.
struct FirstRows {
  int64_t count;
  __device__ int64_t operator()(int m) const { return m < count ? m : -1; }
};

// Row rows[m] (-1: nowhere).
struct ListedRows {
  const int32_t* rows;
  __device__ int64_t operator()(int m) const { return rows[m]; }
};

// The shared tiles of one reduction step: a[kk][m] = A[m, kk] (A stored
// transposed, so that both tiles load along their contiguous global axis)
// and b[kk][n] = B[kk, n]. Each engine adds A @ B to its 64 x 64 tile.

// Both engines read tiles of the storage type T (In); the CUDA-core engine
// serves float32 and float64, whose accumulation type is T itself.

// CUDA cores: thread t owns rows 4 (t / 8) .. + 4 and columns t % 8 + 8 j.
template <typename Acc>
struct SimtTile {
  using In = Acc;
  using Out = Acc;
  Acc acc[4][8];

  __device__ void zero() {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) acc[i][j] = 0;
  }

  __device__ void mma(const In (*a)[kPitch], const In (*b)[kPitch]) {
    const int tr = threadIdx.x / 8 * 4, tc = threadIdx.x % 8;
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      Acc av[4], bv[8];
      for (int i = 0; i < 4; ++i) av[i] = a[kk][tr + i];
      for (int j = 0; j < 8; ++j) bv[j] = b[kk][tc + 8 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 8; ++j) acc[i][j] += av[i] * bv[j];
    }
  }

  // out[row(m) * ld + n] for the tile's rows m with row(m) >= 0, n < n_valid.
  template <typename RowOf>
  __device__ void store(Out* out, int64_t ld, RowOf row, int64_t n_valid) {
    const int tr = threadIdx.x / 8 * 4, tc = threadIdx.x % 8;
    for (int i = 0; i < 4; ++i) {
      const int64_t r = row(tr + i);
      if (r < 0) continue;
      for (int j = 0; j < 8; ++j) {
        if (tc + 8 * j < n_valid) out[r * ld + tc + 8 * j] = acc[i][j];
      }
    }
  }
};

// Tensor cores: warp w owns the 32 x 32 quarter (w / 2, w % 2), as 2 x 2
// fragments of 16 x 16 with float32 accumulators. Half types multiply 16
// reduction steps at a time; float32 (TF32) 8, rounding its fragments first.
template <typename T>
struct WmmaTile {
  static constexpr bool kTf32 = std::is_same_v<T, float>;
  static constexpr int kK = kTf32 ? 8 : 16;
  using Element = std::conditional_t<kTf32, wmma::precision::tf32, T>;
  using In = T;
  using Out = float;
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[2][2];

  __device__ void zero() {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  template <typename Fragment>
  __device__ static void round(Fragment& f) {
    if constexpr (kTf32) {
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
    }
  }

  __device__ void mma(const In (*a)[kPitch], const In (*b)[kPitch]) {
    const int wm = threadIdx.x / 32 / 2 * 32, wn = threadIdx.x / 32 % 2 * 32;
    for (int k0 = 0; k0 < kBK; k0 += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, Element, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, kK, Element, wmma::row_major> fb[2];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], &a[k0][wm + 16 * i], kPitch);
        round(fa[i]);
      }
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], &b[k0][wn + 16 * j], kPitch);
        round(fb[j]);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  template <typename RowOf>
  __device__ void store(Out* out, int64_t ld, RowOf row, int64_t n_valid) {
    constexpr int kCPitch = kBN + 4;
    __shared__ __align__(32) float c[kBM][kCPitch];
    const int wm = threadIdx.x / 32 / 2 * 32, wn = threadIdx.x / 32 % 2 * 32;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&c[wm + 16 * i][wn + 16 * j], acc[i][j], kCPitch,
                                wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < kBM * kBN; e += kTileThreads) {
      const int m = e / kBN, n = e % kBN;
      const int64_t r = row(m);
      if (r >= 0 && n < n_valid) out[r * ld + n] = c[m][n];
    }
  }
};

// Calls fn(tag) with tag::type the engine for storage type T: tensor cores
// for the half types, and for float32 where TF32 is allowed.
template <typename Tile> struct TileTag { using type = Tile; };

template <typename T, typename Fn>
void with_tile(bool allow_tf32, Fn&& fn) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    fn(TileTag<WmmaTile<T>>{});
  } else if constexpr (std::is_same_v<T, float>) {
    if (allow_tf32) {
      fn(TileTag<WmmaTile<float>>{});
    } else {
      fn(TileTag<SimtTile<float>>{});
    }
  } else {
    fn(TileTag<SimtTile<T>>{});
  }
}

// The row that the tile position i (of rows) takes: order[i], or i.
__device__ __forceinline__ int32_t row_at(const int32_t* order, int64_t i) {
  return order ? order[i] : static_cast<int32_t>(i);
}

// Forward: block (row tile, column tile) of out = sum_k gather(x, nbr[:, k]) @ w[k],
// the tile's rows taken from `order` (nullptr: in order).
template <typename T, typename Tile>
__global__ void __launch_bounds__(kTileThreads)
gather_matmul_kernel(const T* x, int64_t n, int64_t cin, const T* w, int64_t K,
                     int64_t cout, const int32_t* nbr, MapLayout layout, int64_t rows,
                     const int32_t* order, typename Tile::Out* out) {
  using In = typename Tile::In;
  __shared__ __align__(32) In a[kBK][kPitch];
  __shared__ __align__(32) In b[kBK][kPitch];
  __shared__ int32_t src[kBM];
  __shared__ int32_t dst[kBM];  // the output row of each tile row, or -1
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  if (threadIdx.x < kBM) {
    dst[threadIdx.x] = r0 + threadIdx.x < rows ? row_at(order, r0 + threadIdx.x) : -1;
  }
  __syncthreads();
  const In zero(0.0f);
  Tile tile;
  tile.zero();
  for (int64_t k = 0; k < K; ++k) {
    int found = 0;
    if (threadIdx.x < kBM) {
      const int32_t r = dst[threadIdx.x];
      const int32_t s = r >= 0 ? safe_row(nbr[layout.at(r, k)], n) : -1;
      src[threadIdx.x] = s;
      found = s >= 0;
    }
    if (!__syncthreads_or(found)) continue;
    const T* wk = w + k * cin * cout;
    for (int64_t c0 = 0; c0 < cin; c0 += kBK) {
      for (int e = threadIdx.x; e < kBM * kBK; e += kTileThreads) {
        const int m = e / kBK, kk = e % kBK;
        const int32_t s = src[m];
        a[kk][m] = s >= 0 && c0 + kk < cin ? x[s * cin + c0 + kk] : zero;
      }
      for (int e = threadIdx.x; e < kBK * kBN; e += kTileThreads) {
        const int kk = e / kBN, j = e % kBN;
        b[kk][j] = c0 + kk < cin && n0 + j < cout
                       ? wk[(c0 + kk) * cout + n0 + j] : zero;
      }
      __syncthreads();
      tile.mma(a, b);
      __syncthreads();
    }
  }
  tile.store(out + n0, cout, ListedRows{dst}, cout - n0);
}

// Kernel gradient, block (input-channel tile x output-channel tile, k, split):
// partial[split, k] = sum over the split's rows r of x[nbr[r, k]]^T g[r], the
// split being a range of positions in `order` (nullptr: in order).
template <typename T, typename Tile>
__global__ void __launch_bounds__(kTileThreads)
gather_matmul_grad_kernel(const T* x, int64_t n, int64_t cin, const T* g,
                          int64_t cout, const int32_t* nbr, MapLayout layout, int64_t rows,
                          const int32_t* order, int64_t K, int64_t rows_per_split,
                          int64_t col_tiles, typename Tile::Out* partial) {
  using In = typename Tile::In;
  __shared__ __align__(32) In a[kBK][kPitch];
  __shared__ __align__(32) In b[kBK][kPitch];
  __shared__ int32_t src[kBK];
  __shared__ int32_t grow[kBK];  // the row of g of each of the kBK rows
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) / col_tiles * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) % col_tiles * kBN;
  const int64_t k = blockIdx.y, split = blockIdx.z;
  const int64_t begin = split * rows_per_split;
  const int64_t end = rows < begin + rows_per_split ? rows : begin + rows_per_split;
  const In zero(0.0f);
  Tile tile;
  tile.zero();
  for (int64_t r0 = begin; r0 < end; r0 += kBK) {
    int found = 0;
    if (threadIdx.x < kBK) {
      const int32_t r = r0 + threadIdx.x < end ? row_at(order, r0 + threadIdx.x) : -1;
      const int32_t s = r >= 0 ? safe_row(nbr[layout.at(r, k)], n) : -1;
      grow[threadIdx.x] = r;
      src[threadIdx.x] = s;
      found = s >= 0;
    }
    if (!__syncthreads_or(found)) continue;
    for (int e = threadIdx.x; e < kBK * kBM; e += kTileThreads) {
      const int kk = e / kBM, m = e % kBM;
      const int32_t s = src[kk];
      a[kk][m] = s >= 0 && i0 + m < cin ? x[s * cin + i0 + m] : zero;
    }
    for (int e = threadIdx.x; e < kBK * kBN; e += kTileThreads) {
      const int kk = e / kBN, j = e % kBN;
      b[kk][j] = src[kk] >= 0 && n0 + j < cout
                     ? g[static_cast<int64_t>(grow[kk]) * cout + n0 + j] : zero;
    }
    __syncthreads();
    tile.mma(a, b);
    __syncthreads();
  }
  tile.store(partial + ((split * K + k) * cin + i0) * cout + n0, cout, FirstRows{cin - i0},
             cout - n0);
}

// out[e] = sum over s (in order) of partial[s, e].
template <typename Acc>
__global__ void sum_splits(const Acc* partial, int64_t splits, int64_t size, Acc* out) {
  const int64_t e = thread_index();
  if (e >= size) return;
  Acc sum = 0;
  for (int64_t s = 0; s < splits; ++s) sum += partial[s * size + e];
  out[e] = sum;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxGridYZ = 65535;

// masks[r]: bit k set where row r of nbr has a neighbour through offset k;
// identity[r] = r.
__global__ void neighbour_masks(const int32_t* nbr, MapLayout layout, int64_t n, int64_t rows,
                                int64_t K, uint64_t* masks, int32_t* identity) {
  const int64_t r = thread_index();
  if (r >= rows) return;
  uint64_t mask = 0;
  for (int64_t k = 0; k < K; ++k) {
    mask |= static_cast<uint64_t>(safe_row(nbr[layout.at(r, k)], n) >= 0) << k;
  }
  masks[r] = mask;
  identity[r] = static_cast<int32_t>(r);
}

// *order: the rows of nbr sorted stably by their neighbour masks
// (in scratch memory), or nullptr (rows in order) where the masks do not fit
// 64 bits or one tile holds every row.
ffi::Error mask_order(cudaStream_t stream, Scratch& scratch, const int32_t* nbr, MapLayout layout,
                      int64_t n, int64_t rows, int64_t K, const int32_t** order) {
  *order = nullptr;
  if (K > 64 || rows <= kBM || rows > INT32_MAX) return ffi::Error::Success();
  uint64_t *masks = nullptr, *sorted_masks = nullptr;
  int32_t *identity = nullptr, *sorted = nullptr;
  uint8_t* temp = nullptr;
  size_t temp_bytes = 0;
  // The first call only sets temp_bytes.
  auto sort = [&] {
    return cuda_error(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, masks, sorted_masks,
                                                      identity, sorted, static_cast<int>(rows),
                                                      0, static_cast<int>(K), stream),
                      "gather_matmul: sort rows by neighbour mask");
  };
  if (auto err = sort(); err.failure()) return err;
  for (auto err : {allocate(scratch, rows, &masks), allocate(scratch, rows, &sorted_masks),
                   allocate(scratch, rows, &identity), allocate(scratch, rows, &sorted),
                   allocate(scratch, static_cast<int64_t>(temp_bytes), &temp)}) {
    if (err.failure()) return err;
  }
  launch(stream, rows, neighbour_masks, nbr, layout, n, rows, K, masks, identity);
  if (auto err = sort(); err.failure()) return err;
  *order = sorted;
  return ffi::Error::Success();
}

// OffsetsLeading: nbr [K, M] (the _v2 targets), else [M, K] (_v1).
template <bool OffsetsLeading>
ffi::Error GatherMatmulImpl(cudaStream_t stream, Scratch scratch, ffi::AnyBuffer x,
                            ffi::AnyBuffer w, ffi::Buffer<ffi::S32> nbr,
                            ffi::Result<ffi::AnyBuffer> out, int64_t allow_tf32) {
  MatmulDims d{};
  if (auto err = check_gather_matmul(x, w, nbr, *out, OffsetsLeading, &d); err.failure()) return err;
  if (ceil_div(d.cout, kBN) > kMaxGridYZ) return invalid("gather_matmul: Cout too large for a GPU grid");
  const int32_t* order = nullptr;
  if (d.cout > 0) {
    if (auto err = mask_order(stream, scratch, nbr.typed_data(), d.layout, d.n, d.rows, d.K, &order);
        err.failure())
      return err;
  }
  auto err = dispatch_float(x.element_type(), out->element_type(), "gather_matmul", [&](auto tag) {
    using T = device_t<decltype(tag)>;
    if (d.rows == 0 || d.cout == 0) return;
    const dim3 grid(static_cast<unsigned>(ceil_div(d.rows, kBM)),
                    static_cast<unsigned>(ceil_div(d.cout, kBN)));
    with_tile<T>(allow_tf32 != 0, [&](auto tile) {
      using Tile = typename decltype(tile)::type;
      launch_grid(stream, grid, kTileThreads, gather_matmul_kernel<T, Tile>,
                  reinterpret_cast<const T*>(x.untyped_data()), d.n, d.cin,
                  reinterpret_cast<const T*>(w.untyped_data()), d.K, d.cout,
                  nbr.typed_data(), d.layout, d.rows, order,
                  reinterpret_cast<typename Tile::Out*>(out->untyped_data()));
    });
  });
  return err.failure() ? err : launch_error("gather_matmul");
}

// The number of row ranges of the kernel gradient: enough blocks to fill a
// large GPU, each range at least 256 rows; a function of the shapes only, so
// results do not depend on the device.
int64_t grad_splits(int64_t tiles, int64_t K, int64_t rows) {
  const int64_t want = ceil_div(1024, std::max<int64_t>(tiles * K, 1));
  return std::clamp<int64_t>(std::min(want, ceil_div(rows, 256)), 1, 64);
}

template <bool OffsetsLeading>
ffi::Error GatherMatmulGradImpl(cudaStream_t stream,
                                Scratch scratch, ffi::AnyBuffer x,
                                ffi::AnyBuffer g, ffi::Buffer<ffi::S32> nbr,
                                ffi::Result<ffi::AnyBuffer> dw, int64_t allow_tf32) {
  MatmulDims d{};
  if (auto err = check_gather_matmul_grad(x, g, nbr, *dw, OffsetsLeading, &d); err.failure())
    return err;
  if (d.K > kMaxGridYZ) return invalid("gather_matmul_grad: kernel volume too large for a GPU grid");
  const int32_t* order = nullptr;
  if (d.K * d.cin * d.cout > 0) {
    if (auto err = mask_order(stream, scratch, nbr.typed_data(), d.layout, d.n, d.rows, d.K, &order);
        err.failure())
      return err;
  }
  ffi::Error failed = ffi::Error::Success();
  auto err = dispatch_float(x.element_type(), dw->element_type(), "gather_matmul_grad", [&](auto tag) {
    using T = device_t<decltype(tag)>;
    using Out = typename Accum<decltype(tag)>::type;
    const int64_t size = d.K * d.cin * d.cout;
    if (size == 0) return;
    const int64_t col_tiles = ceil_div(d.cout, kBN);
    const int64_t tiles = ceil_div(d.cin, kBM) * col_tiles;
    const int64_t splits = grad_splits(tiles, d.K, d.rows);
    const int64_t rows_per_split = ceil_div(ceil_div(d.rows, splits), kBK) * kBK;
    Out* result = reinterpret_cast<Out*>(dw->untyped_data());
    Out* partial = result;
    if (splits > 1) {
      failed = allocate(scratch, splits * size, &partial);
      if (failed.failure()) return;
    }
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(d.K),
                    static_cast<unsigned>(splits));
    with_tile<T>(allow_tf32 != 0, [&](auto tile) {
      using Tile = typename decltype(tile)::type;
      static_assert(std::is_same_v<typename Tile::Out, Out>);
      launch_grid(stream, grid, kTileThreads, gather_matmul_grad_kernel<T, Tile>,
                  reinterpret_cast<const T*>(x.untyped_data()), d.n, d.cin,
                  reinterpret_cast<const T*>(g.untyped_data()), d.cout, nbr.typed_data(), d.layout,
                  d.rows, order, d.K, std::max<int64_t>(rows_per_split, kBK), col_tiles,
                  partial);
    });
    if (splits > 1) launch(stream, size, sum_splits<Out>, partial, splits, size, result);
  });
  if (err.failure()) return err;
  if (failed.failure()) return failed;
  return launch_error("gather_matmul_grad");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmulV1, GatherMatmulImpl<false>,
                              signature::gather_matmul(ffi::Ffi::Bind().Ctx<Stream>().Ctx<Scratch>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmul, GatherMatmulImpl<true>,
                              signature::gather_matmul(ffi::Ffi::Bind().Ctx<Stream>().Ctx<Scratch>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmulGradV1, GatherMatmulGradImpl<false>,
                              signature::gather_matmul(ffi::Ffi::Bind().Ctx<Stream>().Ctx<Scratch>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmulGrad, GatherMatmulGradImpl<true>,
                              signature::gather_matmul(ffi::Ffi::Bind().Ctx<Stream>().Ctx<Scratch>()));

}  // namespace jsc::gpu
