// The only file that includes pybind11. Tensors never cross this boundary: Python passes data
// pointers, shapes and strides (from specfast/ops.py), so the kernels stay torch-free and the
// module works with any torch >= 2.4. The GIL is released around every kernel call; C++
// exceptions become ValueError (std::invalid_argument) or RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "specfast/check.h"
#include "specfast/ops.h"
#ifdef SPECFAST_WITH_CUDA
#include "specfast/cuda_info.h"
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace specfast;

namespace {

using I64s = std::vector<int64_t>;

std::vector<MatrixView> make_views(const I64s& ptrs, int dtype, const I64s& rows, const I64s& cols,
                                   const I64s& row_strides) {
  const size_t n = ptrs.size();
  SPECFAST_CHECK(rows.size() == n && cols.size() == n && row_strides.size() == n,
                 "views: ptrs/rows/cols/row_strides must have equal lengths, got ", n, "/",
                 rows.size(), "/", cols.size(), "/", row_strides.size());
  SPECFAST_CHECK(dtype >= 0 && dtype <= 3, "views: unknown dtype code ", dtype);
  std::vector<MatrixView> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = MatrixView{reinterpret_cast<const void*>(static_cast<uintptr_t>(ptrs[i])),
                      static_cast<DType>(dtype), rows[i], cols[i], row_strides[i]};
  return v;
}

template <typename T>
T* as_ptr(int64_t p) { return reinterpret_cast<T*>(static_cast<uintptr_t>(p)); }

void py_gram_apply(const I64s& ptrs, int dtype, const I64s& rows, const I64s& cols,
                   const I64s& row_strides, const I64s& sides, int64_t nvec, const I64s& x_ptrs,
                   const I64s& ldx, const I64s& y_ptrs, const I64s& ldy, int num_threads) {
  auto views = make_views(ptrs, dtype, rows, cols, row_strides);
  const size_t n = views.size();
  SPECFAST_CHECK(sides.size() == n && x_ptrs.size() == n && y_ptrs.size() == n && ldx.size() == n &&
                     ldy.size() == n, "gram_apply: per-matrix argument lengths differ");
  std::vector<GramSide> s(n);
  std::vector<const double*> X(n);
  std::vector<double*> Y(n);
  for (size_t i = 0; i < n; ++i) {
    s[i] = sides[i] ? GramSide::Left : GramSide::Right;
    X[i] = as_ptr<const double>(x_ptrs[i]);
    Y[i] = as_ptr<double>(y_ptrs[i]);
  }
  gram_apply_grouped(views.data(), s.data(), int64_t(n), nvec, X.data(), ldx.data(), Y.data(),
                     ldy.data(), num_threads);
}

void py_frobenius_scan(const I64s& ptrs, int dtype, const I64s& rows, const I64s& cols,
                       const I64s& row_strides, int64_t frob_ptr, int64_t bad_ptr, int num_threads) {
  auto views = make_views(ptrs, dtype, rows, cols, row_strides);
  frobenius_scan(views.data(), int64_t(views.size()), as_ptr<double>(frob_ptr),
                 as_ptr<int64_t>(bad_ptr), num_threads);
}

void py_krylov_svd(const I64s& ptrs, int dtype, const I64s& rows, const I64s& cols,
                   const I64s& row_strides, int64_t k, int64_t block, int64_t max_basis,
                   int64_t max_iter, double tol, bool largest, bool want_vectors, uint64_t seed,
                   int64_t sigma_ptr, int64_t bound_ptr, int64_t iters_ptr, int64_t conv_ptr,
                   int64_t status_ptr, const I64s& u_ptrs, const I64s& v_ptrs, int num_threads) {
  auto views = make_views(ptrs, dtype, rows, cols, row_strides);
  const size_t n = views.size();
  if (want_vectors)
    SPECFAST_CHECK(u_ptrs.size() == n && v_ptrs.size() == n, "krylov_svd: need one U and V per matrix");
  KrylovParams p;
  p.k = k; p.block = block; p.max_basis = max_basis; p.max_iter = max_iter; p.tol = tol;
  p.largest = largest; p.want_vectors = want_vectors; p.seed = seed;
  std::vector<KrylovOut> outs(n);
  for (size_t i = 0; i < n; ++i) {
    outs[i].sigma = as_ptr<double>(sigma_ptr) + i * k;
    outs[i].bound = as_ptr<double>(bound_ptr) + i * k;
    outs[i].iters = as_ptr<int64_t>(iters_ptr) + i;
    outs[i].converged = as_ptr<uint8_t>(conv_ptr) + i;
    outs[i].status = as_ptr<int32_t>(status_ptr) + i;
    outs[i].U = want_vectors ? as_ptr<double>(u_ptrs[i]) : nullptr;
    outs[i].V = want_vectors ? as_ptr<double>(v_ptrs[i]) : nullptr;
  }
  krylov_svd_grouped(views.data(), int64_t(n), p, outs.data(), num_threads);
}

void py_slq(const I64s& ptrs, int dtype, const I64s& rows, const I64s& cols, const I64s& row_strides,
            int64_t nprobe, int64_t steps, uint64_t seed, int64_t nodes_ptr, int64_t weights_ptr,
            int64_t dims_ptr, int64_t status_ptr, int num_threads) {
  auto views = make_views(ptrs, dtype, rows, cols, row_strides);
  slq_grouped(views.data(), int64_t(views.size()), nprobe, steps, seed, as_ptr<double>(nodes_ptr),
              as_ptr<double>(weights_ptr), as_ptr<int64_t>(dims_ptr), as_ptr<int32_t>(status_ptr),
              num_threads);
}

bool py_sym_eig(int64_t n, int64_t a_ptr, int64_t evals_ptr, int64_t evecs_ptr) {
  return sym_eig(n, as_ptr<const double>(a_ptr), n, as_ptr<double>(evals_ptr), as_ptr<double>(evecs_ptr));
}

int py_choose_side(int64_t m, int64_t n, int dtype, bool largest) {
  SPECFAST_CHECK(dtype >= 0 && dtype <= 3, "choose_side: unknown dtype code ", dtype);
  return choose_side(m, n, static_cast<DType>(dtype), largest) == GramSide::Left ? 1 : 0;
}

py::dict build_info() {
  py::dict d;
  d["version"] = SPECFAST_VERSION;
  d["compiler"] = SPECFAST_COMPILER;
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_max_threads"] = 1;
#endif
#ifdef SPECFAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = SPECFAST_CUDA_ARCHS_STR;
  d["cuda_version"] = SPECFAST_CUDA_VERSION;
  const CudaRuntimeInfo ci = cuda_runtime_info();
  d["cuda_device_count"] = ci.device_count;
  d["cuda_runtime_version"] = ci.runtime_version;
  d["cuda_driver_version"] = ci.driver_version;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
  d["cuda_version"] = "";
#endif
  d["cpu_isa"] = cpu_kernel_isa();
  d["accumulation"] = "float64 (CPU)";
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "specfast native kernels (torch-free; called from specfast.ops)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("build_info", &build_info);
  m.def("gram_apply", &py_gram_apply, nogil);
  m.def("frobenius_scan", &py_frobenius_scan, nogil);
  m.def("krylov_svd", &py_krylov_svd, nogil);
  m.def("slq", &py_slq, nogil);
  m.def("sym_eig", &py_sym_eig, nogil);
  m.def("choose_side", &py_choose_side);
}
