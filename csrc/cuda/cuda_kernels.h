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
// Test hook: the same work items run one after another on the host, with host pointers;
// returns the path taken (0 general, 1 contiguous, 2 channels-last; noise.cu).
int noisy_draws_cuda_on_host(const NoisyDrawsArgs& args);
void vote_cuda(const VoteArgs& args, int device, uintptr_t stream);
// Test hook: the few-classes kernel's per-draw part (classes <= 32) on the host, with host
// pointers, votes added in draw order; returns 0 (nothing done) for more classes.
int vote_cuda_on_host(const VoteArgs& args);

}  // namespace drt
