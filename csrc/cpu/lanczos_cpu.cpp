// Krylov solvers on the Gram operator of each matrix: thick-restart block Lanczos for extreme
// singular values with a residual certificate, and stochastic Lanczos quadrature (SLQ).
//
// Math: A = W^T W (Right) or W W^T (Left), eigenpairs (sigma_i^2, v_i). The basis Q is kept
//   orthonormal by classical Gram-Schmidt applied twice (CGS2, full reorthogonalisation); the
//   projected matrix T = Q^T A Q is filled from the orthogonalisation coefficients, so
//   A Q_p = Q_p T_p + X R E_last^T holds with X the next block. The Ritz residual of pair i is
//   ||R S[last block, i]||; thick restart (Wu & Simon 2000) keeps the best Ritz vectors.
//   Certificate: one extra block product computes r_i = ||A z_i - theta_i z_i|| explicitly; then
//   |lambda - theta_i| <= min(r_i, r_i^2 / gap_i) (Weyl / Kato-Temple), converted to sigma.
// Mapping: one matrix per thread when there are at least as many matrices as threads (its basis
//   stays hot in that core's cache), otherwise matrices in turn with the Gram product parallel.
// Bytes moved: one read of W per block product (Right), two (Left, used only for cache-sized W).
// Accumulation: float64 throughout.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "specfast/check.h"
#include "specfast/ops.h"

namespace specfast {

uint64_t rng_hash(uint64_t seed, uint64_t stream, uint64_t index) {
  uint64_t z = seed ^ (stream * 0x9E3779B97F4A7C15ull) ^ (index * 0xD1B54A32D192ED03ull);
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double rng_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  // 53 random bits -> (-1, 1), never exactly 0
  const double u = (double((rng_hash(seed, stream, index) >> 11)) + 0.5) * (1.0 / 9007199254740992.0);
  return 2.0 * u - 1.0;
}

GramSide choose_side(int64_t m, int64_t n, DType dtype, bool largest) {
  // Smallest singular values must be sought on the side whose Gram matrix has no structural
  // zero eigenvalues, i.e. the smaller dimension.
  if (!largest) return m < n ? GramSide::Left : GramSide::Right;
  // Largest: Right reads W once per product; Left reads it twice but works with shorter vectors.
  // Left wins when m << n and W fits in cache (both passes then come from cache).
  const double bytes = double(m) * double(n) * double(dtype_size(dtype));
  if (m * 2 <= n && bytes <= 8.0 * 1024 * 1024) return GramSide::Left;
  return GramSide::Right;
}

namespace {

// Gram operators of at most this dimension are formed explicitly and solved densely: cheaper than
// a Krylov run that would need about as many products anyway (measured on 1000 x 16 x 16).
constexpr int64_t kDenseDim = 32;

// A neighbouring Ritz value counts as resolved when its residual is below this fraction of its
// separation from the value being certified (see lambda_bound).
constexpr double kResolved = 0.05;

double dot(const double* a, const double* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s2) + (s1 + s3);
}

double nrm2(const double* a, int64_t n) {
  // scaled to avoid overflow/underflow in the squares
  double amax = 0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(a[i]));
  if (amax == 0 || !std::isfinite(amax)) return amax;
  double s = 0;
  const double inv = 1.0 / amax;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += (a[i] * inv) * (a[i] * inv);
  return amax * std::sqrt(s);
}

bool all_finite(const double* a, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(a[i]);
  return ok;
}

// Y[c] -= sum_i H[i][c] q_i with H = Q^T Y, applied twice (block classical Gram-Schmidt, "BCGS2").
// Each pass streams Q twice whatever the number of columns, which matters once the basis outgrows
// the cache (e.g. 48 vectors of length 14336 = 5.5 MB). Accumulates H into acc[i * lda + c].
void block_cgs2(const double* Q, int64_t nq, int64_t dim, double* Y, int64_t ncols, double* acc,
                int64_t lda) {
  if (nq == 0 || ncols == 0) return;
  std::vector<double> H(size_t(nq) * ncols);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t c = 0; c < ncols; ++c) H[i * ncols + c] = dot(Q + i * dim, Y + c * dim, dim);
    for (int64_t i = 0; i < nq; ++i) {
      const double* q = Q + i * dim;
      for (int64_t c = 0; c < ncols; ++c) {
        const double h = H[i * ncols + c];
        double* y = Y + c * dim;
#pragma omp simd
        for (int64_t t = 0; t < dim; ++t) y[t] -= h * q[t];
        if (acc) acc[i * lda + c] += h;
      }
    }
  }
}

