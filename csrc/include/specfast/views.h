// Torch-free views: what every kernel sees of a matrix. Strides are in elements; the last
// dimension is contiguous (stride 1). A stack [E, m, n] or a ragged list becomes an array of views,
// so strided slices of a 3-D expert tensor are used in place, never copied.
#pragma once
#include <cstdint>

#include "specfast/dtype.h"

namespace specfast {

struct MatrixView {
  const void* data;    // first element of the matrix
  DType dtype;         // storage dtype
  int64_t rows;        // m
  int64_t cols;        // n
  int64_t row_stride;  // elements between W[i, 0] and W[i+1, 0]
};

// Which Gram operator a Krylov solver iterates on.
//   Right: A = W^T W (n x n), one pass over W per product (rows reused from cache).
//   Left:  A = W W^T (m x m), two passes over W per product; used when m << n and W is cache-sized.
enum class GramSide : int32_t { Right = 0, Left = 1 };

}  // namespace specfast
