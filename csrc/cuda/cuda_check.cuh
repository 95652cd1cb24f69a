// CUDA error checking: every launch and runtime call throws with file:line and the CUDA error
// string (never exit), so the binding layer raises a Python RuntimeError.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define SPECFAST_CUDA_CHECK(expr)                                                            \
  do {                                                                                      \
    cudaError_t err__ = (expr);                                                             \
    if (err__ != cudaSuccess) {                                                             \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err__) +    \
                               " at " + __FILE__ + ":" + std::to_string(__LINE__));         \
    }                                                                                       \
  } while (0)
