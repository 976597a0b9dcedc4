// vote_ on CUDA, two kernels:
// * few classes (K <= 32, the usual 10): one thread per draw. The thread holds the draw's
//   logits and class scores in registers (loops unrolled to 16 or 32 classes), so a draw
//   costs no barrier and no shared memory; the warp then adds its votes with one 64-bit
//   atomic per distinct (input, class) among its 32 draws (__match_any_sync), since all the
//   draws of an input vote into the same few counters. The per-draw part runs on the host
//   too (`vote_cuda_on_host`, a test hook), so it is tested without a GPU;
// * more classes, any number: one block per draw (grid-stride over draws). The block
//   aggregates the members with block reductions -- into a shared-memory score row (we,
//   logit; in chunks where the row does not fit), a list of (label, weight) pairs (mv) or
//   nothing (mme) -- and adds one vote with a 64-bit atomic. Its per-draw program runs on the
//   host too, in the device's reduction order (`vote_cuda_on_host`).
// Integer adds commute: the counts are deterministic either way.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <new>
#include <stdexcept>
#include <string>

#include "../majority_vote.h"
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

struct ArgMax {
  float value;
  int index;
};

DRT_HD ArgMax better(ArgMax a, ArgMax b) {  // larger value, then smaller index
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
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

template <typename T, int kMax>
void run_small_on_host(const VoteArgs& p) {
  for (int64_t r = 0; r < p.draws; ++r) {
    const int label = draw_label<T, kMax>(p, r);
    if (label >= 0 && p.rows[r] >= 0 && p.rows[r] < p.batch) p.counts[p.rows[r] * p.classes + label] += 1;
  }
}

// ---- more classes: a block per draw ------------------------------------------------------
// One block of kBlock threads per draw (grid-stride over draws), any number of classes:
// * we / logit keep the aggregated score row in shared memory, a chunk of `plan.chunk`
//   classes at a time (as many as the block's shared memory holds: one chunk up to 41,720
//   classes on an A100, 58,104 on an H100); beyond that the block loops over chunks, each
//   member's maximum and softmax sum taken again over its whole row for each chunk, and
//   keeps the best (score, class) so far, so ties still go to the smaller class;
// * mme needs no row: three block reductions per member (top-1, softmax sum, top-2);
// * mv keeps only the members' distinct (label, summed weight) pairs, at most M, as the CPU
//   kernel does: M * 12 bytes, whatever the number of classes.
// Thread t only ever touches entries i = t (mod kBlock) of a score chunk, so the row needs no
// barrier of its own; the reductions bring their own.
//
// The per-draw program is written once against a block policy, as cifar_resnet.cu's CTA program:
// `DeviceBlock` runs it on a CTA; `HostBlock` runs its threads one after another and its
// reductions in the same tree order as the warp shuffles, so that `vote_cuda_on_host` (a
// test hook) gives what the GPU gives -- chunking and boundaries included -- without a GPU.
#define DRT_CTA __host__ __device__

struct DeviceBlock {
  float* red_v;  // static shared scratch, kWarps entries each
  int* red_i;
  template <typename F>
  __device__ void threads(F f) const {
    f((int)threadIdx.x);
  }
  template <typename F>
  __device__ bool any(F f) const {
    return __syncthreads_or(f((int)threadIdx.x));
  }
  // Block-wide reductions of each thread's f(tid); every thread gets the result. Each starts
  // and ends with a barrier, so that the scratch can be reused at once.
  template <typename F>
  __device__ ArgMax argmax(F f) const {
    ArgMax v = f((int)threadIdx.x);
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
  template <typename F>
  __device__ float sum(F f) const {
    float v = f((int)threadIdx.x);
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) red_v[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += red_v[w];  // same order in every thread
    return total;
  }
};

// (Its methods are __host__ __device__ only so that the program's lambdas, which nvcc
// compiles for both sides, may call them; they run on the host only.)
struct HostBlock {
  template <typename F>
  DRT_CTA void threads(F f) const {
    for (int t = 0; t < kBlock; ++t) f(t);
  }
  template <typename F>
  DRT_CTA bool any(F f) const {
    bool result = false;
    for (int t = 0; t < kBlock; ++t) result |= (bool)f(t);
    return result;
  }
  // The device's tree: within each warp, lane l combines with lane l + offset for offsets
  // 16, 8, 4, 2, 1 (lanes past the warp do not reach lane 0); then warp 0's, 1's, ... results.
  template <typename V, typename Op>
  DRT_CTA static V tree(V* v, Op op) {
    for (int w = 0; w < kWarps; ++w) {
      V* lane = v + 32 * w;
      for (int offset = 16; offset > 0; offset >>= 1)
        for (int l = 0; l + offset < 32; ++l) lane[l] = op(lane[l], lane[l + offset]);
    }
    return v[0];
  }
  template <typename F>
  DRT_CTA ArgMax argmax(F f) const {
    ArgMax v[kBlock];
    for (int t = 0; t < kBlock; ++t) v[t] = f(t);
    tree(v, better);
    ArgMax result = v[0];
    for (int w = 1; w < kWarps; ++w) result = better(result, v[32 * w]);
    return result;
  }
  template <typename F>
  DRT_CTA float sum(F f) const {
    float v[kBlock];
    for (int t = 0; t < kBlock; ++t) v[t] = f(t);
    tree(v, [](float a, float b) { return a + b; });
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += v[32 * w];
    return total;
  }
};

// The label draw r votes for, or -1 when one of its logits is not finite (no vote): the
// block-uniform result for we / logit / mme; thread 0's for mv (thread 0 votes). `smem`:
// plan.dynamic_bytes of shared memory. The same aggregation, ties and order of members as
// the thread-per-draw kernel above.
#pragma nv_exec_check_disable
template <class Block, typename T>
DRT_CTA int block_label(const Block& b, const VoteArgs& p, const VotePlan& plan, int64_t r, unsigned char* smem) {
  const T* logits = static_cast<const T*>(p.logits);
  const int64_t classes = p.classes;
  const int none = (int)classes;  // an index past the row: loses every comparison
  auto row_of = [&](int64_t m) { return logits + (m * p.draws + r) * classes; };
  const bool bad = b.any([&](int tid) {
    bool found = false;
    for (int64_t m = 0; m < p.members; ++m) {
      const T* row = row_of(m);
      for (int64_t k = tid; k < classes; k += kBlock) found |= !isfinite(to_float(row[k]));
    }
    return found;
  });
  if (bad) return -1;
  // a member's top-1 (first largest logit), and its softmax sum after subtracting it
  auto top1_of = [&](const T* row) {
    return b.argmax([&](int tid) {
      ArgMax local{-INFINITY, none};
      for (int64_t k = tid; k < classes; k += kBlock) local = better(local, ArgMax{to_float(row[k]), (int)k});
      return local;
    });
  };
  auto exp_sum = [&](const T* row, float top) {
    return b.sum([&](int tid) {
      float s = 0.0f;
      for (int64_t k = tid; k < classes; k += kBlock) s += expf(to_float(row[k]) - top);
      return s;
    });
  };

  if (p.agg == kMaxMargin) {  // top-1 minus top-2 softmax probability
    float best_margin = -1.0f;
    int label = 0;
    for (int64_t m = 0; m < p.members; ++m) {
      const T* row = row_of(m);
      const ArgMax top1 = top1_of(row);
      const float sum = exp_sum(row, top1.value);
      const ArgMax top2 = b.argmax([&](int tid) {
        ArgMax local{-INFINITY, none};
        for (int64_t k = tid; k < classes; k += kBlock) {
          if (k != top1.index) local = better(local, ArgMax{to_float(row[k]), (int)k});
        }
        return local;
      });
      const float margin = (classes > 1 ? 1.0f - expf(top2.value - top1.value) : 1.0f) / sum;
      if (margin > best_margin) {  // strict: ties keep the smaller member index
        best_margin = margin;
        label = top1.index;
      }
    }
    return label;
  }

  if (p.agg == kMajorityVote) {  // thread 0's (label, summed weight) pairs (majority_vote.h)
    double* votes = reinterpret_cast<double*>(smem);              // [members]
    int* labels = reinterpret_cast<int*>(smem + 8 * p.members);   // [members]
    int64_t distinct = 0;
    int label = 0;
    for (int64_t m = 0; m < p.members; ++m) {
      const ArgMax top1 = top1_of(row_of(m));
      b.threads([&](int tid) {
        if (tid == 0) mv_add(labels, votes, &distinct, top1.index, (double)p.weights[m]);
      });
    }
    b.threads([&](int tid) {
      if (tid == 0) label = (int)mv_winner(labels, votes, distinct, classes);
    });
    return label;
  }

  // we / logit: the score row, chunk after chunk
  float* score = reinterpret_cast<float*>(smem);  // [plan.chunk]
  ArgMax best{-INFINITY, none};
  for (int64_t c0 = 0; c0 < classes; c0 += plan.chunk) {
    const int64_t n = classes - c0 < plan.chunk ? classes - c0 : plan.chunk;
    b.threads([&](int tid) {
      for (int64_t i = tid; i < n; i += kBlock) score[i] = 0.0f;
    });
    for (int64_t m = 0; m < p.members; ++m) {
      const T* row = row_of(m);
      const float w = p.weights[m];
      if (p.agg == kLogit) {
        b.threads([&](int tid) {
          for (int64_t i = tid; i < n; i += kBlock) score[i] += w * to_float(row[c0 + i]);
        });
        continue;
      }
      const float top = top1_of(row).value;
      const float scale = w / exp_sum(row, top);
      b.threads([&](int tid) {
        for (int64_t i = tid; i < n; i += kBlock) score[i] += expf(to_float(row[c0 + i]) - top) * scale;
      });
    }
    const ArgMax chunk_best = b.argmax([&](int tid) {
      ArgMax local{-INFINITY, none};
      for (int64_t i = tid; i < n; i += kBlock) local = better(local, ArgMax{score[i], (int)(c0 + i)});
      return local;
    });
    best = better(best, chunk_best);  // an earlier chunk keeps a tie: its classes are smaller
  }
  return best.index < classes ? best.index : 0;  // every score NaN (NaN weights): class 0
}

template <typename T>
__global__ void __launch_bounds__(kBlock) vote_block_kernel(VoteArgs p, VotePlan plan) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red_v[kWarps];
  __shared__ int red_i[kWarps];
  const DeviceBlock b{red_v, red_i};
  for (int64_t r = blockIdx.x; r < p.draws; r += gridDim.x) {
    const int label = block_label<DeviceBlock, T>(b, p, plan, r, smem);
    const int64_t row = p.rows[r];  // not range-checked by the op on CUDA: a bad row casts no vote
    if (threadIdx.x == 0 && label >= 0 && row >= 0 && row < p.batch) {
      atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + row * p.classes + label), 1ULL);
    }
  }
}

