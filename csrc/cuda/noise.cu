// noisy_draws on CUDA: one thread per (output row, quad of elements), grid-stride.
// Compiled with --fmad=false (CMakeLists.txt) and IEEE div/sqrt (nvcc's default without
// --use_fast_math): the noise is bit-identical to the CPU kernel and the torch reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../philox.h"
#include "cuda_kernels.h"
#include "cuda_utils.cuh"

namespace drt {
namespace {

struct StoreFloat {
  __device__ void operator()(void* out, int64_t i, float v) const { static_cast<float*>(out)[i] = v; }
};
struct StoreBFloat16 {  // round to nearest even, as torch's .to(torch.bfloat16)
  __device__ void operator()(void* out, int64_t i, float v) const {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  }
};
struct StoreFloat16 {
  __device__ void operator()(void* out, int64_t i, float v) const {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  }
};

template <typename Store>
__global__ void noisy_draws_kernel(NoisyDrawsArgs p, int64_t quads, Store store) {
  const int64_t total = p.batch * p.reps * quads;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t n = t / quads, q = t - n * quads;  // output row, quad within the row
    const int64_t b = n / p.reps, r = n - b * p.reps;
    float z[4];
    normals4(p.seed, (uint64_t)p.keys[b], (uint32_t)(p.first_draw[b] + r), (uint32_t)q, z);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * q + j;
      if (e >= p.num_elements) break;
      const float noise = p.sigma * z[j];
      const float v = p.x[b * p.num_elements + e] + noise;
      int64_t index = n * p.num_elements + e;
      if (p.channels_last) {  // logical element c * spatial + s lives at s * channels + c
        const int64_t c = e / p.spatial, s = e - c * p.spatial;
        index = n * p.num_elements + s * p.channels + c;
      }
      store(p.out, index, v);
    }
  }
}

template <typename Store>
void launch(const NoisyDrawsArgs& p, cudaStream_t stream) {
  const int64_t quads = (p.num_elements + 3) / 4;
  const int64_t total = p.batch * p.reps * quads;
  if (total == 0) return;
  constexpr int kBlock = 256;
  noisy_draws_kernel<<<grid_size(total, kBlock), kBlock, 0, stream>>>(p, quads, Store{});
  check_cuda(cudaGetLastError(), "noisy_draws kernel launch");
}

}  // namespace

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

void noisy_draws_cuda(const NoisyDrawsArgs& args, int device, uintptr_t stream) {
  DeviceGuard guard(device);
  switch (args.out_dtype) {
    case kFloat32:
      launch<StoreFloat>(args, as_stream(stream));
      break;
    case kBFloat16:
      launch<StoreBFloat16>(args, as_stream(stream));
      break;
    case kFloat16:
      launch<StoreFloat16>(args, as_stream(stream));
      break;
  }
}

}  // namespace drt
