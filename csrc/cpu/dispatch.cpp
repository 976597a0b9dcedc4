// Runtime choice of the CPU kernel build: noise.cpp, vote.cpp and dense.cpp are compiled three times
// (baseline x86-64, AVX2, AVX-512; CMakeLists.txt), each into its own namespace, and the
// best one this CPU supports runs. torch's own kernels dispatch the same way, and a
// fixed -march would either leave speed unused or crash on older CPUs.
#include <string.h>

#include <new>
#include <stdexcept>
#include <string>

#include "../kernels.h"

namespace drt {

#define DRT_DECLARE_ISA(ns)                                  \
  namespace ns {                                             \
  void noisy_draws_cpu(const NoisyDrawsArgs& args);          \
  void noisy_draws_discrete_cpu(const NoisyDrawsArgs& args); \
  void gaussian_tail_count_cpu(const TailCountArgs& args);   \
  int64_t vote_cpu(const VoteArgs& args);                    \
  void bias_act_cpu(const BiasActArgs& args);                \
  bool dense_chain_run(const DenseChainArgs& args);          \
  }
DRT_DECLARE_ISA(isa_baseline)
#ifdef DRT_FAST_X86_ISAS
DRT_DECLARE_ISA(isa_avx2)
DRT_DECLARE_ISA(isa_avx512)
#endif
#undef DRT_DECLARE_ISA

namespace {

bool supported(const char* isa) {
  if (strcmp(isa, "baseline") == 0) return true;
#ifdef DRT_FAST_X86_ISAS
  __builtin_cpu_init();
  if (strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (strcmp(isa, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return false;
}

const char* best_isa() {
  if (supported("avx512")) return "avx512";
  if (supported("avx2")) return "avx2";
  return "baseline";
}

const char* g_isa = best_isa();

}  // namespace

const char* cpu_isa() { return g_isa; }

void set_cpu_isa(const char* isa) {
  for (const char* known : {"baseline", "avx2", "avx512"}) {
    if (strcmp(isa, known) == 0) {
      if (!supported(known)) throw std::invalid_argument(std::string("this CPU or build lacks ") + isa);
      g_isa = known;
      return;
    }
  }
  throw std::invalid_argument(std::string("unknown CPU ISA ") + isa + " (baseline, avx2, avx512)");
}

// The chosen build's `fn(args)` (a void function may return a void expression).
#ifdef DRT_FAST_X86_ISAS
#define DRT_DISPATCH(fn, args)                                              \
  if (g_isa[0] == 'a') {                                                    \
    if (strcmp(g_isa, "avx512") == 0) return isa_avx512::fn(args);          \
    return isa_avx2::fn(args);                                              \
  }                                                                         \
  return isa_baseline::fn(args)
#else
#define DRT_DISPATCH(fn, args) return isa_baseline::fn(args)
#endif

void noisy_draws_cpu(const NoisyDrawsArgs& args) { DRT_DISPATCH(noisy_draws_cpu, args); }

void noisy_draws_discrete_cpu(const NoisyDrawsArgs& args) { DRT_DISPATCH(noisy_draws_discrete_cpu, args); }

void gaussian_tail_count_cpu(const TailCountArgs& args) { DRT_DISPATCH(gaussian_tail_count_cpu, args); }

int64_t vote_cpu(const VoteArgs& args) { DRT_DISPATCH(vote_cpu, args); }

void bias_act_cpu(const BiasActArgs& args) { DRT_DISPATCH(bias_act_cpu, args); }

namespace {
void check_dense_chain(const DenseChainArgs& p);
}

namespace {
bool dense_chain_dispatch(const DenseChainArgs& args) { DRT_DISPATCH(dense_chain_run, args); }
}  // namespace

void dense_chain_cpu(const DenseChainArgs& args) {
  check_dense_chain(args);
  if (!dense_chain_dispatch(args)) throw std::bad_alloc();
}

#undef DRT_DISPATCH

namespace {

// The plan is built by drt_fast (fuse._chain_plan), but it is checked here, once per call,
// against every size and offset the kernels will use: a wrong plan must not reach memory.
void check_dense_chain(const DenseChainArgs& p) {
  auto fail = [](const char* what) { throw std::invalid_argument(std::string("dense_chain: bad plan: ") + what); };
  const int64_t* m = p.meta;
  if (p.meta_len < 4 || p.rows < 0) fail("header");
  const int64_t layers = m[0], in_cols = m[1], out_cols = m[2], max_width = m[3];
  if (layers < 1 || in_cols < 1 || out_cols < 1 || max_width < 1) fail("sizes");
  if (p.cols != in_cols || p.out_cols != out_cols || (p.rows > 1 && p.ldx < in_cols)) fail("input or output columns");
  // Every bound below is written so that no sum or product can overflow: a plan's values
  // come from a tensor, and a wrapped check would let a huge offset reach memory.
  int64_t at = 4, src_width = in_cols, width = 0, widest = 0;
  for (int64_t l = 0; l < layers; ++l) {
    if (at + 4 > p.meta_len) fail("truncated");
    width = m[at];
    const int64_t bias_off = m[at + 2], blocks = m[at + 3];
    at += 4;
    if (width < kDenseChunk || width % kDenseChunk || width > max_width || blocks < 1) fail("layer width");
    if (bias_off < 0 || bias_off % 16 || bias_off > p.params_len - width) fail("bias offset");
    if (m[at - 3] != 0 && m[at - 3] != 1) fail("relu flag");
    if (blocks > (p.meta_len - at) / 5) fail("truncated");
    int64_t covered = 0;  // the blocks write the layer's columns in order, each exactly once
    for (int64_t b = 0; b < blocks; ++b, at += 5) {
      const int64_t lo = m[at], hi = m[at + 1], c0 = m[at + 2], bw = m[at + 3], w_off = m[at + 4];
      if (lo < 0 || hi < lo || hi > src_width) fail("block rows");
      if (c0 != covered || bw < kDenseChunk || bw % kDenseChunk || bw > width - c0) fail("block columns");
      if (w_off < 0 || w_off % 16 || w_off > p.params_len || (hi > lo && bw > (p.params_len - w_off) / (hi - lo)))
        fail("weight offset");
      covered += bw;
    }
    if (covered != width) fail("block columns");
    src_width = width;
    widest = width > widest ? width : widest;
  }
  if (at != p.meta_len || out_cols > width) fail("length");
  // the kernel's scratch is sized by max_width: it must be the widest layer, no more
  if (max_width != widest) fail("sizes");
}

}  // namespace

}  // namespace drt
