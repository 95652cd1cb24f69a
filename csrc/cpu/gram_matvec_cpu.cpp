// Fused Gram products on the CPU.
//
// Math: Right side  Y = W^T (W X)  as  Y = sum_r (W_r . X) W_r^T  (W_r the r-th row);
//       Left side   Y = W (W^T X)  as  T = sum_r X[r] W_r^T, then Y[r] = W_r . T.
// Mapping: rows are cut into a fixed number of tiles (a function of the shape only, never of the
//   thread count); each tile accumulates into its own partial vector and partials are summed in
//   tile order, so the result is bit-identical for any number of threads.
// Bytes moved: Right reads each element of W once per product (a 4-row block is read for the 4
//   dot products and re-read from L1/L2 for the rank-4 update); Left reads W twice.
// Accumulation: float64 (storage fp32/fp16/bf16/fp64 is widened in registers, never copied).
// Vector width: function multiversioning (AVX-512 / AVX2+F16C / baseline), chosen at load time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "specfast/check.h"
#include "specfast/ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPECFAST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPECFAST_MULTIVERSION
#endif

namespace specfast {
namespace {

inline double ld(const float* p, int64_t j) { return static_cast<double>(p[j]); }
inline double ld(const double* p, int64_t j) { return p[j]; }
inline double ld(const bf16_t* p, int64_t j) { return static_cast<double>(bf16_to_float(p[j].bits)); }
inline double ld(const f16_t* p, int64_t j) {
#if defined(__FLT16_MAX__)
  _Float16 h;
  std::memcpy(&h, &p[j].bits, 2);
  return static_cast<double>(static_cast<float>(h));
#else
  return static_cast<double>(f16_to_float(p[j].bits));
#endif
}

// Right side over rows [r0, r1): Y[c] += sum_r (W_r . X[c]) W_r ; WX[c][r] = W_r . X[c].
template <typename T>
inline __attribute__((always_inline)) void right_rows_impl(const T* W, int64_t lda, int64_t r0,
                                                           int64_t r1, int64_t n, int64_t nvec,
                                                           const double* X, int64_t ldx, double* Y,
                                                           int64_t ldy, double* WX, int64_t ldwx) {
  constexpr int R = 4;
  double t[R];
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const T* w0 = W + r * lda;
    const T* w1 = w0 + lda;
    const T* w2 = w1 + lda;
    const T* w3 = w2 + lda;
    for (int64_t c = 0; c < nvec; ++c) {
      const double* x = X + c * ldx;
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = 0; j < n; ++j) {
        const double xj = x[j];
        s0 += ld(w0, j) * xj;
        s1 += ld(w1, j) * xj;
        s2 += ld(w2, j) * xj;
        s3 += ld(w3, j) * xj;
      }
      t[0] = s0; t[1] = s1; t[2] = s2; t[3] = s3;
      if (WX) {
        double* wx = WX + c * ldwx + r;
        wx[0] = s0; wx[1] = s1; wx[2] = s2; wx[3] = s3;
      }
      double* y = Y + c * ldy;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        y[j] += t[0] * ld(w0, j) + t[1] * ld(w1, j) + t[2] * ld(w2, j) + t[3] * ld(w3, j);
      }
    }
  }
  for (; r < r1; ++r) {
    const T* w0 = W + r * lda;
    for (int64_t c = 0; c < nvec; ++c) {
      const double* x = X + c * ldx;
      double s0 = 0;
#pragma omp simd reduction(+ : s0)
      for (int64_t j = 0; j < n; ++j) s0 += ld(w0, j) * x[j];
      if (WX) WX[c * ldwx + r] = s0;
      double* y = Y + c * ldy;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) y[j] += s0 * ld(w0, j);
    }
  }
}

