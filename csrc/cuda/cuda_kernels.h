// CUDA entry points as a plain C++ header: bindings.cpp includes this, never cuda_runtime.h,
// so the binding compiles with the host compiler and the module imports without a driver.
#pragma once

#include <stdint.h>

#include "../kernels.h"

namespace drt {

// Number of CUDA devices a driver reports; 0 without a driver or device (never throws).
int cuda_device_count();

// Launch on `stream` (a cudaStream_t passed as an integer) of device `device`; no host
// synchronisation. Throw std::runtime_error when the launch fails.
void noisy_draws_cuda(const NoisyDrawsArgs& args, int device, uintptr_t stream);
void vote_cuda(const VoteArgs& args, int device, uintptr_t stream);

}  // namespace drt
