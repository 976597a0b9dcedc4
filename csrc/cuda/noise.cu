// noisy_draws and noisy_draws_discrete on CUDA. Compiled with --fmad=false, IEEE div/sqrt and
// no flush to zero, pinned after any user flags (CMakeLists.txt): the noise is bit-identical to
// the CPU kernel and the torch reference.
//
// A work item is one Philox call: four values, for elements 4q .. 4q+3 of the logical
// (C, H, W) order of one output row. Three paths, chosen per launch (`plan`):
// * contiguous: an item per (row, quad); the row and the input come from two divisions by
//   launch constants done as multiply-high + shift (fastdiv.h): a GPU has no integer
//   divider, and the 64-bit divisions of the general path cost as much as the noise itself.
//   Where rows are whole quads and the pointers aligned, an item reads its four inputs and
//   writes its four outputs as single vector accesses, so a warp writes 512 (fp32) or 256
//   (bf16/fp16) consecutive bytes;
// * channels-last with 2-4 channels and H*W a multiple of 4: an item per (row, 4 spatial
//   positions) makes one Philox call per channel and writes the 4*C consecutive outputs of
//   those positions (s*C + c) with C vector stores;
// * general (anything else: odd layouts, more than 2^31 items): one thread per (row, quad),
//   64-bit index arithmetic, scalar stores.
// Every path computes each output element by `quad_values`: x + sigma * z with z =
// normals4(seed, key, draw, quad)[j] (Gaussian), or (v + I) / grid with I = discrete4(...)[j]
// (discrete, when args.v is set): only which thread computes it, and how it is stored,
// differ. The paths run on the host too (`noisy_draws_cuda_on_host`, a test hook), so that
// their indexing is tested on machines without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <string.h>

#include "../fastdiv.h"
#include "../philox.h"
#include "cuda_kernels.h"
#include "cuda_utils.cuh"