// Single-vector CGS2 against Q[0:nq]; coefficients accumulated into acc[i].
void cgs2(const double* Q, int64_t nq, int64_t dim, double* y, double* acc) {
  block_cgs2(Q, nq, dim, y, 1, acc, 1);
}

struct Solver {
  const MatrixView& W;
  const KrylovParams& p;
  const KrylovOut& out;
  int64_t matrix_index;
  int threads;

  GramSide side;
  int64_t dim, k, b, maxb;
  std::vector<double> Q, AY, Xn, R, T, Tw, S, theta, res;
  int64_t processed = 0;  // vectors of Q whose product with A has been taken
  int64_t iters = 0;
  uint64_t refill = 0;
  double dropped = 0;  // norm of residual components dropped at rank-deficient breakdowns

  Solver(const MatrixView& W_, const KrylovParams& p_, const KrylovOut& out_, int64_t idx, int nt)
      : W(W_), p(p_), out(out_), matrix_index(idx), threads(nt) {}

  void apply(int64_t nvec, const double* X, double* Y, double* WX, int64_t ldwx) {
    gram_apply(W, side, nvec, X, dim, Y, dim, WX, ldwx, threads);
  }

  // Fill v (orthogonal to Q[0:nq]) with a fresh random unit vector. False if no room is left.
  bool random_orthogonal(double* v, const double* Qs, int64_t nq) {
    if (nq >= dim) return false;
    for (int attempt = 0; attempt < 3; ++attempt) {
      const uint64_t stream = (uint64_t(matrix_index) << 20) + 0x1000 + refill++;
      for (int64_t t = 0; t < dim; ++t) v[t] = rng_uniform(p.seed, stream, uint64_t(t));
      cgs2(Qs, nq, dim, v, nullptr);
      const double nv = nrm2(v, dim);
      if (nv > 1e-8) {
        for (int64_t t = 0; t < dim; ++t) v[t] /= nv;
        return true;
      }
    }
    return false;
  }

  // Orthonormalise the blk columns of AY against Q[0:jdim] and each other. Coefficients against Q
  // go to T[:, col0 + c]; the block's own triangle to R (b x b, row-major). Returns the number of
  // new vectors written to Xn.
  int64_t expand(int64_t jdim, int64_t col0, int64_t blk, double scale) {
    std::fill(R.begin(), R.end(), 0.0);
    // Against the basis, all columns at once; coefficients straight into T[:, col0 + c].
    std::vector<double> accq(size_t(jdim) * blk, 0.0);
    block_cgs2(Q.data(), jdim, dim, AY.data(), blk, accq.data(), blk);
    for (int64_t i = 0; i < jdim; ++i)
      for (int64_t c = 0; c < blk; ++c) T[i * maxb + col0 + c] = accq[i * blk + c];
    // Then within the block, column by column.
    int64_t nb = 0;
    std::vector<double> accx(blk);
    for (int64_t c = 0; c < blk; ++c) {
      double* y = AY.data() + c * dim;
      std::fill(accx.begin(), accx.end(), 0.0);
      if (nb > 0) cgs2(Xn.data(), nb, dim, y, accx.data());
      for (int64_t i = 0; i < nb; ++i) R[i * b + c] = accx[i];
      if (jdim + nb >= dim) {  // the basis spans everything: the residual is rounding noise
        dropped = std::max(dropped, nrm2(y, dim));
        continue;
      }
      const double ny = nrm2(y, dim);
      double* x = Xn.data() + nb * dim;
      if (ny > 1e-12 * scale && ny > 0) {
        for (int64_t t = 0; t < dim; ++t) x[t] = y[t] / ny;
        R[nb * b + c] = ny;
        ++nb;
      } else {
        // Invariant subspace found (rank deficiency): continue from a fresh random direction.
        dropped = std::max(dropped, ny);
        std::vector<double> both((jdim + nb) * dim);
        std::memcpy(both.data(), Q.data(), sizeof(double) * jdim * dim);
        std::memcpy(both.data() + jdim * dim, Xn.data(), sizeof(double) * nb * dim);
        if (random_orthogonal(x, both.data(), jdim + nb)) {
          R[nb * b + c] = 0.0;
          ++nb;
        }
      }
    }
    return nb;
  }

