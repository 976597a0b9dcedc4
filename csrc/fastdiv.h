// Division of 32-bit unsigned integers below 2^31 by a divisor fixed for a whole launch, as a
// multiply-high, an add and a shift (Granlund & Montgomery; the construction torch's
// IntDivider uses). A GPU has no integer divider: a 64-bit `/` is a few dozen instructions,
// which in noisy_draws cost as much as the noise itself. Host and device code.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define DRT_FASTDIV_HD __host__ __device__ __forceinline__
#else
#define DRT_FASTDIV_HD static inline
#endif

namespace drt {

struct FastDiv {
  uint32_t divisor, magic, shift;
};

// For 1 <= divisor < 2^31 (callers check; 0 would divide by zero below).
inline FastDiv make_fast_div(uint32_t divisor) {
  uint32_t shift = 0;
  while ((1u << shift) < divisor) ++shift;  // ceil(log2(divisor)) <= 31
  const uint64_t one = 1;
  const uint64_t magic = ((one << 32) * ((one << shift) - divisor)) / divisor + 1;  // < 2^32
  return FastDiv{divisor, (uint32_t)magic, shift};
}

DRT_FASTDIV_HD uint32_t mul_hi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * b) >> 32);
#endif
}

// n / d.divisor for n < 2^31 (then t + n < 2^32: t <= n).
DRT_FASTDIV_HD uint32_t fast_div(uint32_t n, const FastDiv& d) { return (mul_hi(n, d.magic) + n) >> d.shift; }

}  // namespace drt
