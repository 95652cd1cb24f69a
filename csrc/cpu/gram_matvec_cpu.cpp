// Fused Gram products on the CPU.
//
// Math: Right side  Y = W^T (W X)  as  Y = sum_r (W_r . X) W_r^T  (W_r the r-th row);
//       Left side   Y = W (W^T X)  as  T = sum_r X[r] W_r^T, then Y[r] = W_r . T.
// Mapping: many matrices -> one matrix per thread; one large matrix -> one contiguous row chunk per
//   thread, each accumulating into its own partial vector, summed in chunk order (static schedule:
//   the same thread count always gives the same bits; other counts differ only by rounding).
// Bytes moved: Right reads each element of W once per product (a 4-row block is read for the 4
//   dot products and re-read from L1/L2 for the rank-4 update); Left reads W twice.
// Accumulation: float64 (storage fp32/fp16/bf16/fp64 is widened in registers, never copied).
// Vector width: the kernel bodies (gram_kernels.inc) are compiled for AVX-512, AVX2+FMA+F16C and a
//   portable baseline; the widest one the CPU supports is picked once at first use.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "specfast/check.h"
#include "specfast/ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPECFAST_X86 1
#include <immintrin.h>
#endif

namespace specfast {
namespace {

template <typename T>
struct KernelSet {
  void (*right_rows)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, const double*, int64_t,
                     double*, int64_t, double*, int64_t);
  void (*left_accumulate)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, const double*,
                          int64_t, double*, int64_t);
  void (*left_dots)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, const double*, int64_t,
                    double*, int64_t);
  void (*scan)(const T*, int64_t, int64_t, int64_t, double*, int64_t*);
};



namespace isa_generic {
#define SPECFAST_ISA 0
#include "gram_kernels.inc"
#undef SPECFAST_ISA
}  // namespace isa_generic

#ifdef SPECFAST_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define SPECFAST_ISA 256
#include "gram_kernels.inc"
#undef SPECFAST_ISA
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
#define SPECFAST_ISA 512
#include "gram_kernels.inc"
#undef SPECFAST_ISA
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

enum class Isa { Generic, Avx2, Avx512 };

// The widest instruction set this CPU supports, capped by SPECFAST_CPU_ISA=portable|avx2|avx512
// when set (read once, at first use): the tests run every path on one machine this way.
Isa detect_isa() {
  Isa best = Isa::Generic;
#ifdef SPECFAST_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::Avx512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c"))
    best = Isa::Avx2;
#endif
  const char* cap = std::getenv("SPECFAST_CPU_ISA");
  if (cap != nullptr) {
    const std::string c(cap);
    if (c == "portable") return Isa::Generic;
    if (c == "avx2" && best == Isa::Avx512) return Isa::Avx2;
  }
  return best;
}

Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

template <typename T>
const KernelSet<T>& kernels() {
  static const KernelSet<T> set = [] {
    switch (active_isa()) {
#ifdef SPECFAST_X86
      case Isa::Avx512: return isa_avx512::kernel_set<T>();
      case Isa::Avx2: return isa_avx2::kernel_set<T>();
#endif
      default: return isa_generic::kernel_set<T>();
    }
  }();
  return set;
}

template <typename T>
const T* data_as(const MatrixView& W) { return static_cast<const T*>(W.data); }

void right_rows(const MatrixView& W, int64_t r0, int64_t r1, int64_t nvec, const double* X,
                int64_t ldx, double* Y, int64_t ldy, double* WX, int64_t ldwx) {
  SPECFAST_DISPATCH(W.dtype, T, [&] {
    kernels<T>().right_rows(data_as<T>(W), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Y, ldy, WX, ldwx);
  });
}

void left_accumulate(const MatrixView& W, int64_t r0, int64_t r1, int64_t nvec, const double* X,
                     int64_t ldx, double* Tacc, int64_t ldt) {
  SPECFAST_DISPATCH(W.dtype, T, [&] {
    kernels<T>().left_accumulate(data_as<T>(W), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Tacc, ldt);
  });
}

void left_dots(const MatrixView& W, int64_t r0, int64_t r1, int64_t nvec, const double* Tacc,
               int64_t ldt, double* Y, int64_t ldy) {
  SPECFAST_DISPATCH(W.dtype, T, [&] {
    kernels<T>().left_dots(data_as<T>(W), W.row_stride, r0, r1, W.cols, nvec, Tacc, ldt, Y, ldy);
  });
}

void check_view(const MatrixView& W) {
  SPECFAST_CHECK(W.rows >= 0 && W.cols >= 0, "gram: negative shape (", W.rows, ", ", W.cols, ")");
  SPECFAST_CHECK(W.rows <= 1 || W.row_stride >= W.cols, "gram: row_stride ", W.row_stride,
                 " is smaller than cols ", W.cols);
  SPECFAST_CHECK(W.data != nullptr || W.rows * W.cols == 0, "gram: null data pointer");
}

}  // namespace

