// Small dense symmetric eigenproblems (the projected matrices of the Krylov solvers, n <= a few
// hundred). Householder tridiagonalisation followed by the implicit QL algorithm with Wilkinson-type
// shifts (Golub & Van Loan, sec. 8.3; the classic tred2/tqli formulation). O(n^3) flops, float64.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <numeric>
#include <vector>

#include "specfast/ops.h"

namespace specfast {
namespace {

// Reduce the symmetric matrix a (n x n, row-major, overwritten by the orthogonal transform) to
// tridiagonal form: diagonal d, sub-diagonal e[1..n-1] (e[0] = 0).
void householder_tridiagonalize(int64_t n, double* a, double* d, double* e) {
  auto A = [&](int64_t i, int64_t j) -> double& { return a[i * n + j]; };
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t l = i - 1;
    double h = 0.0, scale = 0.0;
    if (l > 0) {
      for (int64_t k = 0; k <= l; ++k) scale += std::fabs(A(i, k));
      if (scale == 0.0) {
        e[i] = A(i, l);
      } else {
        for (int64_t k = 0; k <= l; ++k) {
          A(i, k) /= scale;
          h += A(i, k) * A(i, k);
        }
        double f = A(i, l);
        double g = f >= 0.0 ? -std::sqrt(h) : std::sqrt(h);
        e[i] = scale * g;
        h -= f * g;
        A(i, l) = f - g;
        f = 0.0;
        for (int64_t j = 0; j <= l; ++j) {
          A(j, i) = A(i, j) / h;
          g = 0.0;
          for (int64_t k = 0; k <= j; ++k) g += A(j, k) * A(i, k);
          for (int64_t k = j + 1; k <= l; ++k) g += A(k, j) * A(i, k);
          e[j] = g / h;
          f += e[j] * A(i, j);
        }
        const double hh = f / (h + h);
        for (int64_t j = 0; j <= l; ++j) {
          f = A(i, j);
          e[j] = g = e[j] - hh * f;
          for (int64_t k = 0; k <= j; ++k) A(j, k) -= (f * e[k] + g * A(i, k));
        }
      }
    } else {
      e[i] = A(i, l);
    }
    d[i] = h;
  }
  d[0] = 0.0;
  e[0] = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (d[i] != 0.0) {
      for (int64_t j = 0; j < i; ++j) {
        double g = 0.0;
        for (int64_t k = 0; k < i; ++k) g += A(i, k) * A(k, j);
        for (int64_t k = 0; k < i; ++k) A(k, j) -= g * A(k, i);
      }
    }
    d[i] = A(i, i);
    A(i, i) = 1.0;
    for (int64_t j = 0; j < i; ++j) A(j, i) = A(i, j) = 0.0;
  }
}

// Implicit QL on the tridiagonal (d, e); z (n x n row-major) accumulates the rotations, so on
// entry it holds the tridiagonalising transform and on exit column j is eigenvector j.
bool tridiagonal_ql(int64_t n, double* d, double* e, double* z) {
  for (int64_t i = 1; i < n; ++i) e[i - 1] = e[i];
  if (n > 0) e[n - 1] = 0.0;
  for (int64_t l = 0; l < n; ++l) {
    int iter = 0;
    int64_t m;
    do {
      for (m = l; m < n - 1; ++m) {
        const double dd = std::fabs(d[m]) + std::fabs(d[m + 1]);
        if (std::fabs(e[m]) <= DBL_EPSILON * dd) break;
      }
      if (m != l) {
        if (iter++ == 100) return false;
        double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
        double r = std::hypot(g, 1.0);
        g = d[m] - d[l] + e[l] / (g + std::copysign(r, g));
        double s = 1.0, c = 1.0, p = 0.0;
        int64_t i;
        for (i = m - 1; i >= l; --i) {
          double f = s * e[i];
          const double b = c * e[i];
          e[i + 1] = (r = std::hypot(f, g));
          if (r == 0.0) {
            d[i + 1] -= p;
            e[m] = 0.0;
            break;
          }
          s = f / r;
          c = g / r;
          g = d[i + 1] - p;
          r = (d[i] - g) * s + 2.0 * c * b;
          d[i + 1] = g + (p = s * r);
          g = c * r - b;
          for (int64_t k = 0; k < n; ++k) {
            f = z[k * n + i + 1];
            z[k * n + i + 1] = s * z[k * n + i] + c * f;
            z[k * n + i] = c * z[k * n + i] - s * f;
          }
        }
        if (r == 0.0 && i >= l) continue;
        d[l] -= p;
        e[l] = g;
        e[m] = 0.0;
      }
    } while (m != l);
  }
  return true;
}

}  // namespace

bool sym_eig(int64_t n, const double* A, int64_t lda, double* evals, double* evecs) {
  if (n <= 0) return true;
  std::vector<double> z(size_t(n) * n), d(n), e(n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) z[i * n + j] = 0.5 * (A[i * lda + j] + A[j * lda + i]);
  householder_tridiagonalize(n, z.data(), d.data(), e.data());
  if (!tridiagonal_ql(n, d.data(), e.data(), z.data())) return false;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return d[a] > d[b]; });
  for (int64_t j = 0; j < n; ++j) {
    evals[j] = d[order[j]];
    for (int64_t i = 0; i < n; ++i) evecs[i * n + j] = z[i * n + order[j]];
  }
  return true;
}

}  // namespace specfast
