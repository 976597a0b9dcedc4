// vote_ on CUDA, two kernels:
// * few classes (K <= 32, the usual 10): one thread per draw. The thread holds the draw's
//   logits and class scores in registers (loops unrolled to 16 or 32 classes), so a draw
//   costs no barrier and no shared memory; the warp then adds its votes with one 64-bit
//   atomic per distinct (input, class) among its 32 draws (__match_any_sync), since all the
//   draws of an input vote into the same few counters. The per-draw part runs on the host
//   too (`vote_cuda_on_host`, a test hook), so it is tested without a GPU;
// * more classes: one block per draw (grid-stride over draws). The block aggregates the
//   members into a shared-memory score row, takes the argmax with block reductions and adds
//   one vote with a 64-bit atomic.
// Integer adds commute: the counts are deterministic either way.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "../philox.h"  // DRT_HD
#include "cuda_kernels.h"
#include "cuda_utils.cuh"

namespace drt {
namespace {

constexpr int kBlock = 128;  // threads per draw
constexpr int kWarps = kBlock / 32;

DRT_HD float to_float(float v) { return v; }
DRT_HD float to_float(__half v) { return __half2float(v); }
DRT_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Block-wide reductions. `red_*` are shared scratch of kWarps entries; every thread gets the
// result. Each starts and ends with a barrier so that the scratch can be reused at once.
struct ArgMax {
  float value;
  int index;
};

DRT_HD ArgMax better(ArgMax a, ArgMax b) {  // larger value, then smaller index
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

// ---- few classes: a thread per draw ------------------------------------------------------
// The label draw r votes for, or -1 when one of its logits is not finite (no vote). The same
// aggregation, ties and order of members as the block kernel below; kMax >= classes.
template <typename T, int kMax, typename Score>
DRT_HD int draw_label(const VoteArgs& p, int64_t r) {
  const T* logits = static_cast<const T*>(p.logits);
  const int classes = (int)p.classes;
  for (int64_t m = 0; m < p.members; ++m) {
    const T* row = logits + (m * p.draws + r) * p.classes;
    bool finite = true;
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (k < classes) finite &= (bool)isfinite(to_float(row[k]));
    }
    if (!finite) return -1;
  }
  // mv sums weights in double (as the CPU kernel and the reference: a float sum can tie
  // where the exact one does not), classes no member voted for at -1
  Score score[kMax];
#pragma unroll
  for (int k = 0; k < kMax; ++k) score[k] = p.agg == kMajorityVote ? Score(-1) : Score(0);
  float best_margin = -1.0f;
  int mme_label = 0;
  for (int64_t m = 0; m < p.members; ++m) {
    const T* row = logits + (m * p.draws + r) * p.classes;
    const float w = p.weights[m];
    float l[kMax];
#pragma unroll
    for (int k = 0; k < kMax; ++k) l[k] = k < classes ? to_float(row[k]) : -INFINITY;
    if (p.agg == kLogit) {
#pragma unroll
      for (int k = 0; k < kMax; ++k) {
        if (k < classes) score[k] += w * l[k];
      }
      continue;
    }
    ArgMax top1{-INFINITY, classes};
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (k < classes) top1 = better(top1, ArgMax{l[k], k});
    }
    if (p.agg == kMajorityVote) {
#pragma unroll
      for (int k = 0; k < kMax; ++k) {
        if (k == top1.index) score[k] = (score[k] < Score(0) ? Score(0) : score[k]) + Score(w);
      }
      continue;
    }
    float e[kMax], sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      e[k] = k < classes ? expf(l[k] - top1.value) : 0.0f;
      sum += e[k];
    }
    if (p.agg == kWeightedSoftmax) {
      const float scale = w / sum;
#pragma unroll
      for (int k = 0; k < kMax; ++k) score[k] += e[k] * scale;
    } else {  // kMaxMargin: top-1 minus top-2 softmax probability
      ArgMax top2{-INFINITY, classes};
#pragma unroll
      for (int k = 0; k < kMax; ++k) {
        if (k < classes && k != top1.index) top2 = better(top2, ArgMax{l[k], k});
      }
      const float margin = (classes > 1 ? 1.0f - expf(top2.value - top1.value) : 1.0f) / sum;
      if (margin > best_margin) {  // strict: ties keep the smaller member index
        best_margin = margin;
        mme_label = top1.index;
      }
    }
  }
  if (p.agg == kMaxMargin) return mme_label;
  // the first largest score; a NaN score (NaN weights) never wins, and all NaN gives class 0
  int label = 0;
  Score best = Score(-INFINITY);
#pragma unroll
  for (int k = 0; k < kMax; ++k) {
    if (k < classes && score[k] > best) {
      best = score[k];
      label = k;
    }
  }
  return label;
}

