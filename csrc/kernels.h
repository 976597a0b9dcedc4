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

// Shared arguments of noisy_draws. Row n = b * reps + r of `out` is
// x[b] + sigma * noise(seed, keys[b], first_draw[b] + r, element), rounded to out_dtype.
// x is fp32 [batch, num_elements] contiguous; out is [batch * reps, num_elements] contiguous,
// or, with channels_last, [batch * reps, spatial, channels] in memory where the logical
// element index is c * spatial + s.
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

// bias_act: h [rows, cols] fp32 contiguous, in place h = act(h + bias) with bias [cols] fp32;
// act is ReLU when relu, else the identity.
struct BiasActArgs {
  float* h;
  const float* bias;
  int64_t rows, cols;
  bool relu;
};

void bias_act_cpu(const BiasActArgs& args);

// Returns -1, or the index of a draw whose row is outside [0, batch) (then counts is untouched).
int64_t vote_cpu(const VoteArgs& args);

// The CPU kernel build in use ("baseline", "avx2" or "avx512"; the best the CPU supports), and
// a way to force one (tests check that all builds agree). set_cpu_isa throws when unsupported.
const char* cpu_isa();
void set_cpu_isa(const char* isa);

}  // namespace drt