  // Ritz values/vectors of the projected matrix T[0:np, 0:np], in wanted order.
  bool ritz(int64_t np) {
    for (int64_t i = 0; i < np; ++i)
      for (int64_t j = 0; j < np; ++j) Tw[i * np + j] = T[i * maxb + j];
    if (!sym_eig(np, Tw.data(), np, theta.data(), S.data())) return false;  // descending
    if (!p.largest) {  // ascending for the smallest end: reverse columns
      for (int64_t j = 0; j < np / 2; ++j) {
        std::swap(theta[j], theta[np - 1 - j]);
        for (int64_t i = 0; i < np; ++i) std::swap(S[i * np + j], S[i * np + np - 1 - j]);
      }
    }
    return true;
  }

  // Z[i] = Q[0:np] S[:, i] for the first `count` Ritz pairs (each basis vector read once).
  void ritz_vectors(int64_t np, int64_t count, std::vector<double>& Z) const {
    Z.assign(size_t(count) * dim, 0.0);
    for (int64_t j = 0; j < np; ++j) {
      const double* q = Q.data() + j * dim;
      for (int64_t i = 0; i < count; ++i) {
        const double s = S[j * np + i];
        double* z = Z.data() + i * dim;
#pragma omp simd
        for (int64_t t = 0; t < dim; ++t) z[t] += s * q[t];
      }
    }
  }

  // Residual norms of all Ritz pairs from the Lanczos relation: ||R S[last rows, i]||.
  void ritz_residuals(int64_t np, int64_t last0, int64_t blk) {
    for (int64_t i = 0; i < np; ++i) {
      double s2 = 0;
      for (int64_t r = 0; r < b; ++r) {
        double acc = 0;
        for (int64_t c = 0; c < blk; ++c) acc += R[r * b + c] * S[(last0 + c) * np + i];
        s2 += acc * acc;
      }
      res[i] = std::sqrt(s2) + dropped;
    }
  }

  // Eigenvalue error bound for Ritz pair i among np, given residuals rr (first-order) and the
  // neighbouring Ritz values; plus a rounding floor.
  double lambda_bound(int64_t i, int64_t np, const double* th, const double* rr, double floor_) const {
    // Kato-Temple needs the distance from theta_i to every other eigenvalue. A neighbouring Ritz
    // value only stands for "its" eigenvalue once it is resolved (its own residual is a small
    // fraction of the separation); before that an eigenvalue may still hide between them, so the
    // bound stays first-order. Beyond the last Ritz value nothing is known unless the basis spans
    // the whole space.
    const double r = rr[i];
    double gap = INFINITY;
    auto neighbour = [&](int64_t j) {
      const double sep = std::fabs(th[i] - th[j]);
      if (rr[j] <= kResolved * sep) gap = std::min(gap, sep - rr[j]);
      else gap = 0;
    };
    if (i > 0) neighbour(i - 1);
    if (i + 1 < np) neighbour(i + 1);
    else if (np < dim) gap = 0;
    double e = r;
    if (gap > 0 && std::isfinite(gap)) e = std::min(e, r * r / gap);
    return e + floor_;  // rounding floor of the float64 Gram products, never squared away
  }

  static double sigma_bound(double theta_i, double sig, double e) {
    const double hi = std::sqrt(std::max(theta_i, 0.0) + e);
    const double lo = std::sqrt(std::max(theta_i - e, 0.0));
    return std::max(hi - sig, sig - lo);
  }

  // Absolute slack of the convergence test: the sigma-uncertainty that the rounding floor of the
  // Gram products alone induces (about floor/(2 sigma) for large sigma, sqrt(floor) for sigma ~ 0,
  // the resolution of any Gram-based method). A value known to that floor counts as converged;
  // its reported bound still says how much is known.
  static double allowance(double theta_i, double sig, double floor_) {
    return 2.0 * sigma_bound(theta_i, sig, floor_);
  }

  bool converged_all(int64_t np, double floor_) {
    const int64_t kk = std::min(k, np);
    if (kk < k) return false;
    for (int64_t i = 0; i < kk; ++i) {
      const double e = lambda_bound(i, np, theta.data(), res.data(), floor_);
      const double sig = std::sqrt(std::max(theta[i], 0.0));
      const double eb = sigma_bound(theta[i], sig, e);
      if (!(eb <= p.tol * sig + allowance(theta[i], sig, floor_))) return false;
    }
    return true;
  }

