// noisy_draws on the CPU: OpenMP over (row, chunk of elements), one pass over the output.
//
// Compiled once per ISA (CMakeLists.txt, dispatch.cpp) with -ffp-contract=off: the noise must
// be bit-identical to the CUDA kernel and to the torch reference, so no FMA contraction and
// no fast-math. The loops are written structure-of-arrays so that the compiler vectorizes
// them; vector width does not change IEEE results of + - * / sqrt, so every ISA build gives
// the same bits. No STL templates: an AVX-512 TU must not lend code to the baseline build.
#include "../kernels.h"
#include "../philox.h"
#include "convert.h"

namespace drt {
namespace DRT_ISA_NAMESPACE {
namespace {

constexpr int64_t kChunkQuads = 256;  // 1024 elements per work item: fits L1 with its buffers
constexpr int64_t kMinParallelElements = 1 << 14;  // below that a parallel region costs more than it saves

// Standard normals of quads [quad0, quad0 + nquads) of one draw into z[0 .. 4 * nquads).
void chunk_normals(uint64_t seed, uint64_t key, uint32_t draw, uint32_t quad0, int nquads, float* z) {
  uint32_t a[2 * kChunkQuads], b[2 * kChunkQuads];
  const uint32_t k_lo = (uint32_t)key, k_hi = (uint32_t)(key >> 32);
  const uint32_t s_lo = (uint32_t)seed, s_hi = (uint32_t)(seed >> 32);
  for (int i = 0; i < nquads; ++i) {
    const Philox4 r = philox4x32_10(quad0 + (uint32_t)i, draw, k_lo, k_hi, s_lo, s_hi);
    // pair j = 2i gives elements 4i, 4i+1; pair 2i+1 gives 4i+2, 4i+3
    a[2 * i] = r.w[0];
    b[2 * i] = r.w[1];
    a[2 * i + 1] = r.w[2];
    b[2 * i + 1] = r.w[3];
  }
  float z0[2 * kChunkQuads], z1[2 * kChunkQuads];
  for (int j = 0; j < 2 * nquads; ++j) box_muller(a[j], b[j], &z0[j], &z1[j]);
  for (int j = 0; j < 2 * nquads; ++j) {
    z[2 * j] = z0[j];
    z[2 * j + 1] = z1[j];
  }
}

template <typename Convert, typename T>
void write_contiguous(const float* x, const float* z, float sigma, int64_t count, T* out, Convert convert) {
  for (int64_t i = 0; i < count; ++i) {
    const float noise = sigma * z[i];
    out[i] = convert(x[i] + noise);
  }
}

template <typename Convert, typename T>
void write_channels_last(const float* x, const float* z, float sigma, int64_t e0, int64_t count, int64_t channels,
                         int64_t spatial, T* out_row, Convert convert) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t e = e0 + i;  // logical NCHW element index: c * spatial + s
    const int64_t c = e / spatial, s = e - c * spatial;
    const float noise = sigma * z[i];
    out_row[s * channels + c] = convert(x[i] + noise);
  }
}

template <typename T, typename Convert>
void noisy_draws_typed(const NoisyDrawsArgs& p, Convert convert) {
  const int64_t rows = p.batch * p.reps;
  const int64_t quads = (p.num_elements + 3) / 4;
  const int64_t chunks = (quads + kChunkQuads - 1) / kChunkQuads;
  T* out = static_cast<T*>(p.out);
#pragma omp parallel for schedule(static) if (rows * p.num_elements >= kMinParallelElements)
  for (int64_t item = 0; item < rows * chunks; ++item) {
    const int64_t n = item / chunks, chunk = item - n * chunks;
    const int64_t b = n / p.reps, r = n - b * p.reps;
    const uint32_t draw = (uint32_t)(p.first_draw[b] + r);
    const int64_t quad0 = chunk * kChunkQuads;
    const int nquads = (int)(quads - quad0 < kChunkQuads ? quads - quad0 : kChunkQuads);
    float z[4 * kChunkQuads];
    chunk_normals(p.seed, (uint64_t)p.keys[b], draw, (uint32_t)quad0, nquads, z);
    const int64_t e0 = 4 * quad0;
    const int64_t count = 4 * (int64_t)nquads < p.num_elements - e0 ? 4 * (int64_t)nquads : p.num_elements - e0;
    const float* x = p.x + b * p.num_elements + e0;
    T* out_row = out + n * p.num_elements;
    if (p.channels_last) {
      write_channels_last(x, z, p.sigma, e0, count, p.channels, p.spatial, out_row, convert);
    } else {
      write_contiguous(x, z, p.sigma, count, out_row + e0, convert);
    }
  }
}

// Output converters: functors (not function pointers) so that the conversion inlines. A NaN
// becomes the dtype's canonical NaN (kernels.h), tested on the bits: a float comparison
// could be folded by a compiler that does not keep NaN payloads.
inline bool is_nan_bits(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }
struct ToFloat32 {
  float operator()(float v) const {
    const uint32_t u = bits_of(v);
    return float_of(is_nan_bits(u) ? kNaNFloat32 : u);
  }
};
struct ToBFloat16 {
  uint16_t operator()(float v) const { return is_nan_bits(bits_of(v)) ? kNaNBFloat16 : float_to_bf16(v); }
};
struct ToFloat16 {
  uint16_t operator()(float v) const { return is_nan_bits(bits_of(v)) ? kNaNFloat16 : float_to_fp16(v); }
};

}  // namespace

void noisy_draws_cpu(const NoisyDrawsArgs& args) {
  switch (args.out_dtype) {
    case kFloat32:
      noisy_draws_typed<float>(args, ToFloat32{});
      break;
    case kBFloat16:
      noisy_draws_typed<uint16_t>(args, ToBFloat16{});
      break;
    case kFloat16:
      noisy_draws_typed<uint16_t>(args, ToFloat16{});
      break;
  }
}

}  // namespace DRT_ISA_NAMESPACE
}  // namespace drt
