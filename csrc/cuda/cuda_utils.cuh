// Small helpers shared by the CUDA kernels: error checks and a device guard.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace drt {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("drt_fast CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline int grid_size(int64_t work_items, int block, int64_t cap = 1 << 20) {
  int64_t blocks = (work_items + block - 1) / block;
  if (blocks > cap) blocks = cap;  // grid-stride loops cover the rest
  return (int)(blocks < 1 ? 1 : blocks);
}

}  // namespace drt
