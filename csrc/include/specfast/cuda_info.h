#pragma once

namespace specfast {

struct CudaRuntimeInfo {
  int device_count;     // GPUs visible to the CUDA runtime (0 without a driver)
  int runtime_version;  // e.g. 13000
  int driver_version;   // 0 without a driver
};

CudaRuntimeInfo cuda_runtime_info();  // only defined when built with CUDA

}  // namespace specfast