namespace drt {
namespace {

// As torch's .to(), but a NaN becomes the dtype's canonical NaN (kernels.h: the GPU's
// arithmetic and conversions give 0x7FFFFFFF / 0x7FFF, the CPU kernel the same as here),
// tested and chosen on the bits, which no compiler folds away as it may a float comparison.
DRT_HD uint32_t bits_of(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  return u;
}
DRT_HD bool is_nan(float v) { return (bits_of(v) & 0x7FFFFFFFu) > 0x7F800000u; }
template <typename T>
DRT_HD T from_bits(uint32_t u) {
  T t;
  memcpy(&t, &u, sizeof t);  // the low bytes: little-endian, on the host and the GPU
  return t;
}
DRT_HD float convert(float v, float*) { return from_bits<float>(is_nan(v) ? kNaNFloat32 : bits_of(v)); }
DRT_HD __nv_bfloat16 convert(float v, __nv_bfloat16*) {
  const __nv_bfloat16 rounded = __float2bfloat16_rn(v);  // converted first: a select, no branch
  return is_nan(v) ? from_bits<__nv_bfloat16>(kNaNBFloat16) : rounded;
}
DRT_HD __half convert(float v, __half*) {
  const __half rounded = __float2half_rn(v);
  return is_nan(v) ? from_bits<__half>(kNaNFloat16) : rounded;
}

// Four consecutive outputs from out + i; `vector`: out + i is aligned to 4 elements.
template <typename T>
DRT_HD void store4(T* out, const float v[4], bool vector) {
  T t[4];
  for (int j = 0; j < 4; ++j) t[j] = convert(v[j], out);
  if (!vector) {
    for (int j = 0; j < 4; ++j) out[j] = t[j];
  } else if constexpr (sizeof(T) == 4) {
    float4 bits;
    memcpy(&bits, t, sizeof bits);
    *reinterpret_cast<float4*>(out) = bits;
  } else {
    static_assert(sizeof(T) == 2, "fp32, bf16 or fp16");
    uint2 bits;
    memcpy(&bits, t, sizeof bits);
    *reinterpret_cast<uint2*>(out) = bits;
  }
}

// The first `count` (<= 4) of four consecutive inputs (float or int32) from x: all four as
// one 16-byte access when `vector` (x aligned to 4 elements).
template <typename T>
DRT_HD void load4(const T* x, T v[4], bool vector, int count) {
  static_assert(sizeof(T) == 4, "4-byte inputs");
  if (vector) {
    const int4 q = *reinterpret_cast<const int4*>(x);
    memcpy(v, &q, sizeof q);
  } else {
    for (int j = 0; j < count; ++j) v[j] = x[j];
  }
}

// The values of elements 4q .. 4q+3 (the first `count` of them) of a draw of input b:
// x + sigma * z (Gaussian) or (v + I) / grid (Discrete).
template <bool Discrete>
DRT_HD void quad_values(const NoisyDrawsArgs& p, int64_t b, uint32_t draw, uint32_t q, bool vector, int count,
                        float out[4]) {
  const uint64_t key = (uint64_t)p.keys[b];
  const int64_t at = b * p.num_elements + 4 * (int64_t)q;
  if constexpr (Discrete) {
    int32_t noise[4], v[4];
    discrete4(p.seed, key, draw, q, p.thresholds, p.half_width, p.guide, p.guide_bits, noise);
    load4(p.v + at, v, vector, count);
    for (int j = 0; j < count; ++j) out[j] = grid_value(v[j], noise[j], p.grid);
  } else {
    float z[4], x[4];
    normals4(p.seed, key, draw, q, z);
    load4(p.x + at, x, vector, count);
    for (int j = 0; j < count; ++j) out[j] = x[j] + p.sigma * z[j];
  }
}

enum Path : int { kGeneral = 0, kContiguous = 1, kChannelsLast = 2 };

struct Plan {
  NoisyDrawsArgs p;
  int path;
  bool vector;     // inputs and outputs as aligned 4-element accesses
  int64_t items;   // work items of the launch
  FastDiv per_row; // items per output row (fast paths)
  FastDiv reps;    // draws per input (fast paths)
};

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
Plan make_plan(const NoisyDrawsArgs& p) {
  Plan plan{};
  plan.p = p;
  const int64_t quads = (p.num_elements + 3) / 4;
  const int64_t rows = p.batch * p.reps;
  const bool channels_last = p.channels_last && p.channels > 1;
  const bool whole_quads = p.num_elements % 4 == 0;
  const void* input = p.v != nullptr ? static_cast<const void*>(p.v) : static_cast<const void*>(p.x);
  const bool vector_ok = whole_quads && aligned(input, 16) && aligned(p.out, 4 * sizeof(T));
  const int64_t limit = (int64_t)1 << 31;  // fast_div's range
  if (rows * quads == 0) return plan;       // nothing to write (no divisor may be 0)
  if (!channels_last && rows * quads < limit) {
    plan.path = kContiguous;
    plan.vector = vector_ok;
    plan.items = rows * quads;
    plan.per_row = make_fast_div((uint32_t)quads);
  } else if (channels_last && p.channels <= 4 && p.spatial % 4 == 0 && vector_ok &&
             rows * (p.spatial / 4) < limit) {
    plan.path = kChannelsLast;
    plan.vector = true;
    plan.items = rows * (p.spatial / 4);
    plan.per_row = make_fast_div((uint32_t)(p.spatial / 4));
  } else {
    plan.path = kGeneral;
    plan.items = rows * quads;
    return plan;
  }
  plan.reps = make_fast_div((uint32_t)p.reps);  // reps <= rows < 2^31
  return plan;
}

// One work item of each path. `t` < plan.items.
template <typename T, bool Discrete>
DRT_HD void contiguous_item(const Plan& plan, uint32_t t) {
  const NoisyDrawsArgs& p = plan.p;
  const uint32_t n = fast_div(t, plan.per_row), q = t - n * plan.per_row.divisor;  // row, quad
  const uint32_t b = fast_div(n, plan.reps), r = n - b * plan.reps.divisor;       // input, draw
  const int64_t e = 4 * (int64_t)q;
  const int count = e + 4 <= p.num_elements ? 4 : (int)(p.num_elements - e);     // the row's last quad may be partial
  float v[4];
  quad_values<Discrete>(p, b, (uint32_t)(p.first_draw[b] + r), q, plan.vector, count, v);
  T* out = static_cast<T*>(p.out) + (int64_t)n * p.num_elements + e;
  if (count == 4) {
    store4(out, v, plan.vector);
  } else {
    for (int j = 0; j < count; ++j) out[j] = convert(v[j], out);
  }
}

template <typename T, bool Discrete, int C>
DRT_HD void channels_last_item(const Plan& plan, uint32_t t) {
  const NoisyDrawsArgs& p = plan.p;
  const uint32_t n = fast_div(t, plan.per_row), u = t - n * plan.per_row.divisor;  // row, 4 positions
  const uint32_t b = fast_div(n, plan.reps), r = n - b * plan.reps.divisor;
  const uint32_t draw = (uint32_t)(p.first_draw[b] + r);
  const int64_t s = 4 * (int64_t)u;  // first spatial position
  float v[4 * C];                    // v[j * C + c]: position s + j, channel c
  for (int c = 0; c < C; ++c) {
    float values[4];
    // logical elements c * spatial + s + j: quad c * spatial / 4 + u, element j of it
    quad_values<Discrete>(p, b, draw, (uint32_t)(c * (p.spatial / 4)) + u, true, 4, values);
    for (int j = 0; j < 4; ++j) v[j * C + c] = values[j];
  }
  T* out = static_cast<T*>(p.out) + (int64_t)n * p.num_elements + s * C;  // 4 * C consecutive
  for (int k = 0; k < C; ++k) store4(out + 4 * k, v + 4 * k, true);
}

template <typename T, bool Discrete>
DRT_HD void general_item(const Plan& plan, int64_t t) {
  const NoisyDrawsArgs& p = plan.p;
  const int64_t quads = (p.num_elements + 3) / 4;
  const int64_t n = t / quads, q = t - n * quads;  // output row, quad within the row
  const int64_t b = n / p.reps, r = n - b * p.reps;
  const int count = 4 * q + 4 <= p.num_elements ? 4 : (int)(p.num_elements - 4 * q);
  float v[4];
  quad_values<Discrete>(p, b, (uint32_t)(p.first_draw[b] + r), (uint32_t)q, false, count, v);
  T* out = static_cast<T*>(p.out);
  for (int j = 0; j < count; ++j) {
    const int64_t e = 4 * q + j;
    int64_t index = n * p.num_elements + e;
    if (p.channels_last) {  // logical element c * spatial + s lives at s * channels + c
      const int64_t c = e / p.spatial, sp = e - c * p.spatial;
      index = n * p.num_elements + sp * p.channels + c;
    }
    out[index] = convert(v[j], out);
  }
}

template <typename T, bool Discrete>
DRT_HD void item(const Plan& plan, int64_t t) {
  switch (plan.path) {
    case kContiguous:
      contiguous_item<T, Discrete>(plan, (uint32_t)t);
      break;
    case kChannelsLast:
      if (plan.p.channels == 2) channels_last_item<T, Discrete, 2>(plan, (uint32_t)t);
      if (plan.p.channels == 3) channels_last_item<T, Discrete, 3>(plan, (uint32_t)t);
      if (plan.p.channels == 4) channels_last_item<T, Discrete, 4>(plan, (uint32_t)t);
      break;
    default:
      general_item<T, Discrete>(plan, t);
  }
}

template <typename T, bool Discrete>
__global__ void noisy_draws_kernel(const Plan plan) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < plan.items; t += stride)
    item<T, Discrete>(plan, t);
}

