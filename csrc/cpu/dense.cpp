// bias_act_ on the CPU: h[i, j] = act(h[i, j] + bias[j]) in place, one pass over h. A dense
// member's layer is `torch.mm` then this (drt_fast/fuse.py DenseMember): `addmm` would copy
// the bias into its output before the GEMM and a ReLU would pass over it again.
//
// Compiled once per ISA (CMakeLists.txt, dispatch.cpp) like noise.cpp: one add and one max
// per element, exact in every build. No STL: an AVX-512 TU must not lend code to the
// baseline build.
#include "../kernels.h"

namespace drt {
namespace DRT_ISA_NAMESPACE {

namespace {
constexpr int64_t kMinParallelElements = 1 << 15;  // below that a parallel region costs more than it saves
}

void bias_act_cpu(const BiasActArgs& p) {
  const bool parallel = p.rows * p.cols >= kMinParallelElements;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < p.rows; ++i) {
    float* row = p.h + i * p.cols;
    if (p.relu) {
#pragma omp simd
      for (int64_t j = 0; j < p.cols; ++j) {
        const float v = row[j] + p.bias[j];
        row[j] = v < 0.0f ? 0.0f : v;  // NaN stays NaN, like torch.relu
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < p.cols; ++j) row[j] += p.bias[j];
    }
  }
}

}  // namespace DRT_ISA_NAMESPACE
}  // namespace drt
