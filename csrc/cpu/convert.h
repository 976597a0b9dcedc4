// fp32 -> bf16 / fp16 conversions, round to nearest even, bit-identical to torch's
// `tensor.to(torch.bfloat16 / torch.float16)` (c10/util/BFloat16.h and Half.h). Static:
// the kernels are compiled once per ISA and must not share out-of-line copies.
#pragma once

#include <stdint.h>
#include <string.h>

namespace drt {

static inline uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static inline float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if (f != f) return 0x7FC0;  // NaN, as c10::BFloat16
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// c10's fp16_ieee_from_fp32_value (from the FP16 library): the exponent and rounding are done
// by one fp32 addition, whose round-to-nearest-even gives the fp16 rounding.
static inline uint16_t float_to_fp16(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (float_of(bits_of(f) & 0x7FFFFFFFu) * scale_to_inf) * scale_to_zero;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float bf16_to_float(uint16_t h) { return float_of((uint32_t)h << 16); }

// c10's fp16_ieee_to_fp32_value.
static inline float fp16_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized_value = float_of((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized_value = float_of((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? bits_of(denormalized_value) : bits_of(normalized_value));
  return float_of(result);
}

}  // namespace drt