// The most dynamic shared memory a launch of vote_block_kernel<T> may use on `device`: the
// device's opt-in limit less the kernel's static shared memory. The first call for a device
// sets the kernel's attribute to it, once: never lowered later, so threads launching with
// different class counts do not race on it (two first calls set the same value).
template <typename T>
int64_t block_kernel_room(int device) {
  constexpr int kDevices = 256;
  static std::atomic<int64_t> room[kDevices];
  if (device >= 0 && device < kDevices) {
    const int64_t known = room[device].load();
    if (known > 0) return known;
  }
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(shared memory per block)");
  cudaFuncAttributes attributes{};
  check_cuda(cudaFuncGetAttributes(&attributes, vote_block_kernel<T>), "cudaFuncGetAttributes(vote kernel)");
  const int64_t most = (int64_t)optin - (int64_t)attributes.sharedSizeBytes;
  check_cuda(cudaFuncSetAttribute(vote_block_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)most),
             "cudaFuncSetAttribute(vote kernel shared memory)");
  if (device >= 0 && device < kDevices) room[device].store(most);
  return most;
}

template <typename T>
void launch(const VoteArgs& p, int device, cudaStream_t stream) {
  const VotePlan plan = vote_cuda_plan(p, p.classes <= 32 ? 0 : block_kernel_room<T>(device));
  if (plan.kernel == 16) return launch_small<T, 16>(p, stream);
  if (plan.kernel == 32) return launch_small<T, 32>(p, stream);
  const int blocks = (int)(p.draws < (1 << 20) ? p.draws : (1 << 20));
  vote_block_kernel<T><<<blocks, kBlock, (size_t)plan.dynamic_bytes, stream>>>(p, plan);
  check_cuda(cudaGetLastError(), "vote kernel launch");
}

