// Counter-based Gaussian noise: Philox4x32-10 + Box-Muller, for host and device code.
//
// Noise element e of draw d of the input with key k under seed s (docs/internals.md):
//   Philox4x32-10 with key (s_lo, s_hi) and counter (e / 4, d, k_lo, k_hi) gives four
//   uint32 words; Box-Muller turns words (0,1) into normals of elements 4q, 4q+1 and words
//   (2,3) into those of 4q+2, 4q+3.
//
// Everything after Philox uses only IEEE basic operations (+ - * / sqrt), each rounded once
// (compile with -ffp-contract=off / nvcc --fmad=false), with our own log and sin/cos
// polynomials, so that the CPU kernel, the CUDA kernel and the pure-torch reference in
// drt_fast/ops.py produce bit-identical fp32 noise. Change one, change all three.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define DRT_HD __host__ __device__ __forceinline__
#else
#define DRT_HD static inline  // internal linkage: TUs built for different ISAs never share a copy
#endif

namespace drt {

// Philox4x32 multipliers and Weyl key increments (Salmon et al., SC'11; Random123).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t w[4];
};

DRT_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = (uint64_t)kPhiloxM0 * c0;
    const uint64_t p1 = (uint64_t)kPhiloxM1 * c2;
    const uint32_t next0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    const uint32_t next2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;
    c3 = (uint32_t)p0;
    c0 = next0;
    c2 = next2;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// fp32 constants as hex literals: the same bits as the Python reference's float.fromhex.
namespace noise_const {
constexpr float kSqrt2 = 0x1.6a09e6p+0f;
constexpr float kLn2 = 0x1.62e430p-1f;
constexpr float kAtanh3 = 0x1.555556p-2f, kAtanh5 = 0x1.99999ap-3f, kAtanh7 = 0x1.24924ap-3f,
                kAtanh9 = 0x1.c71c72p-4f;  // 1/3 1/5 1/7 1/9
constexpr float kSin3 = -0x1.555556p-3f, kSin5 = 0x1.111112p-7f, kSin7 = -0x1.a01a02p-13f,
                kSin9 = 0x1.71de3ap-19f;  // -1/3! 1/5! -1/7! 1/9!
constexpr float kCos2 = -0x1p-1f, kCos4 = 0x1.555556p-5f, kCos6 = -0x1.6c16c2p-10f, kCos8 = 0x1.a01a02p-16f,
                kCos10 = -0x1.27e4fcp-22f;    // -1/2! 1/4! ... -1/10!
constexpr float kHalfPiStep = 0x1.921fb6p-22f;  // (pi/2) / 2^22, one step of the angle grid
}  // namespace noise_const

DRT_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DRT_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// cond ? a : b and cond ? -v : v (cond 0 or 1) with bit masks: random quadrants would make
// branches mispredict half the time, and vectorizers handle masks best.
DRT_HD float select(uint32_t cond, float a, float b) {
  const uint32_t mask = 0u - cond;
  return bits_as_float((float_as_bits(a) & mask) | (float_as_bits(b) & ~mask));
}

DRT_HD float negate_if(uint32_t cond, float v) { return bits_as_float(float_as_bits(v) ^ (cond << 31)); }

// t * (c0 + t * (c1 + ... + t * c_last)) with one rounding per operation, in the order of
// drt_fast/ops.py's _horner (the constant term of the polynomial is added by the caller).
DRT_HD float horner_tail(float t, float c_last) { return t * c_last; }

template <typename... Rest>
DRT_HD float horner_tail(float t, float c, Rest... rest) {
  const float inner = horner_tail(t, rest...);
  const float sum = inner + c;
  return sum * t;
}

// ln(k * 2^-24) for an integer k in [1, 2^24], i.e. the log of a uniform in (0, 1].
// Relative error about 1e-7 (atanh series to s^9 with |s| <= 0.172).
DRT_HD float log_u24(uint32_t k) {
  using namespace noise_const;
  const uint32_t bits = float_as_bits((float)(int32_t)k);  // exact: k <= 2^24
  int e = (int)(bits >> 23) - (127 + 24);
  float m = bits_as_float((bits & 0x7FFFFFu) | 0x3F800000u);  // mantissa in [1, 2)
  const uint32_t big = m > kSqrt2;  // centre the mantissa on 1 so that the series converges fast
  m = select(big, m * 0.5f, m);
  e += (int)big;
  const float s = (m - 1.0f) / (m + 1.0f);  // ln m = 2 atanh(s)
  const float s2 = s * s;
  const float atanh_s = horner_tail(s2, kAtanh3, kAtanh5, kAtanh7, kAtanh9) * s + s;
  const float e_ln2 = (float)e * kLn2;
  return e_ln2 + 2.0f * atanh_s;
}

// sin and cos of the angle 2*pi * m / 2^24 for an integer m in [0, 2^24). The quadrant and
// the octant come from the integer bits (exact), the polynomials see an angle in [0, pi/4].
DRT_HD void sincos_u24(uint32_t m, float* sin_out, float* cos_out) {
  using namespace noise_const;
  const uint32_t quadrant = m >> 22;
  const uint32_t rem = m & 0x3FFFFFu;
  const uint32_t upper = rem >= (1u << 21);  // upper half of the quadrant: use the complementary angle
  const uint32_t steps = upper ? (1u << 22) - rem : rem;
  const float a = (float)(int32_t)steps * kHalfPiStep;  // steps <= 2^21: exact
  const float a2 = a * a;
  const float sin_a = horner_tail(a2, kSin3, kSin5, kSin7, kSin9) * a + a;
  const float cos_a = horner_tail(a2, kCos2, kCos4, kCos6, kCos8, kCos10) + 1.0f;
  const float sin_phi = select(upper, cos_a, sin_a);
  const float cos_phi = select(upper, sin_a, cos_a);
  // rotate by the quadrant: cos = (c, -s, -c, s)[q], sin = (s, c, -s, -c)[q]
  const uint32_t odd = quadrant & 1u;
  *cos_out = negate_if(((quadrant + 1u) >> 1) & 1u, select(odd, sin_phi, cos_phi));
  *sin_out = negate_if(quadrant >> 1, select(odd, cos_phi, sin_phi));
}

// Two independent standard normals from two uniform uint32 words (their top 24 bits).
DRT_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float radius = sqrtf(log_u24((a >> 8) + 1u) * -2.0f);
  float s, c;
  sincos_u24(b >> 8, &s, &c);
  *z0 = radius * c;
  *z1 = radius * s;
}

// The four normals of elements 4q .. 4q+3 of draw `draw` of input `key` under `seed`.
DRT_HD void normals4(uint64_t seed, uint64_t key, uint32_t draw, uint32_t quad, float z[4]) {
  const Philox4 r = philox4x32_10(quad, draw, (uint32_t)key, (uint32_t)(key >> 32), (uint32_t)seed,
                                  (uint32_t)(seed >> 32));
  box_muller(r.w[0], r.w[1], &z[0], &z[1]);
  box_muller(r.w[2], r.w[3], &z[2], &z[3]);
}

}  // namespace drt
