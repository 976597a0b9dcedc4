// vote_ on CUDA: one block per draw (grid-stride over draws). The block aggregates the
// members into a shared-memory score row, takes the argmax with block reductions and adds
// one vote with a 64-bit atomic (integer adds commute: the counts are deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "cuda_kernels.h"
#include "cuda_utils.cuh"

namespace drt {
namespace {

constexpr int kBlock = 128;  // threads per draw
constexpr int kWarps = kBlock / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Block-wide reductions. `red_*` are shared scratch of kWarps entries; every thread gets the
// result. Each starts and ends with a barrier so that the scratch can be reused at once.
struct ArgMax {
  float value;
  int index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {  // larger value, then smaller index
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ ArgMax block_argmax(ArgMax v, float* red_v, int* red_i) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    ArgMax other{__shfl_down_sync(0xffffffffu, v.value, offset), __shfl_down_sync(0xffffffffu, v.index, offset)};
    v = better(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    red_v[warp] = v.value;
    red_i[warp] = v.index;
  }
  __syncthreads();
  ArgMax result{red_v[0], red_i[0]};
  for (int w = 1; w < kWarps; ++w) result = better(result, ArgMax{red_v[w], red_i[w]});
  return result;
}

__device__ float block_sum(float v, float* red) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w) total += red[w];  // same order in every thread
  return total;
}

template <typename T>
__global__ void vote_kernel(VoteArgs p) {
  extern __shared__ float score[];  // [classes]
  __shared__ float red_v[kWarps];
  __shared__ int red_i[kWarps];
  const T* logits = static_cast<const T*>(p.logits);
  const int64_t k_total = p.classes;
  for (int64_t r = blockIdx.x; r < p.draws; r += gridDim.x) {
    // a draw with any non-finite logit casts no vote
    bool bad = false;
    for (int64_t m = 0; m < p.members; ++m) {
      const T* row = logits + (m * p.draws + r) * k_total;
      for (int64_t k = threadIdx.x; k < k_total; k += kBlock) bad |= !isfinite(to_float(row[k]));
    }
    if (__syncthreads_or(bad)) continue;

    for (int64_t k = threadIdx.x; k < k_total; k += kBlock) score[k] = 0.0f;
    __syncthreads();
    float best_margin = -1.0f;
    int mme_label = 0;
    for (int64_t m = 0; m < p.members; ++m) {
      const T* row = logits + (m * p.draws + r) * k_total;
      const float w = p.weights[m];
      if (p.agg == kLogit) {
        for (int64_t k = threadIdx.x; k < k_total; k += kBlock) score[k] += w * to_float(row[k]);
        continue;
      }
      ArgMax local{-INFINITY, (int)k_total};
      for (int64_t k = threadIdx.x; k < k_total; k += kBlock) local = better(local, ArgMax{to_float(row[k]), (int)k});
      const ArgMax top1 = block_argmax(local, red_v, red_i);
      if (p.agg == kMajorityVote) {
        if (threadIdx.x == 0) score[top1.index] += w;
        __syncthreads();
        continue;
      }
      float sum = 0.0f;
      for (int64_t k = threadIdx.x; k < k_total; k += kBlock) sum += expf(to_float(row[k]) - top1.value);
      sum = block_sum(sum, red_v);
      if (p.agg == kWeightedSoftmax) {
        const float scale = w / sum;
        for (int64_t k = threadIdx.x; k < k_total; k += kBlock) {
          score[k] += expf(to_float(row[k]) - top1.value) * scale;
        }
      } else {  // kMaxMargin: top-1 minus top-2 softmax probability
        ArgMax second{-INFINITY, (int)k_total};
        for (int64_t k = threadIdx.x; k < k_total; k += kBlock) {
          if (k != top1.index) second = better(second, ArgMax{to_float(row[k]), (int)k});
        }
        const ArgMax top2 = block_argmax(second, red_v, red_i);
        const float margin = (k_total > 1 ? 1.0f - expf(top2.value - top1.value) : 1.0f) / sum;
        if (margin > best_margin) {  // strict: ties keep the smaller member index
          best_margin = margin;
          mme_label = top1.index;
        }
      }
    }
    __syncthreads();
    int label = mme_label;
    if (p.agg != kMaxMargin) {
      ArgMax local{-INFINITY, (int)k_total};
      for (int64_t k = threadIdx.x; k < k_total; k += kBlock) local = better(local, ArgMax{score[k], (int)k});
      label = block_argmax(local, red_v, red_i).index;
    }
    if (threadIdx.x == 0) {
      atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + p.rows[r] * k_total + label), 1ULL);
    }
    __syncthreads();  // score is rewritten by the next draw
  }
}

template <typename T>
void launch(const VoteArgs& p, cudaStream_t stream) {
  const size_t shared = (size_t)p.classes * sizeof(float);
  if (shared > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(vote_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared),
               "vote kernel shared memory");
  }
  const int blocks = (int)(p.draws < (1 << 20) ? p.draws : (1 << 20));
  vote_kernel<T><<<blocks, kBlock, shared, stream>>>(p);
  check_cuda(cudaGetLastError(), "vote kernel launch");
}

}  // namespace

void vote_cuda(const VoteArgs& args, int device, uintptr_t stream) {
  if (args.draws == 0) return;
  DeviceGuard guard(device);
  switch (args.logits_dtype) {
    case kFloat32:
      launch<float>(args, as_stream(stream));
      break;
    case kBFloat16:
      launch<__nv_bfloat16>(args, as_stream(stream));
      break;
    case kFloat16:
      launch<__half>(args, as_stream(stream));
      break;
  }
}

}  // namespace drt
