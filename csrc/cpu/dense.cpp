// Dense members on the CPU (drt_fast/fuse.py DenseMember).
//
// dense_chain: a member's whole forward, layer after layer, on tiles of 24-48 rows that stay
// in the core's cache, with each layer's bias and ReLU applied in registers. A layer is a set
// of blocks (kernels.h): the matrices of convolutions are mostly zeros, and a block only
// multiplies the band of input columns its outputs depend on, so the digits CNN does 55 %
// of the multiply-adds of its dense matrices. The inner kernel keeps kRows x kCols
// accumulators in vector registers and reads one row of weights per step.
//
// bias_act_: h[i, j] = act(h[i, j] + bias[j]) in place, one pass over h, after a `torch.mm`
// (DenseMember's path where dense_chain does not apply).
//
// Compiled once per ISA (CMakeLists.txt, dispatch.cpp) like noise.cpp; the multiply-adds use
// the ISA's intrinsics (FMA where the ISA has it), since the TU is built without FMA
// contraction for the noise. No STL: an AVX-512 TU must not lend code to the baseline build.
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

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

namespace {

// One vector of kLanes floats, and the row count of the register tile (kRows x kVecs vectors
// of accumulators, plus kVecs weight vectors and a broadcast, fit the ISA's registers).
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16, kRows = 8;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vbroadcast(float s) { return _mm512_set1_ps(s); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vrelu(Vec v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }  // max(0, NaN) is NaN
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8, kRows = 6;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vbroadcast(float s) { return _mm256_set1_ps(s); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vrelu(Vec v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }
#elif defined(__SSE2__)
using Vec = __m128;
constexpr int kLanes = 4, kRows = 4;
inline Vec vload(const float* p) { return _mm_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm_storeu_ps(p, v); }
inline Vec vbroadcast(float s) { return _mm_set1_ps(s); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
inline Vec vrelu(Vec v) { return _mm_max_ps(_mm_setzero_ps(), v); }
#else
struct Vec {
  float v[4];
};
constexpr int kLanes = 4, kRows = 4;
inline Vec vload(const float* p) {
  Vec r;
  for (int i = 0; i < 4; ++i) r.v[i] = p[i];
  return r;
}
inline void vstore(float* p, Vec v) {
  for (int i = 0; i < 4; ++i) p[i] = v.v[i];
}
inline Vec vbroadcast(float s) { return Vec{{s, s, s, s}}; }
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline Vec vrelu(Vec v) {
  for (int i = 0; i < 4; ++i) v.v[i] = v.v[i] < 0.0f ? 0.0f : v.v[i];
  return v;
}
#endif

constexpr int kVecs = 2;                   // vectors per accumulator row
constexpr int64_t kCols = kVecs * kLanes;  // columns of one register tile; divides kDenseChunk
// Rows per task: a multiple of every ISA's kRows. 48 keeps a chunk's weights in L1 across 6
// register tiles (AVX-512); 24 where 48 would leave threads idle (a batch of 1000 on 16
// threads: 21 tasks of 48 take 2 rounds with 11 threads idle in the second, 42 of 24 take 3
// of 16).
constexpr int64_t kTileMax = 48, kTileMin = 24;
static_assert(kDenseChunk % kCols == 0 && kTileMax % kRows == 0 && kTileMin % kRows == 0, "tile sizes");

// dst[r, 0:kCols] = act(bias[0:kCols] + sum_k src[r, k] * w[k, 0:kCols]) for r < kRows, k < depth.
template <bool kRelu>
inline void register_tile(const float* src, int64_t lds, const float* w, int64_t ldw, int64_t depth,
                          const float* bias, float* dst, int64_t ldd) {
  Vec acc[kRows][kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const Vec b = vload(bias + v * kLanes);
    for (int r = 0; r < kRows; ++r) acc[r][v] = b;
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec wk[kVecs];
    for (int v = 0; v < kVecs; ++v) wk[v] = vload(w + k * ldw + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const Vec s = vbroadcast(src[r * lds + k]);
      for (int v = 0; v < kVecs; ++v) acc[r][v] = vfma(s, wk[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) vstore(dst + r * ldd + v * kLanes, kRelu ? vrelu(acc[r][v]) : acc[r][v]);
  }
}

// Rows [r0, r0 + tile) of the batch through every layer. `scratch`: tile * in_cols floats
// for a short last tile's input, then two tile * max_width buffers for the layers' outputs.
void chain_tile(const DenseChainArgs& p, int64_t r0, int64_t tile, float* scratch) {
  const int64_t* m = p.meta;
  const int64_t layers = m[0], in_cols = m[1], out_cols = p.out_cols, max_width = m[3];
  const int64_t n = p.rows - r0 < tile ? p.rows - r0 : tile;
  const int64_t padded = (n + kRows - 1) / kRows * kRows;
  const float* src = p.x + r0 * p.ldx;
  int64_t lds = p.ldx;
  if (padded != n) {  // a short tile: its rows, then zero rows up to a whole register tile
    float* in = scratch;
    for (int64_t r = 0; r < n; ++r) memcpy(in + r * in_cols, src + r * p.ldx, in_cols * sizeof(float));
    memset(in + n * in_cols, 0, (padded - n) * in_cols * sizeof(float));
    src = in;
    lds = in_cols;
  }
  float* buffers[2] = {scratch + tile * in_cols, scratch + tile * in_cols + tile * max_width};
  int64_t at = 4;
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t width = m[at], relu = m[at + 1], blocks = m[at + 3];
    const float* bias = p.params + m[at + 2];
    at += 4;
    float* dst = buffers[l % 2];
    for (int64_t b = 0; b < blocks; ++b, at += 5) {
      const int64_t lo = m[at], hi = m[at + 1], c0 = m[at + 2], bw = m[at + 3];
      const float* w = p.params + m[at + 4];
      for (int64_t c = 0; c < bw; c += kCols) {      // the weights of these columns stay in L1
        for (int64_t r = 0; r < padded; r += kRows) {  // across the row tiles
          if (relu) {
            register_tile<true>(src + r * lds + lo, lds, w + c, bw, hi - lo, bias + c0 + c, dst + r * width + c0 + c,
                                width);
          } else {
            register_tile<false>(src + r * lds + lo, lds, w + c, bw, hi - lo, bias + c0 + c, dst + r * width + c0 + c,
                                 width);
          }
        }
      }
    }
    src = dst;
    lds = width;
  }
  for (int64_t r = 0; r < n; ++r) memcpy(p.out + (r0 + r) * out_cols, src + r * lds, out_cols * sizeof(float));
}

}  // namespace

// The plan was checked by dispatch.cpp (check_dense_chain) before this runs. Returns false
// when a thread's scratch could not be allocated (the output is then incomplete).
bool dense_chain_run(const DenseChainArgs& p) {
  const int64_t in_cols = p.meta[1], max_width = p.meta[3];
  const int64_t threads = omp_get_max_threads();
  const int64_t tile = (p.rows + kTileMax - 1) / kTileMax >= 4 * threads ? kTileMax : kTileMin;
  const int64_t tiles = (p.rows + tile - 1) / tile;
  size_t bytes = (size_t)(tile * in_cols + 2 * tile * max_width) * sizeof(float);
  bytes = (bytes + 63) / 64 * 64;  // aligned_alloc wants a multiple of the alignment
  bool out_of_memory = false;
#pragma omp parallel if (tiles > 1) reduction(|| : out_of_memory)
  {
    float* scratch = static_cast<float*>(aligned_alloc(64, bytes));
    out_of_memory = scratch == nullptr;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      if (scratch != nullptr) chain_tile(p, t * tile, tile, scratch);
    }
    free(scratch);
  }
  return !out_of_memory;
}

}  // namespace DRT_ISA_NAMESPACE
}  // namespace drt