// Left side, phase 1 over rows [r0, r1): Tacc[c] += sum_r X[c][r] W_r.
template <typename T>
inline __attribute__((always_inline)) void left_accumulate_impl(const T* W, int64_t lda, int64_t r0,
                                                                int64_t r1, int64_t n, int64_t nvec,
                                                                const double* X, int64_t ldx,
                                                                double* Tacc, int64_t ldt) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const T* w0 = W + r * lda;
    const T* w1 = w0 + lda;
    const T* w2 = w1 + lda;
    const T* w3 = w2 + lda;
    for (int64_t c = 0; c < nvec; ++c) {
      const double* x = X + c * ldx + r;
      const double a0 = x[0], a1 = x[1], a2 = x[2], a3 = x[3];
      double* tc = Tacc + c * ldt;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        tc[j] += a0 * ld(w0, j) + a1 * ld(w1, j) + a2 * ld(w2, j) + a3 * ld(w3, j);
    }
  }
  for (; r < r1; ++r) {
    const T* w0 = W + r * lda;
    for (int64_t c = 0; c < nvec; ++c) {
      const double a0 = X[c * ldx + r];
      double* tc = Tacc + c * ldt;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) tc[j] += a0 * ld(w0, j);
    }
  }
}

// Left side, phase 2 over rows [r0, r1): Y[c][r] = W_r . Tacc[c].
template <typename T>
inline __attribute__((always_inline)) void left_dots_impl(const T* W, int64_t lda, int64_t r0,
                                                          int64_t r1, int64_t n, int64_t nvec,
                                                          const double* Tacc, int64_t ldt, double* Y,
                                                          int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* w0 = W + r * lda;
    for (int64_t c = 0; c < nvec; ++c) {
      const double* tc = Tacc + c * ldt;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < n; ++j) s += ld(w0, j) * tc[j];
      Y[c * ldy + r] = s;
    }
  }
}

// One multiversioned entry per (phase, dtype): the always_inline bodies are compiled per target.
#define SPECFAST_DEFINE_KERNELS(T, SUFFIX)                                                           \
  SPECFAST_MULTIVERSION void right_rows_##SUFFIX(const T* W, int64_t lda, int64_t r0, int64_t r1,   \
                                                 int64_t n, int64_t nvec, const double* X,          \
                                                 int64_t ldx, double* Y, int64_t ldy, double* WX,   \
                                                 int64_t ldwx) {                                    \
    right_rows_impl<T>(W, lda, r0, r1, n, nvec, X, ldx, Y, ldy, WX, ldwx);                          \
  }                                                                                                 \
  SPECFAST_MULTIVERSION void left_accumulate_##SUFFIX(const T* W, int64_t lda, int64_t r0,          \
                                                      int64_t r1, int64_t n, int64_t nvec,          \
                                                      const double* X, int64_t ldx, double* Tacc,   \
                                                      int64_t ldt) {                                \
    left_accumulate_impl<T>(W, lda, r0, r1, n, nvec, X, ldx, Tacc, ldt);                            \
  }                                                                                                 \
  SPECFAST_MULTIVERSION void left_dots_##SUFFIX(const T* W, int64_t lda, int64_t r0, int64_t r1,    \
                                                int64_t n, int64_t nvec, const double* Tacc,        \
                                                int64_t ldt, double* Y, int64_t ldy) {              \
    left_dots_impl<T>(W, lda, r0, r1, n, nvec, Tacc, ldt, Y, ldy);                                  \
  }

SPECFAST_DEFINE_KERNELS(float, f32)
SPECFAST_DEFINE_KERNELS(double, f64)
SPECFAST_DEFINE_KERNELS(bf16_t, bf16)
SPECFAST_DEFINE_KERNELS(f16_t, f16)
#undef SPECFAST_DEFINE_KERNELS

void right_rows(const MatrixView& W, int64_t r0, int64_t r1, int64_t nvec, const double* X,
                int64_t ldx, double* Y, int64_t ldy, double* WX, int64_t ldwx) {
  switch (W.dtype) {
    case DType::F32: return right_rows_f32(static_cast<const float*>(W.data), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Y, ldy, WX, ldwx);
    case DType::F64: return right_rows_f64(static_cast<const double*>(W.data), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Y, ldy, WX, ldwx);
    case DType::BF16: return right_rows_bf16(static_cast<const bf16_t*>(W.data), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Y, ldy, WX, ldwx);
    case DType::F16: return right_rows_f16(static_cast<const f16_t*>(W.data), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Y, ldy, WX, ldwx);
  }
}

