// Torch-free CPU entry points. Everything here works on MatrixView arrays, so a single matrix,
// a strided [E, m, n] stack and a ragged list of different shapes all go through one code path.
// Vectors are float64 on the CPU: float64 accumulation removes accumulation error from every
// certificate; its cost is small when W streams from DRAM (see docs/design.md for the numbers).
#pragma once
#include <cstdint>
#include <vector>

#include "specfast/views.h"

namespace specfast {

// ---------------------------------------------------------------- Gram products (gram_matvec_cpu.cpp)
// Right: Y[c] = W^T (W X[c]) with X[c], Y[c] of length n; each row of W is read from memory once
//        (the dot products and the rank-1 update of a 4-row block share it from cache).
//        If WX is non-null it receives W X[c] (length m), the intermediate product.
// Left:  Y[c] = W (W^T X[c]) with X[c], Y[c] of length m (two passes over W); if WX is non-null it
//        receives W^T X[c] (length n).
// Vector c lives at X + c * ldx (Y, WX likewise). Y is overwritten.
void gram_apply(const MatrixView& W, GramSide side, int64_t nvec, const double* X, int64_t ldx,
                double* Y, int64_t ldy, double* WX, int64_t ldwx, int num_threads);

// Many matrices in one call: parallel over matrices when there are enough of them, otherwise
// parallel inside each product. A given num_threads always gives the same bits; different counts
// differ by float64 rounding only (the row chunks, hence the summation order, follow the count).
void gram_apply_grouped(const MatrixView* mats, const GramSide* sides, int64_t count, int64_t nvec,
                        const double* const* X, const int64_t* ldx, double* const* Y,
                        const int64_t* ldy, int num_threads);

// Instruction set the CPU kernels dispatched to on this machine ("avx512", "avx2+fma+f16c", "portable").
const char* cpu_kernel_isa();

// Squared Frobenius norm and count of non-finite entries of each matrix, one pass.
void frobenius_scan(const MatrixView* mats, int64_t count, double* frob_sq, int64_t* nonfinite,
                    int num_threads);

// ---------------------------------------------------------------- Dense symmetric eigen (dense_eig_cpu.cpp)
// Eigen-decomposition of a symmetric n x n matrix A (row-major, lda). On return evals holds the
// eigenvalues in descending order and evecs (n x n, row-major, column j = eigenvector j).
// Householder tridiagonalisation + implicit QL. Returns false if QL failed to converge.
bool sym_eig(int64_t n, const double* A, int64_t lda, double* evals, double* evecs);

// ---------------------------------------------------------------- Krylov solvers (lanczos_cpu.cpp)
struct KrylovParams {
  int64_t k = 1;            // wanted singular values per matrix (clamped to min(m, n))
  int64_t block = 1;        // block size b: multiplicities up to b are resolved
  int64_t max_basis = 32;   // basis size before a thick restart
  int64_t max_iter = 1000;  // maximum number of block Gram products (passes over W)
  double tol = 1e-6;        // relative accuracy wanted on each singular value
  bool largest = true;      // largest or smallest singular values
  bool want_vectors = false;
  uint64_t seed = 0;        // counter-based RNG seed for start vectors and breakdown refills
};

enum KrylovStatus : int32_t { kOk = 0, kNonFinite = 1, kEigFailed = 2 };

// Outputs for one matrix. sigma/bound: k values (largest: descending; smallest: ascending).
// U: k vectors of length m at U + i*m; V: k vectors of length n at V + i*n (if want_vectors).
struct KrylovOut {
  double* sigma;
  double* bound;
  double* U;
  double* V;
  int64_t* iters;
  uint8_t* converged;
  int32_t* status;
};

void krylov_svd_grouped(const MatrixView* mats, int64_t count, const KrylovParams& p,
                        const KrylovOut* outs, int num_threads);

// Which Gram operator a Krylov solver uses for an m x n matrix.
GramSide choose_side(int64_t m, int64_t n, DType dtype, bool largest);

// Stochastic Lanczos quadrature on the Gram operator of each matrix: nprobe independent Lanczos
// runs of `steps` steps from Rademacher probes. nodes/weights: [count][nprobe][steps]; for probe z,
// z^T f(A) z / |z|^2 ~= sum_j weights[j] f(nodes[j]). dims[i] receives the probe dimension.
void slq_grouped(const MatrixView* mats, int64_t count, int64_t nprobe, int64_t steps, uint64_t seed,
                 double* nodes, double* weights, int64_t* dims, int32_t* status, int num_threads);

// Deterministic counter-based random numbers (splitmix64), identical on every backend.
uint64_t rng_hash(uint64_t seed, uint64_t stream, uint64_t index);
double rng_uniform(uint64_t seed, uint64_t stream, uint64_t index);  // in (-1, 1)

}  // namespace specfast