  void run() {
    const int64_t m = W.rows, n = W.cols;
    side = choose_side(m, n, W.dtype, p.largest);
    dim = side == GramSide::Right ? n : m;
    k = std::min<int64_t>(p.k, std::min(m, n));
    *out.iters = 0;
    *out.converged = 0;
    *out.status = kOk;
    if (k <= 0) { *out.converged = 1; return; }
    if (dim <= kDenseDim) {  // tiny Gram operator: form it and solve it exactly
      allocate(dim, dim);
      dense_path();
      return;
    }
    const int64_t blk0 = std::max<int64_t>(1, std::min(p.block, dim));
    allocate(std::min<int64_t>(dim, std::max<int64_t>(p.max_basis, k + 2 * blk0 + 2)), blk0);
    // Start block: counter-based random vectors, orthonormalised.
    int64_t jdim = 0;
    for (int64_t c = 0; c < b; ++c) {
      double* q = Q.data() + jdim * dim;
      const uint64_t stream = uint64_t(matrix_index) << 20;
      for (int64_t t = 0; t < dim; ++t) q[t] = rng_uniform(p.seed, stream, uint64_t(c * dim + t));
      cgs2(Q.data(), jdim, dim, q, nullptr);
      const double nq = nrm2(q, dim);
      for (int64_t t = 0; t < dim; ++t) q[t] /= nq;
      ++jdim;
    }
    processed = 0;
    double scale = 0;             // running estimate of ||A|| for breakdown tests
    double work_since_check = 0;  // flops since the last Ritz check
    const double flops_per_vec = 4.0 * double(m) * double(n);  // one Gram product, either side
    bool have_ritz = false;
    int64_t np = 0;

    while (true) {
      const int64_t blk = jdim - processed;
      apply(blk, Q.data() + processed * dim, AY.data(), nullptr, 0);
      ++iters;
      if (!all_finite(AY.data(), blk * dim)) { *out.status = kNonFinite; break; }
      for (int64_t c = 0; c < blk; ++c) scale = std::max(scale, nrm2(AY.data() + c * dim, dim));
      const int64_t col0 = processed;
      const int64_t nb = expand(jdim, col0, blk, scale);
      processed = jdim;
      np = processed;
      work_since_check += flops_per_vec * double(blk) + 8.0 * double(jdim) * double(dim) * double(blk);
      // Fill the sub-diagonal block of T for the new vectors (row jdim + r, columns of this block).
      const bool room = processed + nb <= maxb;
      const bool exhausted = (nb == 0);
      const double eig_cost = 10.0 * double(np) * double(np) * double(np);
      const bool must_check = !room || exhausted || iters >= p.max_iter;
      have_ritz = false;
      if (np >= k && (must_check || work_since_check >= eig_cost)) {
        work_since_check = 0;
        if (!ritz(np)) { *out.status = kEigFailed; break; }
        have_ritz = true;
        ritz_residuals(np, col0, blk);
        const double floor_ = 8.0 * DBL_EPSILON * std::sqrt(double(dim)) * std::max(std::fabs(theta[0]), std::fabs(theta[np - 1]));
        if (exhausted || converged_all(np, floor_) || iters >= p.max_iter) break;
      }
      if (exhausted) break;  // no new direction: the basis spans the space (np >= k was checked above)
      if (room) {
        std::memcpy(Q.data() + jdim * dim, Xn.data(), sizeof(double) * nb * dim);
        for (int64_t r = 0; r < nb; ++r)
          for (int64_t c = 0; c < blk; ++c) T[(jdim + r) * maxb + col0 + c] = R[r * b + c];
        jdim += nb;
        continue;
      }
      // Thick restart: keep the best Ritz vectors, then the new block.
      if (!have_ritz) {
        if (!ritz(np)) { *out.status = kEigFailed; break; }
        ritz_residuals(np, col0, blk);
      }
      int64_t keep = k + (maxb - k - b) / 2;
      keep = std::max<int64_t>(k, std::min<int64_t>({keep, np - 1, maxb - nb}));
      std::vector<double> Z;
      ritz_vectors(np, keep, Z);
      std::memcpy(Q.data(), Z.data(), sizeof(double) * keep * dim);
      std::memcpy(Q.data() + keep * dim, Xn.data(), sizeof(double) * nb * dim);
      std::fill(T.begin(), T.end(), 0.0);
      for (int64_t i = 0; i < keep; ++i) T[i * maxb + i] = theta[i];
      for (int64_t r = 0; r < nb; ++r)
        for (int64_t i = 0; i < keep; ++i) {
          double acc = 0;
          for (int64_t c = 0; c < blk; ++c) acc += R[r * b + c] * S[(col0 + c) * np + i];
          T[(keep + r) * maxb + i] = acc;
        }
      processed = keep;
      jdim = keep + nb;
    }
    *out.iters = iters;
    if (*out.status != kOk) {
      for (int64_t i = 0; i < p.k; ++i) { out.sigma[i] = NAN; out.bound[i] = INFINITY; }
      return;
    }
    if (!have_ritz) {
      if (!ritz(np)) { *out.status = kEigFailed; return; }
    }
    finalize(np);
  }

