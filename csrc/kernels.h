// Entry points of the kernels, as plain C++ (no torch, no pybind11, no CUDA types): raw
// pointers, sizes and, for CUDA, the device index and the caller's stream as an integer.
// bindings.cpp is the only includer besides the kernel sources. drt_fast/ops.py checks every
// argument before it gets here.
#pragma once

#include <stdint.h>

namespace drt {

// Output / logits dtype codes (drt_fast/ops.py _DTYPE_CODE) and aggregation codes (_AGG_CODE).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Aggregation : int { kWeightedSoftmax = 0, kLogit = 1, kMaxMargin = 2, kMajorityVote = 3 };

// Shared arguments of noisy_draws and noisy_draws_discrete. Row n = b * reps + r of `out` is
// element by element, rounded to out_dtype (csrc/philox.h):
// * Gaussian (`v` null): x[b] + sigma * z(seed, keys[b], first_draw[b] + r, element), x fp32
//   [batch, num_elements] contiguous;
// * discrete (`x` null): (v[b] + I(seed, keys[b], first_draw[b] + r, element)) / grid, v int32
//   grid indices [batch, num_elements] contiguous, I = -half_width + #{i : T[i] <= U} with
//   T = thresholds[0 .. 2 * half_width) ascending and its guide of 2^guide_bits + 1 entries.
// Where an output is NaN (a NaN input), the dtype's canonical NaN below, on every device (a
// GPU's arithmetic and conversions give 0x7FFFFFFF / 0x7FFF, x86's keep the input's sign and
// payload): drt_fast.ops.reference_noisy_draws writes the same.
constexpr uint32_t kNaNFloat32 = 0x7FC00000u;
constexpr uint16_t kNaNBFloat16 = 0x7FC0u;  // torch's float -> bfloat16 on the CPU
constexpr uint16_t kNaNFloat16 = 0x7E00u;
// out is [batch * reps, num_elements] contiguous, or, with channels_last, [batch * reps,
// spatial, channels] in memory where the logical element index is c * spatial + s.
struct NoisyDrawsArgs {
  const float* x;
  const int64_t* keys;
  const int64_t* first_draw;
  void* out;
  int64_t batch, num_elements, reps;
  float sigma;
  uint64_t seed;
  int out_dtype;
  bool channels_last;
  int64_t channels, spatial;
  const int32_t* v;
  const uint64_t* thresholds;
  int64_t half_width;
  const int32_t* guide;
  int guide_bits;
  float grid;
};

// Shared arguments of vote: logits [members, draws, classes] contiguous in `logits_dtype`,
// rows [draws], counts [batch, classes] int64 updated in place, weights [members] fp32.
struct VoteArgs {
  const void* logits;
  int logits_dtype;
  int64_t members, draws, classes;
  const int64_t* rows;
  int64_t* counts;
  int64_t batch;
  int agg;
  const float* weights;
};

void noisy_draws_cpu(const NoisyDrawsArgs& args);
void noisy_draws_discrete_cpu(const NoisyDrawsArgs& args);

// A test hook over the Gaussian noise of draws first_draw .. first_draw + draws - 1 of the
// input `key` (elements 0 .. num_elements - 1): counts[i] = how many normals have
// |z| > thresholds[i], and *largest = the largest |z| above kTailCountFloor (0 if none).
// Only pairs that need their tail word reach that floor (philox.h), so the hook generates
// every main block but computes normals only for those: cheap enough for 10^9 normals.
constexpr float kTailCountFloor = 4.86f;  // > sqrt(34 ln 2), the radius bound of the other pairs
struct TailCountArgs {
  uint64_t seed, key;
  int64_t first_draw, draws, num_elements;
  const float* thresholds;  // each > kTailCountFloor
  int64_t num_thresholds;
  int64_t* counts;
  float* largest;
};
void gaussian_tail_count_cpu(const TailCountArgs& args);

// bias_act: h [rows, cols] fp32 contiguous, in place h = act(h + bias) with bias [cols] fp32;
// act is ReLU when relu, else the identity.
struct BiasActArgs {
  float* h;
  const float* bias;
  int64_t rows, cols;
  bool relu;
};

void bias_act_cpu(const BiasActArgs& args);

// dense_chain: a dense member's whole forward on the CPU (drt_fast/fuse.py DenseMember), fp32.
// x [rows, in_cols] with row stride ldx, out [rows, out_cols] contiguous. `meta` (int64,
// built by fuse._chain_plan) describes the layers; `params` holds their weights and biases:
//   meta = [layers, in_cols, out_cols, max_width,
//           per layer: width, relu, bias_offset, blocks,
//             per block: lo, hi, c0, block_width, weight_offset]
// Layer l reads columns [lo, hi) of its input (x, or layer l-1's output of width
// width[l-1]) and writes columns [c0, c0 + block_width) of its output of width `width`:
//   h_l[:, c0:c0+bw] = act(h_{l-1}[:, lo:hi] @ W + bias[c0:c0+bw]),
// W [hi - lo, bw] row-major at params + weight_offset, bias [width] at params + bias_offset.
// Widths and block widths are multiples of kDenseChunk, offsets multiples of 16. The
// output is the last layer's first out_cols columns. Each output row is a function of its
// input row alone, summed in a fixed order: the result does not depend on the batch.
constexpr int64_t kDenseChunk = 32;
struct DenseChainArgs {
  const float* x;
  int64_t rows, cols, ldx;  // cols must equal the plan's in_cols
  float* out;
  int64_t out_cols;  // must equal the plan's out_cols
  const int64_t* meta;
  int64_t meta_len;
  const float* params;
  int64_t params_len;
};

// Throws std::invalid_argument when meta is inconsistent (nothing is written then).
void dense_chain_cpu(const DenseChainArgs& args);

// Returns -1, or the index of a draw whose row is outside [0, batch) (then counts is untouched).
int64_t vote_cpu(const VoteArgs& args);

// The CPU kernel build in use ("baseline", "avx2" or "avx512"; the best the CPU supports), and
// a way to force one (tests check that all builds agree). set_cpu_isa throws when unsupported.
const char* cpu_isa();
void set_cpu_isa(const char* isa);

}  // namespace drt
