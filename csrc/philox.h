// Counter-based Gaussian noise: Philox4x32-10 + Box-Muller, for host and device code.
//
// Noise element e of draw d of the input with key k under seed s (docs/internals.md, Noise):
// the main block of quad q = e / 4 is Philox4x32-10 with key (s_lo, s_hi) and counter
// (q, d, k_lo, k_hi); its words (w0, w1) make the normals of elements 4q, 4q+1 and (w2, w3)
// those of 4q+2, 4q+3. For a pair (a, b):
//   angle  = 2*pi * (b >> 8) / 2^24;
//   W      = a * 2^32 + (b & 0xFF) * 2^24 + (c >> 8), a 64-bit uniform, where c is word j
//            of pair j's tail block (counter (2^30 + q, d, k_lo, k_hi)); c only matters, and
//            is only computed, when a < 2^15 (one pair in 2^17);
//   u      = W's top 24 significant bits plus one unit in the last of them, over 2^64: an
//            exact (exponent, 24-bit mantissa) pair in [2^-64, 1], never rounded to a float;
//   radius = sqrt(-2 ln u), up to sqrt(128 ln 2) = 9.42, with P(radius > t) within 2e-5
//            relative of the Gaussian's exp(-t^2/2) for every t up there;
//   z_{2j} = radius * cos(angle), z_{2j+1} = radius * sin(angle).
//
// Everything after Philox uses only IEEE basic operations (+ - * / sqrt), each rounded once
// (compile with -ffp-contract=off / nvcc --fmad=false), with our own log and sin/cos
// polynomials, so that the CPU kernel, the CUDA kernel and the pure-torch reference in
// drt_fast/ops/reference.py produce bit-identical fp32 noise. Change one, change all three.
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

// Counter word 0 of a noise block: its kind in the top two bits, its index below them (so an
// input has at most 2^32 elements).
constexpr uint32_t kGaussianTailBlock = 1u << 30;  // + q: the tail words of quad q's pairs
constexpr uint32_t kDiscreteBlock = 1u << 31;      // + q: the high words of quad q's discrete noise
constexpr uint32_t kDiscreteLowBlock = 3u << 30;   // + q: their low words

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

// The bits of a value as another type of the same size (what C++20's std::bit_cast does;
// host compilers and nvcc turn the memcpy into a register move).
template <typename To, typename From>
DRT_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  memcpy(&to, &from, sizeof to);
  return to;
}

DRT_HD uint32_t float_as_bits(float f) { return bit_cast<uint32_t>(f); }
DRT_HD float bits_as_float(uint32_t u) { return bit_cast<float>(u); }

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