  // Workspace for a basis of `basis` vectors grown `block` vectors at a time.
  void allocate(int64_t basis, int64_t block) {
    maxb = basis;
    b = block;
    Q.assign(size_t(maxb) * dim, 0.0);
    AY.assign(size_t(b) * dim, 0.0);
    Xn.assign(size_t(b) * dim, 0.0);
    R.assign(size_t(b) * b, 0.0);
    T.assign(size_t(maxb) * maxb, 0.0);
    Tw.assign(size_t(maxb) * maxb, 0.0);
    S.assign(size_t(maxb) * maxb, 0.0);
    theta.assign(maxb, 0.0);
    res.assign(maxb, 0.0);
  }

  // dim <= kDenseDim: A = Q^T A Q with Q = I, built with one block product of width dim; its
  // eigenpairs are exact up to rounding, and finalize() certifies them like any Ritz pair.
  void dense_path() {
    for (int64_t i = 0; i < dim; ++i) Q[i * dim + i] = 1.0;
    apply(dim, Q.data(), AY.data(), nullptr, 0);
    iters = 1;
    *out.iters = iters;
    if (!all_finite(AY.data(), dim * dim)) {
      *out.status = kNonFinite;
      for (int64_t i = 0; i < p.k; ++i) { out.sigma[i] = NAN; out.bound[i] = INFINITY; }
      return;
    }
    for (int64_t i = 0; i < dim; ++i)
      for (int64_t j = 0; j < dim; ++j) T[i * maxb + j] = AY[j * dim + i];
    if (!ritz(dim)) { *out.status = kEigFailed; return; }
    finalize(dim);
  }

  // The residual bound assumes each Ritz value approximates "its" eigenvalue, which an
  // unconverged run has not shown. Fall back to what Rayleigh-Ritz guarantees regardless:
  // Cauchy interlacing puts the i-th largest Ritz value below the i-th largest eigenvalue (and the
  // i-th smallest above the i-th smallest), and sigma_i <= sigma_1 <= ||W||_F (one extra pass,
  // paid only by unconverged results). Largest: sigma_i in [s_i, ||W||_F]; smallest: [0, s_i].
  void widen_unconverged(int64_t kk, const double* sig) {
    if (p.largest) {
      double fro2 = 0;
      int64_t bad = 0;
      frobenius_scan(&W, 1, &fro2, &bad, threads);
      const double upper = std::sqrt(fro2);
      for (int64_t i = 0; i < kk; ++i) out.bound[i] = std::max(out.bound[i], upper - sig[i]);
    } else {
      for (int64_t i = 0; i < kk; ++i) out.bound[i] = std::max(out.bound[i], sig[i]);
    }
  }

