// noisy_draws and noisy_draws_discrete on the CPU: OpenMP over (row, chunk of elements), one
// pass over the output.
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

// Standard normals of quads [quad0, quad0 + nquads) of one draw into z[0 .. 4 * nquads):
// normals4's values (philox.h), computed in vectorizable passes; the rare pairs whose
// uniform needs its tail word are redone one by one.
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
  uint32_t smallest = 0xFFFFFFFFu;
  for (int j = 0; j < 2 * nquads; ++j) smallest = a[j] < smallest ? a[j] : smallest;
  if (needs_tail_word(smallest)) {  // about one chunk in 128
    for (int j = 0; j < 2 * nquads; ++j) {
      if (!needs_tail_word(a[j])) continue;
      const Philox4 tail = noise_block(seed, key, draw, kGaussianTailBlock | (quad0 + (uint32_t)(j / 2)));
      box_muller(a[j], b[j], tail.w[j % 2], &z0[j], &z1[j]);
    }
  }
  for (int j = 0; j < 2 * nquads; ++j) {
    z[2 * j] = z0[j];
    z[2 * j + 1] = z1[j];
  }
}

// The Gaussian values of a chunk: x + sigma * z.
struct GaussianChunk {
  float z[4 * kChunkQuads];
  const float* x;
  float sigma;

  void fill(const NoisyDrawsArgs& p, int64_t b, uint32_t draw, int64_t quad0, int nquads) {
    chunk_normals(p.seed, (uint64_t)p.keys[b], draw, (uint32_t)quad0, nquads, z);
    x = p.x + b * p.num_elements + 4 * quad0;
    sigma = p.sigma;
  }
  float operator()(int64_t i) const {
    const float noise = sigma * z[i];
    return x[i] + noise;
  }
};

// The discrete values of a chunk: (v + I) / grid, discrete4's values (philox.h) computed in
// vectorizable passes: the guide's entry for every element, then the rare elements whose
// bucket holds thresholds.
struct DiscreteChunk {
  int32_t noise[4 * kChunkQuads];
  const int32_t* v;
  float grid;

  void fill(const NoisyDrawsArgs& p, int64_t b, uint32_t draw, int64_t quad0, int nquads) {
    const uint64_t key = (uint64_t)p.keys[b];
    uint32_t hi[4 * kChunkQuads];
    for (int i = 0; i < nquads; ++i) {
      const Philox4 r = noise_block(p.seed, key, draw, kDiscreteBlock | (uint32_t)(quad0 + i));
      for (int j = 0; j < 4; ++j) hi[4 * i + j] = r.w[j];
    }
    const int64_t n = 2 * p.half_width, m = 4 * (int64_t)nquads;
    const int shift = 32 - p.guide_bits;
    const int32_t top = (int32_t)n;
    int32_t count[4 * kChunkQuads];
    int32_t scan = 0;  // < 0: some element's bucket holds thresholds
    for (int64_t i = 0; i < m; ++i) {  // guide_count's clamp, so that every guide reads as count_below's
      const int32_t e = p.guide[hi[i] >> shift];
      count[i] = e < top ? e : top;
      scan |= e;
    }
    for (int64_t i0 = 0; scan < 0 && i0 < m; i0 += 16) {  // blocks of 16: most hold no such element
      const int64_t i1 = i0 + 16 < m ? i0 + 16 : m;
      int32_t any = 0;
      for (int64_t i = i0; i < i1; ++i) any |= count[i];
      if (any >= 0) continue;
      for (int64_t i = i0; i < i1; ++i) {
        if (count[i] >= 0) continue;
        int64_t c = count_below(p.thresholds, n, p.guide, p.guide_bits, hi[i]);
        if (needs_low_word(p.thresholds, n, c, hi[i])) {  // about n / 2^32 of the elements
          const Philox4 low = noise_block(p.seed, key, draw, kDiscreteLowBlock | (uint32_t)(quad0 + i / 4));
          c = count_at_most(p.thresholds, n, c, hi[i], low.w[i % 4]);
        }
        count[i] = (int32_t)c;
      }
    }
    for (int64_t i = 0; i < m; ++i) noise[i] = count[i] - (int32_t)p.half_width;
    v = p.v + b * p.num_elements + 4 * quad0;
    grid = p.grid;
  }
  float operator()(int64_t i) const { return grid_value(v[i], noise[i], grid); }
};

