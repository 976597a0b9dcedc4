// CUDA entry points as a plain C++ header: bindings.cpp includes this, never cuda_runtime.h,
// so the binding compiles with the host compiler and the module imports without a driver.
#pragma once

#include <stdint.h>

#include <string>

#include "../kernels.h"

namespace drt {

// Number of CUDA devices a driver reports; 0 without a driver or device (never throws).
int cuda_device_count();

// The CUDA versions at play (runtime.cu; never throws). Versions as CUDA writes them,
// 1000 * major + 10 * minor (12020: CUDA 12.2).
struct CudaRuntimeInfo {
  int driver_version;   // the newest CUDA the installed driver supports; 0: no driver found
  int runtime_version;  // CUDART_VERSION the kernels were built with (cudart is static): the
                        // driver must support this CUDA major version
  int device_count;     // cudaGetDeviceCount's, 0 when it failed
  int error_code;       // cudaGetDeviceCount's cudaError_t (0: success)
  std::string error;    // "" on success, else "cudaErrorInsufficientDriver: <its message>"
};
CudaRuntimeInfo cuda_runtime_info();

// Launch on `stream` (a cudaStream_t passed as an integer) of device `device`; no host
// synchronisation. Throw std::runtime_error when the launch fails. noisy_draws_cuda runs
// noisy_draws_discrete when args.v is set (kernels.h).
void noisy_draws_cuda(const NoisyDrawsArgs& args, int device, uintptr_t stream);
// Test hook: the same work items run one after another on the host, with host pointers;
// returns the path taken (0 general, 1 contiguous, 2 channels-last; noise.cu).
int noisy_draws_cuda_on_host(const NoisyDrawsArgs& args);
// Any number of classes; throws std::invalid_argument (nothing launched) only for agg = mv
// with more members than the block's shared memory holds pairs for (about 14,000 on an H100).
void vote_cuda(const VoteArgs& args, int device, uintptr_t stream);

// How vote_cuda runs: `kernel` 16 or 32, the thread-per-draw kernel with that many classes
// in registers; 0, the block-per-draw kernel with `dynamic_bytes` of dynamic shared memory
// and, for we / logit, score-row chunks of `chunk` classes (all of them when they fit).
struct VotePlan {
  int kernel;
  int64_t dynamic_bytes;
  int64_t chunk;
};
// The plan for a block kernel allowed `room` bytes of dynamic shared memory (on a GPU: its
// opt-in limit per block less the kernel's static shared memory). Throws as vote_cuda.
VotePlan vote_cuda_plan(const VoteArgs& args, int64_t room);
// Test hook: the plan for `room`, and its kernel's per-draw program run on the host with
// host pointers (the block kernel's threads one after another, its reductions in the GPU's
// order), votes added in draw order.
VotePlan vote_cuda_on_host(const VoteArgs& args, int64_t room);

// A whole CIFAR ResNet (depth 6n+2, BasicBlocks of 16/32/64 channels) forward, one CTA per
// draw (cifar_resnet.cu; the weights' order: drt_fast/ops/cifar_resnet_layout.py
// `cifar_resnet_convs`).
struct CifarResNetArgs {
  const void* x;       // [batch, 3, 32, 32] pixels at the strides below (elements)
  int x_dtype;         // kFloat32, kBFloat16 or kFloat16
  int64_t batch;
  int64_t stride_b, stride_c, stride_h, stride_w;
  const void* weights;  // bf16 16x16 tiles, every convolution's in network order
  int64_t weights_len;  // elements
  const float* biases;  // every convolution's folded BatchNorm bias, in network order
  int64_t biases_len;
  const float* norm;    // means[3] then sds[3]: the input layer's (x - mean) / sd
  const float* fc_w;    // [classes, 64]
  const float* fc_b;    // [classes]
  int64_t classes;
  int64_t blocks;       // BasicBlocks per stage (n)
  float* out;           // [batch, classes] logits
  int variant;          // 0: wmma; 1: mma.sync (cifar_resnet.cu; each packs its weight tiles its own way)
  // Debugging: with stop_after = k > 0, each draw stops after k phases (1: the stem; then a
  // phase per conv1 (a stage's entry: conv1 and downsample) and per conv2; 1 + 6 * blocks in
  // all) and copies the CTA's shared memory (cifar_resnet_smem_bytes(variant) bytes) to
  // snapshot + draw * those bytes instead of writing logits.
  int64_t stop_after;
  unsigned char* snapshot;
};
// Throws std::invalid_argument when the sizes do not make a network of `blocks` blocks per
// stage (nothing launched), or the device is older than compute capability 8.0.
void cifar_resnet_cuda(const CifarResNetArgs& args, int device, uintptr_t stream);
// Test hook: the same CTA program on the host, draw after draw; `order` (0, 1, 2) is the
// order in which each phase's warps and threads run (results must not depend on it).
void cifar_resnet_cuda_on_host(const CifarResNetArgs& args, int order);
int64_t cifar_resnet_weight_tiles(int64_t blocks);
int64_t cifar_resnet_biases(int64_t blocks);
int cifar_resnet_smem_bytes(int variant);
int cifar_resnet_mma_b_index(int lane, int half, int reg, int element);

}  // namespace drt