void gram_apply(const MatrixView& W, GramSide side, int64_t nvec, const double* X, int64_t ldx,
                double* Y, int64_t ldy, double* WX, int64_t ldwx, int num_threads) {
  check_view(W);
  const int64_t m = W.rows, n = W.cols;
  const int64_t out_len = side == GramSide::Right ? n : m;
  for (int64_t c = 0; c < nvec; ++c) std::fill(Y + c * ldy, Y + c * ldy + out_len, 0.0);
  if (m == 0 || n == 0 || nvec == 0) {
    const int64_t wx_len = side == GramSide::Right ? m : n;
    if (WX) for (int64_t c = 0; c < nvec; ++c) std::fill(WX + c * ldwx, WX + c * ldwx + wx_len, 0.0);
    return;
  }
  // Row chunks, one per thread (static, so a given thread count always gives the same bits);
  // chunk 0 accumulates straight into the output, the others into partials summed in order.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(num_threads, m / 64));
  const int64_t rows_per = (m + chunks - 1) / chunks;
  if (side == GramSide::Right && chunks == 1) {
    right_rows(W, 0, m, nvec, X, ldx, Y, ldy, WX, ldwx);
    return;
  }
  thread_local std::vector<double> partial;  // reused across calls: no allocation per product
  const int64_t nbuf = side == GramSide::Right ? chunks - 1 : chunks;
  partial.assign(size_t(nbuf) * size_t(nvec) * size_t(n), 0.0);
  double* pbase = partial.data();
  auto acc = [&](int64_t t) -> std::pair<double*, int64_t> {
    if (side == GramSide::Right && t == 0) return {Y, ldy};
    const int64_t slot = side == GramSide::Right ? t - 1 : t;
    return {pbase + size_t(slot) * size_t(nvec) * size_t(n), n};
  };
#pragma omp parallel for schedule(static, 1) num_threads(int(chunks)) if (chunks > 1)
  for (int64_t t = 0; t < chunks; ++t) {
    const int64_t r0 = t * rows_per, r1 = std::min(m, r0 + rows_per);
    if (r0 >= r1) continue;
    auto [dst, ld] = acc(t);
    if (side == GramSide::Right)
      right_rows(W, r0, r1, nvec, X, ldx, dst, ld, WX, ldwx);
    else
      left_accumulate(W, r0, r1, nvec, X, ldx, dst, ld);
  }
  // Sum the partials in chunk order, parallel over column blocks.
  const int64_t first = 1;  // Right: Y is chunk 0; Left: partial 0 is the base
  double* base = side == GramSide::Right ? Y : pbase;
  const int64_t ldb = side == GramSide::Right ? ldy : n;
  const int64_t blk = 2048, nblk = (n + blk - 1) / blk;
#pragma omp parallel for schedule(static) num_threads(int(chunks)) if (chunks > 1 && nblk * nvec > 1)
  for (int64_t q = 0; q < nblk * nvec; ++q) {
    const int64_t c = q / nblk, j0 = (q % nblk) * blk, j1 = std::min(n, j0 + blk);
    double* dst = base + c * ldb;
    for (int64_t t = first; t < chunks; ++t) {
      const double* src = acc(t).first + c * n;
      for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
    }
  }
  if (side == GramSide::Right) return;
  if (WX)
    for (int64_t c = 0; c < nvec; ++c) std::memcpy(WX + c * ldwx, pbase + c * n, sizeof(double) * n);
  // Left phase 2: Y[c][r] = W_r . T[c], disjoint rows per chunk.
#pragma omp parallel for schedule(static, 1) num_threads(int(chunks)) if (chunks > 1)
  for (int64_t t = 0; t < chunks; ++t) {
    const int64_t r0 = t * rows_per, r1 = std::min(m, r0 + rows_per);
    if (r0 < r1) left_dots(W, r0, r1, nvec, pbase, n, Y, ldy);
  }
}

void gram_apply_grouped(const MatrixView* mats, const GramSide* sides, int64_t count, int64_t nvec,
                        const double* const* X, const int64_t* ldx, double* const* Y,
                        const int64_t* ldy, int num_threads) {
  if (count <= 0) return;
  for (int64_t i = 0; i < count; ++i) check_view(mats[i]);  // throw before any parallel region
  if (count >= 2 * int64_t(num_threads) || num_threads <= 1) {
    // Enough matrices to keep every thread busy: one matrix per thread, serial inside.
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1)
    for (int64_t i = 0; i < count; ++i)
      gram_apply(mats[i], sides[i], nvec, X[i], ldx[i], Y[i], ldy[i], nullptr, 0, 1);
  } else {
    for (int64_t i = 0; i < count; ++i)
      gram_apply(mats[i], sides[i], nvec, X[i], ldx[i], Y[i], ldy[i], nullptr, 0, num_threads);
  }
}

void frobenius_scan(const MatrixView* mats, int64_t count, double* frob_sq, int64_t* nonfinite,
                    int num_threads) {
  for (int64_t i = 0; i < count; ++i) check_view(mats[i]);  // throw before any parallel region
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1 && count > 1)
  for (int64_t i = 0; i < count; ++i) {
    const MatrixView& W = mats[i];
    SPECFAST_DISPATCH(W.dtype, T, [&] {
      kernels<T>().scan(data_as<T>(W), W.row_stride, W.rows, W.cols, frob_sq + i, nonfinite + i);
    });
  }
}

const char* cpu_kernel_isa() {
  switch (active_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2+fma+f16c";
    default: return "portable";
  }
}

}  // namespace specfast
