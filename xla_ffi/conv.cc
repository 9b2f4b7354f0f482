// Convolution kernels on the CPU: gather rows along a neighbour map, multiply
// by the kernel slice of each offset, accumulate (see rulebook.py).
//   GatherMatmul:     out[r] = sum_k x[nbr[r, k]] @ w[k]   (forward, input grad)
//   GatherMatmulGrad: dw[k] = sum_r x[nbr[r, k]]^T g[r]    (kernel grad)
// Work is proportional to the valid pairs; -1 entries cost one comparison.
// Each output element is produced by one task in a fixed order: results do
// not depend on the number of threads.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "jsc/dtype.h"
#include "jsc/ffi_util.h"
#include "jsc/gather.h"
#include "jsc/parallel.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {
namespace {

constexpr int64_t kTileRows = 64;  // output rows per task
constexpr int kBlockRows = 4;      // register block: rows
constexpr int kBlockCols = 32;     // register block: output channels

// acc[pos[j], :] += a[j, :] @ w for j < m; a [m, cin], w [cin, cout],
// acc rows of length cout. Blocks of 4 rows x 32 columns stay in registers.
template <typename Acc>
void accumulate_rows(const Acc* a, int64_t m, const Acc* w, int64_t cin,
                     int64_t cout, const int32_t* pos, Acc* acc) {
  int64_t j = 0;
  for (; j + kBlockRows <= m; j += kBlockRows) {
    int64_t c0 = 0;
    for (; c0 + kBlockCols <= cout; c0 += kBlockCols) {
      Acc block[kBlockRows][kBlockCols] = {};
      for (int64_t ci = 0; ci < cin; ++ci) {
        const Acc* wrow = w + ci * cout + c0;
        for (int q = 0; q < kBlockRows; ++q) {
          const Acc av = a[(j + q) * cin + ci];
#pragma GCC unroll 32
          for (int c = 0; c < kBlockCols; ++c) block[q][c] += av * wrow[c];
        }
      }
      for (int q = 0; q < kBlockRows; ++q) {
        Acc* out = acc + static_cast<int64_t>(pos[j + q]) * cout + c0;
        for (int c = 0; c < kBlockCols; ++c) out[c] += block[q][c];
      }
    }
    for (int q = 0; q < kBlockRows; ++q) {  // remaining columns
      Acc* out = acc + static_cast<int64_t>(pos[j + q]) * cout;
      for (int64_t ci = 0; ci < cin; ++ci) {
        const Acc av = a[(j + q) * cin + ci];
        for (int64_t c = c0; c < cout; ++c) out[c] += av * w[ci * cout + c];
      }
    }
  }
  for (; j < m; ++j) {  // remaining rows
    Acc* out = acc + static_cast<int64_t>(pos[j]) * cout;
    for (int64_t ci = 0; ci < cin; ++ci) {
      const Acc av = a[j * cin + ci];
      for (int64_t c = 0; c < cout; ++c) out[c] += av * w[ci * cout + c];
    }
  }
}

template <typename T>
void gather_matmul(ffi::ThreadPool& pool, const T* x, int64_t cin,
                   const T* w_in, int64_t K, int64_t cout, const int32_t* nbr,
                   int64_t rows, typename Accum<T>::type* out) {
  using Acc = typename Accum<T>::type;
  std::vector<Acc> w(K * cin * cout);
  for (size_t e = 0; e < w.size(); ++e) w[e] = static_cast<Acc>(to_float(w_in[e]));
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  parallel_for(pool, tiles, [&](int64_t tile) {
    const int64_t begin = tile * kTileRows;
    const int64_t end = std::min(rows, begin + kTileRows);
    Acc* acc = out + begin * cout;
    std::fill(acc, acc + (end - begin) * cout, Acc(0));
    int32_t pos[kTileRows], src[kTileRows];
    std::vector<Acc> packed(kTileRows * cin);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t m = collect_pairs(nbr, K, k, begin, end, pos, src);
      if (m == 0) continue;
      pack_rows(x, cin, src, m, packed.data());
      accumulate_rows(packed.data(), m, w.data() + k * cin * cout, cin, cout,
                      pos, acc);
    }
  });
}

// dw[k][ci, :] += sum_j a[j, ci] * g[j, :] over the pairs of offset k, for a
// block of input channels [c_begin, c_end).
template <typename Acc>
void accumulate_outer(const Acc* a, const Acc* g, int64_t m, int64_t cin,
                      int64_t cout, int64_t c_begin, int64_t c_end, Acc* dw) {
  for (int64_t ci = c_begin; ci < c_end; ++ci) {
    Acc* drow = dw + ci * cout;
    for (int64_t j = 0; j < m; ++j) {
      const Acc av = a[j * cin + ci];
      const Acc* grow = g + j * cout;
      for (int64_t c = 0; c < cout; ++c) drow[c] += av * grow[c];
    }
  }
}

constexpr int64_t kGradChannels = 16;  // input channels per kernel-grad task