void left_accumulate(const MatrixView& W, int64_t r0, int64_t r1, int64_t nvec, const double* X,
                     int64_t ldx, double* Tacc, int64_t ldt) {
  switch (W.dtype) {
    case DType::F32: return left_accumulate_f32(static_cast<const float*>(W.data), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Tacc, ldt);
    case DType::F64: return left_accumulate_f64(static_cast<const double*>(W.data), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Tacc, ldt);
    case DType::BF16: return left_accumulate_bf16(static_cast<const bf16_t*>(W.data), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Tacc, ldt);
    case DType::F16: return left_accumulate_f16(static_cast<const f16_t*>(W.data), W.row_stride, r0, r1, W.cols, nvec, X, ldx, Tacc, ldt);
  }
}

void left_dots(const MatrixView& W, int64_t r0, int64_t r1, int64_t nvec, const double* Tacc,
               int64_t ldt, double* Y, int64_t ldy) {
  switch (W.dtype) {
    case DType::F32: return left_dots_f32(static_cast<const float*>(W.data), W.row_stride, r0, r1, W.cols, nvec, Tacc, ldt, Y, ldy);
    case DType::F64: return left_dots_f64(static_cast<const double*>(W.data), W.row_stride, r0, r1, W.cols, nvec, Tacc, ldt, Y, ldy);
    case DType::BF16: return left_dots_bf16(static_cast<const bf16_t*>(W.data), W.row_stride, r0, r1, W.cols, nvec, Tacc, ldt, Y, ldy);
    case DType::F16: return left_dots_f16(static_cast<const f16_t*>(W.data), W.row_stride, r0, r1, W.cols, nvec, Tacc, ldt, Y, ldy);
  }
}

// Number of row tiles: a function of the shape only (never of the thread count), so the
// reduction order, and hence every bit of the result, is the same for any number of threads.
// Partial buffers are capped at a quarter of the matrix bytes so the reduction stays cheap.
int64_t num_tiles(const MatrixView& W, int64_t partial_len, int64_t nvec) {
  const int64_t by_rows = std::max<int64_t>(1, W.rows / 16);
  const double wbytes = double(W.rows) * double(W.cols) * double(dtype_size(W.dtype));
  const double per_tile = double(partial_len) * double(nvec) * 8.0;
  const int64_t by_mem = std::max<int64_t>(1, int64_t(wbytes / 4.0 / std::max(per_tile, 1.0)));
  return std::min<int64_t>({64, by_rows, by_mem});
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
  const int64_t partial_len = n;  // both sides accumulate length-n partials
  const int64_t tiles = num_tiles(W, partial_len, nvec);
  const int64_t rows_per_tile = (m + tiles - 1) / tiles;
  const bool parallel = num_threads > 1 && tiles > 1;

  if (side == GramSide::Right && tiles == 1) {
    right_rows(W, 0, m, nvec, X, ldx, Y, ldy, WX, ldwx);
    return;
  }
  // Partial accumulators, one per tile; tile 0 accumulates straight into the output (Right) or
  // into the first partial (Left).
  std::vector<double> partial(size_t(tiles) * size_t(nvec) * size_t(n), 0.0);
  auto part = [&](int64_t t) { return partial.data() + size_t(t) * size_t(nvec) * size_t(n); };

#pragma omp parallel for schedule(static, 1) num_threads(num_threads) if (parallel)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * rows_per_tile, r1 = std::min(m, r0 + rows_per_tile);
    if (r0 >= r1) continue;
    if (side == GramSide::Right)
      right_rows(W, r0, r1, nvec, X, ldx, part(t), n, WX, ldwx);
    else
      left_accumulate(W, r0, r1, nvec, X, ldx, part(t), n);
  }
  // Reduce partials in tile order, parallel over column chunks.
  const int64_t chunk = 1024;
  const int64_t nchunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel && nchunks > 1)
  for (int64_t q = 0; q < nchunks * nvec; ++q) {
    const int64_t c = q / nchunks, j0 = (q % nchunks) * chunk, j1 = std::min(n, j0 + chunk);
    double* dst = part(0) + c * n;
    for (int64_t t = 1; t < tiles; ++t) {
      const double* src = part(t) + c * n;
      for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
    }
  }
  if (side == GramSide::Right) {
    for (int64_t c = 0; c < nvec; ++c) std::memcpy(Y + c * ldy, part(0) + c * n, sizeof(double) * n);
    return;
  }
  if (WX)
    for (int64_t c = 0; c < nvec; ++c) std::memcpy(WX + c * ldwx, part(0) + c * n, sizeof(double) * n);
  // Left phase 2: Y[c][r] = W_r . T[c], disjoint rows per tile.