constexpr int kHostGuard = 4096;  // bytes past a block's shared memory that the host checks

template <typename T>
void run_block_on_host(const VoteArgs& p, const VotePlan& plan) {
  // garbage the program must not read (0xff: a NaN in any float type), and past its end a
  // guard it must not write (on the GPU, an access past the dynamic shared memory faults)
  const int64_t bytes = plan.dynamic_bytes + kHostGuard;
  unsigned char* smem = static_cast<unsigned char*>(malloc((size_t)bytes));
  if (smem == nullptr) throw std::bad_alloc();
  const HostBlock b;
  for (int64_t r = 0; r < p.draws; ++r) {
    memset(smem, 0xff, (size_t)bytes);
    const int label = block_label<HostBlock, T>(b, p, plan, r, smem);
    bool overrun = false;
    for (int64_t i = plan.dynamic_bytes; i < bytes; ++i) overrun |= smem[i] != 0xff;
    if (overrun) {
      free(smem);
      throw std::logic_error("the vote block program wrote past its shared memory");
    }
    if (label >= 0 && p.rows[r] >= 0 && p.rows[r] < p.batch) p.counts[p.rows[r] * p.classes + label] += 1;
  }
  free(smem);
}

template <typename T>
void run_on_host(const VoteArgs& args, const VotePlan& plan) {
  if (plan.kernel == 16) return run_small_on_host<T, 16>(args);
  if (plan.kernel == 32) return run_small_on_host<T, 32>(args);
  run_block_on_host<T>(args, plan);
}

}  // namespace