  // Ritz vectors of the k wanted pairs, an explicit residual check (one more block product) and
  // the certificate; singular vectors on request.
  void finalize(int64_t np) {
    const int64_t m = W.rows, n = W.cols;
    const int64_t kk = std::min(k, np);
    std::vector<double> Z, AZ(size_t(kk) * dim), WZ;
    ritz_vectors(np, kk, Z);
    for (int64_t i = 0; i < kk; ++i) {
      double* z = Z.data() + i * dim;
      const double nz = nrm2(z, dim);
      for (int64_t t = 0; t < dim; ++t) z[t] /= nz;
    }
    const int64_t other = side == GramSide::Right ? m : n;
    WZ.assign(size_t(kk) * other, 0.0);
    gram_apply(W, side, kk, Z.data(), dim, AZ.data(), dim, WZ.data(), other, threads);
    std::vector<double> th(np), rr(np), sig(kk);
    for (int64_t i = 0; i < np; ++i) { th[i] = theta[i]; rr[i] = res[i]; }
    for (int64_t i = 0; i < kk; ++i) {
      const double* z = Z.data() + i * dim;
      double* az = AZ.data() + i * dim;
      const double t = dot(z, az, dim);
      for (int64_t s = 0; s < dim; ++s) az[s] -= t * z[s];
      th[i] = t;
      rr[i] = nrm2(az, dim);
      sig[i] = nrm2(WZ.data() + i * other, other);  // ||W z||: accurate even for tiny sigma
    }
    const double floor_ = 8.0 * DBL_EPSILON * std::sqrt(double(std::max(m, n))) *
                          std::max(std::fabs(th[0]), std::fabs(th[np - 1]));
    bool ok = all_finite(th.data(), np) && all_finite(rr.data(), np);
    if (!ok) *out.status = kNonFinite;
    bool conv = ok && kk == k;
    for (int64_t i = 0; i < kk; ++i) {
      const double e = lambda_bound(i, np, th.data(), rr.data(), floor_);
      out.sigma[i] = sig[i];
      const double eb = sigma_bound(th[i], sig[i], e);
      out.bound[i] = eb;
      conv = conv && (eb <= p.tol * sig[i] + allowance(th[i], sig[i], floor_));
    }
    for (int64_t i = kk; i < p.k; ++i) { out.sigma[i] = NAN; out.bound[i] = INFINITY; }
    *out.converged = conv ? 1 : 0;
    if (!conv && ok) widen_unconverged(kk, sig.data());
    if (p.want_vectors) {
      double* Vs = side == GramSide::Right ? out.V : out.U;   // the Krylov side
      double* Os = side == GramSide::Right ? out.U : out.V;   // the other side
      for (int64_t i = 0; i < kk; ++i) {
        std::memcpy(Vs + i * dim, Z.data() + i * dim, sizeof(double) * dim);
        const double inv = sig[i] > 0 ? 1.0 / sig[i] : 0.0;
        for (int64_t t = 0; t < other; ++t) Os[i * other + t] = WZ[i * other + t] * inv;
      }
    }
  }
};

}  // namespace

void krylov_svd_grouped(const MatrixView* mats, int64_t count, const KrylovParams& p,
                        const KrylovOut* outs, int num_threads) {
  SPECFAST_CHECK(p.k >= 1, "krylov: k must be >= 1, got ", p.k);
  SPECFAST_CHECK(p.block >= 1, "krylov: block must be >= 1, got ", p.block);
  SPECFAST_CHECK(p.max_iter >= 1, "krylov: max_iter must be >= 1, got ", p.max_iter);
  SPECFAST_CHECK(p.tol >= 0, "krylov: tol must be >= 0, got ", p.tol);
  for (int64_t i = 0; i < count; ++i) {
    SPECFAST_CHECK(mats[i].rows >= 1 && mats[i].cols >= 1, "krylov: matrix ", i,
                   " must be non-empty, got shape (", mats[i].rows, ", ", mats[i].cols, ")");
    SPECFAST_CHECK(mats[i].rows <= 1 || mats[i].row_stride >= mats[i].cols, "krylov: matrix ", i,
                   " row_stride ", mats[i].row_stride, " < cols ", mats[i].cols);
  }
  if (count >= int64_t(num_threads) && num_threads > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t i = 0; i < count; ++i) {
      Solver s(mats[i], p, outs[i], i, 1);
      s.run();
    }
  } else {
    for (int64_t i = 0; i < count; ++i) {
      Solver s(mats[i], p, outs[i], i, num_threads);
      s.run();
    }
  }
}