#pragma omp parallel for schedule(static, 1) num_threads(num_threads) if (parallel)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * rows_per_tile, r1 = std::min(m, r0 + rows_per_tile);
    if (r0 < r1) left_dots(W, r0, r1, nvec, part(0), n, Y, ldy);
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

namespace {
template <typename T>
inline __attribute__((always_inline)) void scan_impl(const T* W, int64_t lda, int64_t m, int64_t n,
                                                     double* fro, int64_t* bad) {
  double s = 0;
  int64_t nb = 0;
  for (int64_t r = 0; r < m; ++r) {
    const T* w = W + r * lda;
    double sr = 0;
    int64_t br = 0;
#pragma omp simd reduction(+ : sr, br)
    for (int64_t j = 0; j < n; ++j) {
      const double v = ld(w, j);
      const bool finite = std::isfinite(v);
      sr += finite ? v * v : 0.0;
      br += finite ? 0 : 1;
    }
    s += sr;
    nb += br;
  }
  *fro = s;
  *bad = nb;
}
SPECFAST_MULTIVERSION void scan_f32(const float* W, int64_t lda, int64_t m, int64_t n, double* f, int64_t* b) { scan_impl(W, lda, m, n, f, b); }
SPECFAST_MULTIVERSION void scan_f64(const double* W, int64_t lda, int64_t m, int64_t n, double* f, int64_t* b) { scan_impl(W, lda, m, n, f, b); }
SPECFAST_MULTIVERSION void scan_bf16(const bf16_t* W, int64_t lda, int64_t m, int64_t n, double* f, int64_t* b) { scan_impl(W, lda, m, n, f, b); }
SPECFAST_MULTIVERSION void scan_f16(const f16_t* W, int64_t lda, int64_t m, int64_t n, double* f, int64_t* b) { scan_impl(W, lda, m, n, f, b); }
}  // namespace

void frobenius_scan(const MatrixView* mats, int64_t count, double* frob_sq, int64_t* nonfinite,
                    int num_threads) {
  for (int64_t i = 0; i < count; ++i) check_view(mats[i]);  // throw before any parallel region
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1 && count > 1)
  for (int64_t i = 0; i < count; ++i) {
    const MatrixView& W = mats[i];
    switch (W.dtype) {
      case DType::F32: scan_f32(static_cast<const float*>(W.data), W.row_stride, W.rows, W.cols, frob_sq + i, nonfinite + i); break;
      case DType::F64: scan_f64(static_cast<const double*>(W.data), W.row_stride, W.rows, W.cols, frob_sq + i, nonfinite + i); break;
      case DType::BF16: scan_bf16(static_cast<const bf16_t*>(W.data), W.row_stride, W.rows, W.cols, frob_sq + i, nonfinite + i); break;
      case DType::F16: scan_f16(static_cast<const f16_t*>(W.data), W.row_stride, W.rows, W.cols, frob_sq + i, nonfinite + i); break;
    }
  }
}

}  // namespace specfast
