// Runtime choice of the CPU kernel build: noise.cpp, vote.cpp and dense.cpp are compiled three times
// (baseline x86-64, AVX2, AVX-512; CMakeLists.txt), each into its own namespace, and the
// best one this CPU supports runs. torch's own kernels dispatch the same way, and a
// fixed -march would either leave speed unused or crash on older CPUs.
#include <string.h>

#include <stdexcept>
#include <string>

#include "../kernels.h"

namespace drt {

#define DRT_DECLARE_ISA(ns)                         \
  namespace ns {                                    \
  void noisy_draws_cpu(const NoisyDrawsArgs& args); \
  int64_t vote_cpu(const VoteArgs& args);           \
  void bias_act_cpu(const BiasActArgs& args);       \
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

int64_t vote_cpu(const VoteArgs& args) { DRT_DISPATCH(vote_cpu, args); }

void bias_act_cpu(const BiasActArgs& args) { DRT_DISPATCH(bias_act_cpu, args); }

#undef DRT_DISPATCH

}  // namespace drt