// ------------------------------------------------------------------------------------------------
// SLQ: nprobe independent Lanczos runs (full reorthogonalisation within each), advanced together
// so that every step costs one multi-vector Gram product, i.e. one pass over W for all probes.
void slq_grouped(const MatrixView* mats, int64_t count, int64_t nprobe, int64_t steps, uint64_t seed,
                 double* nodes, double* weights, int64_t* dims, int32_t* status, int num_threads) {
  SPECFAST_CHECK(nprobe >= 1, "slq: nprobe must be >= 1, got ", nprobe);
  SPECFAST_CHECK(steps >= 1, "slq: steps must be >= 1, got ", steps);
  for (int64_t i = 0; i < count; ++i)
    SPECFAST_CHECK(mats[i].rows >= 1 && mats[i].cols >= 1, "slq: matrix ", i, " must be non-empty");
  const bool outer = count >= int64_t(num_threads) && num_threads > 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (outer)
  for (int64_t mi = 0; mi < count; ++mi) {
    const MatrixView& W = mats[mi];
    const int inner_threads = outer ? 1 : num_threads;
    const GramSide side = choose_side(W.rows, W.cols, W.dtype, true);
    const int64_t dim = side == GramSide::Right ? W.cols : W.rows;
    const int64_t L = std::min(steps, dim);
    dims[mi] = dim;
    status[mi] = kOk;
    double* nd = nodes + mi * nprobe * steps;
    double* wt = weights + mi * nprobe * steps;
    std::fill(nd, nd + nprobe * steps, 0.0);
    std::fill(wt, wt + nprobe * steps, 0.0);
    std::vector<double> basis(size_t(nprobe) * L * dim), cur(size_t(nprobe) * dim),
        Y(size_t(nprobe) * dim), alpha(size_t(nprobe) * L, 0.0), beta(size_t(nprobe) * L, 0.0);
    std::vector<int64_t> len(nprobe, 0);
    std::vector<uint8_t> active(nprobe, 1);
    for (int64_t pr = 0; pr < nprobe; ++pr) {
      double* q = basis.data() + size_t(pr) * L * dim;
      const double inv = 1.0 / std::sqrt(double(dim));
      for (int64_t t = 0; t < dim; ++t)
        q[t] = (rng_hash(seed, (uint64_t(mi) << 20) + 0x800 + pr, t) & 1) ? inv : -inv;  // Rademacher
    }
    bool bad = false;
    for (int64_t j = 0; j < L && !bad; ++j) {
      // gather the active probes' current vectors
      int64_t na = 0;
      std::vector<int64_t> idx;
      for (int64_t pr = 0; pr < nprobe; ++pr)
        if (active[pr]) {
          std::memcpy(cur.data() + na * dim, basis.data() + (size_t(pr) * L + j) * dim, sizeof(double) * dim);
          idx.push_back(pr);
          ++na;
        }
      if (na == 0) break;
      gram_apply(W, side, na, cur.data(), dim, Y.data(), dim, nullptr, 0, inner_threads);
      if (!all_finite(Y.data(), na * dim)) { bad = true; break; }
      for (int64_t a = 0; a < na; ++a) {
        const int64_t pr = idx[a];
        double* y = Y.data() + a * dim;
        const double* Qp = basis.data() + size_t(pr) * L * dim;
        std::vector<double> acc(j + 1, 0.0);
        cgs2(Qp, j + 1, dim, y, acc.data());
        alpha[pr * L + j] = acc[j];
        len[pr] = j + 1;
        const double bnorm = nrm2(y, dim);
        const double scale = std::fabs(acc[j]) + (j > 0 ? beta[pr * L + j - 1] : 0.0);
        if (j + 1 >= L || bnorm <= 1e-12 * std::max(scale, DBL_MIN)) {
          active[pr] = 0;  // end of run, or invariant subspace: the quadrature is exact
          continue;
        }
        beta[pr * L + j] = bnorm;
        double* qn = basis.data() + (size_t(pr) * L + j + 1) * dim;
        for (int64_t t = 0; t < dim; ++t) qn[t] = y[t] / bnorm;
      }
    }
    if (bad) { status[mi] = kNonFinite; continue; }
    for (int64_t pr = 0; pr < nprobe; ++pr) {
      const int64_t l = len[pr];
      std::vector<double> Tm(size_t(l) * l, 0.0), ev(l), V(size_t(l) * l);
      for (int64_t i = 0; i < l; ++i) {
        Tm[i * l + i] = alpha[pr * L + i];
        if (i + 1 < l) Tm[i * l + i + 1] = Tm[(i + 1) * l + i] = beta[pr * L + i];
      }
      if (!sym_eig(l, Tm.data(), l, ev.data(), V.data())) { status[mi] = kEigFailed; break; }
      for (int64_t i = 0; i < l; ++i) {
        nd[pr * steps + i] = ev[i];
        wt[pr * steps + i] = V[0 * l + i] * V[0 * l + i];
      }
    }
  }
}

}  // namespace specfast