template <typename Convert, typename T, typename Chunk>
void write_contiguous(const Chunk& values, int64_t count, T* out, Convert convert) {
  for (int64_t i = 0; i < count; ++i) out[i] = convert(values(i));
}

template <typename Convert, typename T, typename Chunk>
void write_channels_last(const Chunk& values, int64_t e0, int64_t count, int64_t channels, int64_t spatial,
                         T* out_row, Convert convert) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t e = e0 + i;  // logical NCHW element index: c * spatial + s
    const int64_t c = e / spatial, s = e - c * spatial;
    out_row[s * channels + c] = convert(values(i));
  }
}

template <typename Chunk, typename T, typename Convert>
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
    Chunk values;
    values.fill(p, b, draw, quad0, nquads);
    const int64_t e0 = 4 * quad0;
    const int64_t count = 4 * (int64_t)nquads < p.num_elements - e0 ? 4 * (int64_t)nquads : p.num_elements - e0;
    T* out_row = out + n * p.num_elements;
    if (p.channels_last) {
      write_channels_last(values, e0, count, p.channels, p.spatial, out_row, convert);
    } else {
      write_contiguous(values, count, out_row + e0, convert);
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

template <typename Chunk>
void noisy_draws_any(const NoisyDrawsArgs& args) {
  switch (args.out_dtype) {
    case kFloat32:
      noisy_draws_typed<Chunk, float>(args, ToFloat32{});
      break;
    case kBFloat16:
      noisy_draws_typed<Chunk, uint16_t>(args, ToBFloat16{});
      break;
    case kFloat16:
      noisy_draws_typed<Chunk, uint16_t>(args, ToFloat16{});
      break;
  }
}

}  // namespace

void gaussian_tail_count_cpu(const TailCountArgs& p) {
  const int64_t quads = (p.num_elements + 3) / 4;
  const int64_t chunks = (quads + kChunkQuads - 1) / kChunkQuads;
  const int64_t m = p.num_thresholds;
  for (int64_t i = 0; i < m; ++i) p.counts[i] = 0;
  *p.largest = 0.0f;
#pragma omp parallel
  {
    int64_t counts[16] = {0};
    float largest = 0.0f;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < p.draws * chunks; ++item) {
      const int64_t d = item / chunks, chunk = item - d * chunks;
      const uint32_t draw = (uint32_t)(p.first_draw + d);
      const int64_t quad0 = chunk * kChunkQuads;
      const int nquads = (int)(quads - quad0 < kChunkQuads ? quads - quad0 : kChunkQuads);
      uint32_t a[2 * kChunkQuads];
      for (int i = 0; i < nquads; ++i) {
        const Philox4 r = noise_block(p.seed, p.key, draw, (uint32_t)(quad0 + i));
        a[2 * i] = r.w[0];
        a[2 * i + 1] = r.w[2];
      }
      uint32_t smallest = 0xFFFFFFFFu;
      for (int j = 0; j < 2 * nquads; ++j) smallest = a[j] < smallest ? a[j] : smallest;
      if (!needs_tail_word(smallest)) continue;
      for (int i = 0; i < nquads; ++i) {
        if (!needs_tail_word(a[2 * i]) && !needs_tail_word(a[2 * i + 1])) continue;
        float z[4];
        normals4(p.seed, p.key, draw, (uint32_t)(quad0 + i), z);
        for (int j = 0; j < 4 && 4 * (quad0 + i) + j < p.num_elements; ++j) {
          const float v = z[j] < 0.0f ? -z[j] : z[j];
          if (v > kTailCountFloor && v > largest) largest = v;
          for (int64_t t = 0; t < m; ++t) counts[t] += v > p.thresholds[t];
        }
      }
    }
#pragma omp critical
    {
      for (int64_t t = 0; t < m; ++t) p.counts[t] += counts[t];
      if (largest > *p.largest) *p.largest = largest;
    }
  }
}

void noisy_draws_cpu(const NoisyDrawsArgs& args) { noisy_draws_any<GaussianChunk>(args); }

void noisy_draws_discrete_cpu(const NoisyDrawsArgs& args) { noisy_draws_any<DiscreteChunk>(args); }

}  // namespace DRT_ISA_NAMESPACE
}  // namespace drt