template <typename T>
void gather_matmul_grad(ffi::ThreadPool& pool, const T* x, int64_t cin,
                        const T* g, int64_t cout, const int32_t* nbr,
                        int64_t rows, int64_t K,
                        typename Accum<T>::type* dw) {
  using Acc = typename Accum<T>::type;
  const int64_t blocks = (cin + kGradChannels - 1) / kGradChannels;
  parallel_for(pool, K * blocks, [&](int64_t task) {
    const int64_t k = task / blocks;
    const int64_t c_begin = (task % blocks) * kGradChannels;
    const int64_t c_end = std::min(cin, c_begin + kGradChannels);
    Acc* dwk = dw + k * cin * cout;
    for (int64_t ci = c_begin; ci < c_end; ++ci)
      std::fill(dwk + ci * cout, dwk + (ci + 1) * cout, Acc(0));
    int32_t pos[kTileRows], src[kTileRows], dst[kTileRows];
    std::vector<Acc> packed_x(kTileRows * cin), packed_g(kTileRows * cout);
    for (int64_t begin = 0; begin < rows; begin += kTileRows) {
      const int64_t end = std::min(rows, begin + kTileRows);
      const int64_t m = collect_pairs(nbr, K, k, begin, end, pos, src);
      if (m == 0) continue;
      for (int64_t j = 0; j < m; ++j) dst[j] = static_cast<int32_t>(begin + pos[j]);
      pack_rows(x, cin, src, m, packed_x.data());
      pack_rows(g, cout, dst, m, packed_g.data());
      accumulate_outer(packed_x.data(), packed_g.data(), m, cin, cout, c_begin,
                       c_end, dwk);
    }
  });
}

ffi::Error GatherMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                            ffi::AnyBuffer w, ffi::Buffer<ffi::S32> nbr,
                            ffi::Result<ffi::AnyBuffer> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), nd = nbr.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || nd.size() != 2) {
    return invalid("gather_matmul expects x [N, Cin], w [K, Cin, Cout], nbr [M, K]");
  }
  const int64_t n = xd[0], cin = xd[1], K = wd[0], cout = wd[2], rows = nd[0];
  if (wd[1] != cin || nd[1] != K || x.element_type() != w.element_type()) {
    return invalid("gather_matmul: x, w and nbr disagree on Cin, K or dtype");
  }
  if (auto err = check_matrix(*out, "out", rows, cout); err.failure()) return err;
  if (auto err = check_neighbours(nbr.typed_data(), rows * K, n, "nbr");
      err.failure())
    return err;
  ffi::Error status = ffi::Error::Success();
  const bool known = dispatch_float(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accum<T>::type;
    if (out->element_type() != FfiType<Acc>::value) {
      status = invalid("gather_matmul: out must have the accumulation dtype");
      return;
    }
    gather_matmul(pool, reinterpret_cast<const T*>(x.untyped_data()), cin,
                  reinterpret_cast<const T*>(w.untyped_data()), K, cout,
                  nbr.typed_data(), rows,
                  reinterpret_cast<Acc*>(out->untyped_data()));
  });
  if (!known) return invalid("gather_matmul: unsupported dtype");
  return status;
}

ffi::Error GatherMatmulGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                                ffi::AnyBuffer g, ffi::Buffer<ffi::S32> nbr,
                                ffi::Result<ffi::AnyBuffer> dw) {
  const auto xd = x.dimensions(), gd = g.dimensions(), nd = nbr.dimensions();
  if (xd.size() != 2 || gd.size() != 2 || nd.size() != 2) {
    return invalid("gather_matmul_grad expects x [N, Cin], g [M, Cout], nbr [M, K]");
  }
  const int64_t n = xd[0], cin = xd[1], cout = gd[1], rows = nd[0], K = nd[1];
  if (gd[0] != rows || x.element_type() != g.element_type()) {
    return invalid("gather_matmul_grad: g and nbr disagree on rows, or x and g on dtype");
  }
  const auto dd = dw->dimensions();
  if (dd.size() != 3 || dd[0] != K || dd[1] != cin || dd[2] != cout) {
    return invalid("gather_matmul_grad: dw must be [K, Cin, Cout]");
  }
  if (auto err = check_neighbours(nbr.typed_data(), rows * K, n, "nbr");
      err.failure())
    return err;
  ffi::Error status = ffi::Error::Success();
  const bool known = dispatch_float(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accum<T>::type;
    if (dw->element_type() != FfiType<Acc>::value) {
      status = invalid("gather_matmul_grad: dw must have the accumulation dtype");
      return;
    }
    gather_matmul_grad(pool, reinterpret_cast<const T*>(x.untyped_data()), cin,
                       reinterpret_cast<const T*>(g.untyped_data()), cout,
                       nbr.typed_data(), rows, K,
                       reinterpret_cast<Acc*>(dw->untyped_data()));
  });
  if (!known) return invalid("gather_matmul_grad: unsupported dtype");
  return status;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmul, GatherMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::AnyBuffer>()          // w
                                  .Arg<ffi::Buffer<ffi::S32>>()   // nbr
                                  .Ret<ffi::AnyBuffer>());        // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherMatmulGrad, GatherMatmulGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::AnyBuffer>()          // g
                                  .Arg<ffi::Buffer<ffi::S32>>()   // nbr
                                  .Ret<ffi::AnyBuffer>());        // dw

}  // namespace jsc