VotePlan vote_cuda_plan(const VoteArgs& p, int64_t room) {
  VotePlan plan{};
  if (p.classes <= 32) {
    plan.kernel = p.classes <= 16 ? 16 : 32;
    return plan;
  }
  if (p.agg == kMajorityVote) {  // the (label, summed weight) pairs: double, then int
    plan.dynamic_bytes = 12 * p.members;
    if (plan.dynamic_bytes > room) {
      throw std::invalid_argument("vote_ with agg='mv' on CUDA keeps 12 bytes of shared memory per member: " +
                                  std::to_string(p.members) + " members need " +
                                  std::to_string(plan.dynamic_bytes) + " bytes, the GPU has " +
                                  std::to_string(room) + " a block (at most " + std::to_string(room / 12) +
                                  " members)");
    }
  } else if (p.agg != kMaxMargin) {  // we / logit: a float score row, in chunks
    plan.chunk = p.classes < room / 4 ? p.classes : room / 4;
    if (plan.chunk < 1) throw std::invalid_argument("vote_: no shared memory for the score row");
    plan.dynamic_bytes = 4 * plan.chunk;
  }
  return plan;
}

void vote_cuda(const VoteArgs& args, int device, uintptr_t stream) {
  if (args.draws == 0) return;
  DeviceGuard guard(device);
  switch (args.logits_dtype) {
    case kFloat32:
      launch<float>(args, device, as_stream(stream));
      break;
    case kBFloat16:
      launch<__nv_bfloat16>(args, device, as_stream(stream));
      break;
    case kFloat16:
      launch<__half>(args, device, as_stream(stream));
      break;
  }
}

VotePlan vote_cuda_on_host(const VoteArgs& args, int64_t room) {
  const VotePlan plan = vote_cuda_plan(args, room);
  switch (args.logits_dtype) {
    case kBFloat16:
      run_on_host<__nv_bfloat16>(args, plan);
      break;
    case kFloat16:
      run_on_host<__half>(args, plan);
      break;
    default:
      run_on_host<float>(args, plan);
  }
  return plan;
}

}  // namespace drt