// ln(k * 2^-shift) for integers k in [1, 2^24] and shift in [0, 127]. Relative error about
// 1e-7 (atanh series to s^9 with |s| <= 0.172); k * 2^-shift <= 1 gives a value <= 0.
DRT_HD float log_scaled(uint32_t k, int shift) {
  using namespace noise_const;
  const uint32_t bits = float_as_bits((float)(int32_t)k);  // exact: k <= 2^24
  int e = (int)(bits >> 23) - 127 - shift;
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

// ln u for the uniform u = (floor(v / 2^t) + 1) * 2^(t - bits), t = max(0, bitlength(v) - 24):
// v < 2^52 read as a `bits`-bit fraction, cut to its top 24 significant bits, plus one unit
// in the last of them (u in [2^-bits, 1]). The cut is exact integer work: v converts to a
// double exactly (2^52 + v, then minus 2^52), whose exponent field is bitlength(v) + 1022.
DRT_HD float log_uniform(uint64_t v, int bits) {
  const double d = bit_cast<double>(0x4330000000000000ull | v) - 0x1p52;  // == v exactly
  const int exponent = (int)(bit_cast<uint64_t>(d) >> 52);               // 0 when v == 0
  const int t = exponent > 1046 ? exponent - 1046 : 0;
  return log_scaled((uint32_t)(v >> t) + 1u, bits - t);
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

// Pair (a, b): its 64-bit uniform W needs the tail word c only when a < 2^15 (W's top 40
// bits, a and b's low byte, then hold fewer than 24 significant bits).
DRT_HD bool needs_tail_word(uint32_t a) { return a < (1u << 15); }

DRT_HD void box_muller_from_log(float log_u, uint32_t b, float* z0, float* z1) {
  const float radius = sqrtf(log_u * -2.0f);
  float s, c;
  sincos_u24(b >> 8, &s, &c);
  *z0 = radius * c;
  *z1 = radius * s;
}

// log_uniform(a * 2^8 + (b & 0xFF), 40) for a >= 2^15 in 32-bit integer work (twice as many
// vector lanes as 64-bit work): bitlength(a) - 8 is the exponent of the float (a >> 8), which
// is exact, and the cut t = bitlength(a) - 16 keeps the 24 significant bits of a and b's low byte.
DRT_HD float log_uniform40(uint32_t a, uint32_t b) {
  const int t = (int)(float_as_bits((float)(int32_t)(a >> 8)) >> 23) - 127 + 1 - 8;  // in [0, 16]
  const uint32_t low = b & 0xFFu;
  const uint32_t left = 8 - t > 0 ? 8 - t : 0, right = t - 8 > 0 ? t - 8 : 0;
  const uint32_t top = t < 8 ? (a << left) | (low >> t) : a >> right;  // (a * 2^8 + low) >> t
  return log_scaled(top + 1u, 40 - t);
}

// Two independent standard normals from pair (a, b) when !needs_tail_word(a): W's top 40 bits
// hold its top 24 significant bits. (Vectorizes: the CPU kernel runs it on every pair, then
// redoes the rare pairs that need their tail word.)
DRT_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  box_muller_from_log(log_uniform40(a, b), b, z0, z1);
}

// Two independent standard normals from pair (a, b) and its tail word c, for any a.
DRT_HD void box_muller(uint32_t a, uint32_t b, uint32_t c, float* z0, float* z1) {
  if (!needs_tail_word(a)) {
    box_muller(a, b, z0, z1);
    return;
  }
  const uint64_t w = ((uint64_t)a << 32) | ((uint64_t)(b & 0xFFu) << 24) | (c >> 8);  // < 2^47
  box_muller_from_log(log_uniform(w, 64), b, z0, z1);
}

// Philox block `index` of the kind in `kind` (0, kGaussianTailBlock, kDiscreteBlock) of draw
// `draw` of input `key` under `seed`.
DRT_HD Philox4 noise_block(uint64_t seed, uint64_t key, uint32_t draw, uint32_t kind_index) {
  return philox4x32_10(kind_index, draw, (uint32_t)key, (uint32_t)(key >> 32), (uint32_t)seed,
                       (uint32_t)(seed >> 32));
}

// The four normals of elements 4q .. 4q+3 of draw `draw` of input `key` under `seed`.
DRT_HD void normals4(uint64_t seed, uint64_t key, uint32_t draw, uint32_t quad, float z[4]) {
  const Philox4 r = noise_block(seed, key, draw, quad);
  Philox4 tail{{0u, 0u, 0u, 0u}};
  if (needs_tail_word(r.w[0]) || needs_tail_word(r.w[2])) {
    tail = noise_block(seed, key, draw, kGaussianTailBlock | quad);
  }
  box_muller(r.w[0], r.w[1], tail.w[0], &z[0], &z[1]);
  box_muller(r.w[2], r.w[3], tail.w[1], &z[2], &z[3]);
}

// ---- discrete noise --------------------------------------------------------------------
// Element e = 4q + j of draw d of input k under seed s (drt_fast/ops/rounded_gaussian.py):
//   I = -K + #{i : T[i] <= U},  U = hi * 2^32 + lo (64 bits),
// hi = word j of the discrete block (counter (2^31 + q, d, k_lo, k_hi)), lo = word j of the low
// block (counter (3 * 2^30 + q, ...)), T the n = 2K ascending thresholds. Integer comparisons
// only: the noisy input (v + I) / grid is a function of the integer v + I. The guide E
// (2^g + 1 entries) holds G[b] = #{i : T[i] < b * 2^(64 - g)} for the buckets b that hold no
// threshold, where it is the count of every hi with hi >> (32 - g) == b (all but about n / 2^g
// of the uniforms), and ~G[b] (< 0) for the others, whose thresholds are scanned. lo decides
// only when hi equals the top half of a threshold (probability n / 2^32), so it is computed
// only then.

// G[b] from the guide's entry e, clamped to [0, n]: a wrong guide gives wrong noise, never a
// read outside T.
DRT_HD int64_t guide_count(int32_t e, int64_t n) {
  const int64_t g = e < 0 ? ~(int64_t)e : e;
  return g < n ? g : n;
}

// #{i < n : T[i] < hi * 2^32}: the guide's count for hi's bucket b, or, where b holds
// thresholds, G[b] plus those of them below hi * 2^32 (a binary search of the bucket).
DRT_HD int64_t count_below(const uint64_t* t, int64_t n, const int32_t* guide, int guide_bits, uint32_t hi) {
  const uint32_t b = hi >> (32 - guide_bits);
  int64_t low = guide_count(guide[b], n);
  if (guide[b] >= 0) return low;
  int64_t high = guide_count(guide[b + 1], n);
  const uint64_t key = (uint64_t)hi << 32;
  while (low < high) {  // t[.. low) < key <= t[high ..]
    const int64_t mid = low + (high - low) / 2;
    if (t[mid] < key) {
      low = mid + 1;
    } else {
      high = mid;
    }
  }
  return low;
}

// Whether #{i : T[i] <= U} needs U's low word, given below = count_below(.., hi).
DRT_HD bool needs_low_word(const uint64_t* t, int64_t n, int64_t below, uint32_t hi) {
  return below < n && (uint32_t)(t[below] >> 32) == hi;
}

// #{i : T[i] <= hi * 2^32 + lo}, from below = count_below(.., hi).
DRT_HD int64_t count_at_most(const uint64_t* t, int64_t n, int64_t below, uint32_t hi, uint32_t lo) {
  const uint64_t u = ((uint64_t)hi << 32) | lo;
  while (below < n && t[below] <= u) ++below;
  return below;
}

// The discrete noise I (grid steps) of elements 4q .. 4q+3 of draw `draw` of input `key`.
DRT_HD void discrete4(uint64_t seed, uint64_t key, uint32_t draw, uint32_t quad, const uint64_t* t,
                      int64_t half_width, const int32_t* guide, int guide_bits, int32_t noise[4]) {
  const int64_t n = 2 * half_width;
  const Philox4 r = noise_block(seed, key, draw, kDiscreteBlock | quad);
  int64_t count[4];
  bool low_needed = false;
  for (int j = 0; j < 4; ++j) {
    count[j] = count_below(t, n, guide, guide_bits, r.w[j]);
    low_needed = low_needed || needs_low_word(t, n, count[j], r.w[j]);
  }
  if (low_needed) {
    const Philox4 low = noise_block(seed, key, draw, kDiscreteLowBlock | quad);
    for (int j = 0; j < 4; ++j) count[j] = count_at_most(t, n, count[j], r.w[j], low.w[j]);
  }
  for (int j = 0; j < 4; ++j) noise[j] = (int32_t)(count[j] - half_width);
}

// The noisy input of a discrete draw: (v + I) / grid, the sum exact (|v + I| < 2^24) and the
// quotient rounded once: a function of the integer v + I alone.
DRT_HD float grid_value(int32_t v, int32_t noise, float grid) { return (float)(v + noise) / grid; }

}  // namespace drt
