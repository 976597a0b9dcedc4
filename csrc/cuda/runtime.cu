// What the CUDA runtime the kernels are linked with (cudart, static) finds on this machine:
// the devices, and the driver's and the runtime's versions, for drt_fast to say why CUDA
// tensors take the pure-torch references (an old driver is the usual reason). Never throws:
// the module imports and answers on a machine without a driver.
#include <cuda_runtime.h>

#include <string>

#include "cuda_kernels.h"

namespace drt {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

CudaRuntimeInfo cuda_runtime_info() {
  CudaRuntimeInfo info{};
  info.runtime_version = CUDART_VERSION;
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) info.driver_version = 0;
  const cudaError_t err = cudaGetDeviceCount(&info.device_count);
  info.error_code = (int)err;
  if (err != cudaSuccess) {
    info.device_count = 0;
    info.error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();
  }
  return info;
}

}  // namespace drt
