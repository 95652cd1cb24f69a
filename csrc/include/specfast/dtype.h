// Storage dtypes and the one dtype switch used by every kernel.
// Conversions are bit-exact: bf16 -> fp32 is a 16-bit shift, fp16 -> fp32 follows IEEE 754.
#pragma once
#include <cstdint>
#include <cstring>

#include "specfast/check.h"

namespace specfast {

enum class DType : int32_t { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "unknown";
}

inline int64_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::F16: return 2;
    case DType::BF16: return 2;
  }
  return 0;
}

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half -> float, branch-light (handles subnormals, inf, nan). Written so GCC vectorises it.
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t expo = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (expo == 0x1fu) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (expo != 0) {
    u = sign | ((expo + 112u) << 23) | (mant << 13);
  } else {
    // subnormal or zero: value = mant * 2^-24
    float f = static_cast<float>(mant) * 5.9604644775390625e-08f;
    uint32_t fu;
    std::memcpy(&fu, &f, 4);
    u = sign | fu;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace specfast

// SPECFAST_DISPATCH(dtype, T, ...) runs the body with T the storage type (float, double, bf16_t, f16_t).
#define SPECFAST_DISPATCH(DT, T, ...)                                            \
  [&] {                                                                          \
    switch (DT) {                                                                \
      case ::specfast::DType::F32: { using T = float; return __VA_ARGS__(); }    \
      case ::specfast::DType::F64: { using T = double; return __VA_ARGS__(); }   \
      case ::specfast::DType::F16: { using T = ::specfast::f16_t; return __VA_ARGS__(); } \
      case ::specfast::DType::BF16: { using T = ::specfast::bf16_t; return __VA_ARGS__(); } \
    }                                                                            \
    throw std::invalid_argument("specfast: unsupported dtype code");             \
  }()