template <typename T>
void launch(const NoisyDrawsArgs& args, cudaStream_t stream) {
  const Plan plan = make_plan<T>(args);
  if (plan.items == 0) return;
  constexpr int kBlock = 256;
  if (args.v != nullptr) {
    noisy_draws_kernel<T, true><<<grid_size(plan.items, kBlock), kBlock, 0, stream>>>(plan);
  } else {
    noisy_draws_kernel<T, false><<<grid_size(plan.items, kBlock), kBlock, 0, stream>>>(plan);
  }
  check_cuda(cudaGetLastError(), "noisy_draws kernel launch");
}

template <typename T>
int run_on_host(const NoisyDrawsArgs& args) {
  const Plan plan = make_plan<T>(args);
  for (int64_t t = 0; t < plan.items; ++t) {
    if (args.v != nullptr) {
      item<T, true>(plan, t);
    } else {
      item<T, false>(plan, t);
    }
  }
  return plan.path;
}

}  // namespace

void noisy_draws_cuda(const NoisyDrawsArgs& args, int device, uintptr_t stream) {
  DeviceGuard guard(device);
  switch (args.out_dtype) {
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

int noisy_draws_cuda_on_host(const NoisyDrawsArgs& args) {
  switch (args.out_dtype) {
    case kBFloat16:
      return run_on_host<__nv_bfloat16>(args);
    case kFloat16:
      return run_on_host<__half>(args);
    default:
      return run_on_host<float>(args);
  }
}

}  // namespace drt