// A draw's label: mv with double scores, the other modes with float ones.
template <typename T, int kMax>
DRT_HD int draw_label(const VoteArgs& p, int64_t r) {
  return p.agg == kMajorityVote ? draw_label<T, kMax, double>(p, r) : draw_label<T, kMax, float>(p, r);
}

// Draws are taken a warp at a time (warp-uniform loop: every lane reaches __match_any_sync);
// lanes past the last draw carry no vote.
template <typename T, int kMax>
__global__ void vote_small_kernel(VoteArgs p) {
  const int lane = threadIdx.x % 32;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;  // a multiple of 32
  for (int64_t base = (int64_t)blockIdx.x * blockDim.x + threadIdx.x - lane; base < p.draws; base += stride) {
    const int64_t r = base + lane;
    long long key = -1;  // counts index of this lane's vote
    if (r < p.draws) {
      const int label = draw_label<T, kMax>(p, r);
      const int64_t row = p.rows[r];  // not range-checked by the op on CUDA: a bad row casts no vote
      if (label >= 0 && row >= 0 && row < p.batch) key = (long long)row * p.classes + label;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, key);  // lanes with the same vote
    if (key >= 0 && lane == __ffs(peers) - 1) {
      atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + key), (unsigned long long)__popc(peers));
    }
  }
}

template <typename T, int kMax>
void launch_small(const VoteArgs& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  vote_small_kernel<T, kMax><<<grid_size(p.draws, kThreads), kThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "vote kernel launch");
}

template <typename T>
void run_small_on_host(const VoteArgs& p) {
  for (int64_t r = 0; r < p.draws; ++r) {
    const int label = p.classes <= 16 ? draw_label<T, 16>(p, r) : draw_label<T, 32>(p, r);
    if (label >= 0 && p.rows[r] >= 0 && p.rows[r] < p.batch) p.counts[p.rows[r] * p.classes + label] += 1;
  }
}

// ---- more classes: a block per draw --------------------------------------------------------
template <typename T>
__global__ void vote_kernel(VoteArgs p) {
  extern __shared__ double shared_row[];  // [classes] scores: float, or double for mv
  float* score = reinterpret_cast<float*>(shared_row);
  double* votes = shared_row;  // mv: summed weights in double as the CPU kernel, -1: no vote
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

    for (int64_t k = threadIdx.x; k < k_total; k += kBlock) {
      if (p.agg == kMajorityVote) {
        votes[k] = -1.0;
      } else {
        score[k] = 0.0f;
      }
    }
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
        if (threadIdx.x == 0) votes[top1.index] = (votes[top1.index] < 0.0 ? 0.0 : votes[top1.index]) + (double)w;
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
    if (p.agg == kMajorityVote) {  // thread 0, which votes, finds the first largest sum
      double best = -INFINITY;
      for (int64_t k = 0; threadIdx.x == 0 && k < k_total; ++k) {
        if (votes[k] > best) {
          best = votes[k];
          label = (int)k;
        }
      }
    } else if (p.agg != kMaxMargin) {
      ArgMax local{-INFINITY, (int)k_total};
      for (int64_t k = threadIdx.x; k < k_total; k += kBlock) local = better(local, ArgMax{score[k], (int)k});
      label = block_argmax(local, red_v, red_i).index;
      if (label >= k_total) label = 0;  // every score NaN (NaN weights): not past the row
    }
    if (threadIdx.x == 0 && p.rows[r] >= 0 && p.rows[r] < p.batch) {  // a bad row casts no vote
      atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + p.rows[r] * k_total + label), 1ULL);
    }
    __syncthreads();  // score is rewritten by the next draw
  }
}

template <typename T>
void launch(const VoteArgs& p, cudaStream_t stream) {
  if (p.classes <= 16) return launch_small<T, 16>(p, stream);
  if (p.classes <= 32) return launch_small<T, 32>(p, stream);
  const size_t shared = (size_t)p.classes * (p.agg == kMajorityVote ? sizeof(double) : sizeof(float));
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

int vote_cuda_on_host(const VoteArgs& args) {
  if (args.classes > 32) return 0;
  switch (args.logits_dtype) {
    case kBFloat16:
      run_small_on_host<__nv_bfloat16>(args);
      break;
    case kFloat16:
      run_small_on_host<__half>(args);
      break;
    default:
      run_small_on_host<float>(args);
  }
  return 1;
}

}  // namespace drt
