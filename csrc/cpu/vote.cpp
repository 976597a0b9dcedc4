// vote_ on the CPU: OpenMP over draws. Each draw aggregates its members and picks a label;
// the counts are then added serially in draw order, so they are deterministic.
//
// Compiled once per ISA (CMakeLists.txt, dispatch.cpp) with -fno-math-errno
// -fassociative-math -fno-signed-zeros -fno-trapping-math, so that the passes over classes
// vectorize. Non-finite logits are detected exactly (an exponent-bits test, unaffected by
// those flags): such a draw casts no vote. No STL templates here: a TU built for AVX-512 must not lend an
// out-of-line copy of anything to the baseline build.
#include <math.h>
#include <stdlib.h>

#include "../kernels.h"
#include "../majority_vote.h"
#include "convert.h"

namespace drt {
namespace DRT_ISA_NAMESPACE {
namespace {

constexpr int64_t kMinParallelLogits = 1 << 13;  // below that a parallel region costs more than it saves (measured: M=3, K=10, R=1000 gains 1.6x at 2 threads)

// exp(x) for x <= 0 (softmax after subtracting the maximum), relative error ~2e-7; branch-free
// so that the loops calling it vectorize (torch's softmax is vectorized too).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln 2) by truncating toward zero (x <= 0); not the 1.5 * 2^23 trick, which
  // -fassociative-math would fold away
  const int32_t n_int = (int32_t)(x * 1.44269504f - 0.5f);
  const float n = (float)n_int;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // Cody-Waite, |r| <= ln2 / 2
  float p = 1.9875691500e-4f;                                      // Cephes expf polynomial
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * float_of((uint32_t)(n_int + 127) << 23);  // n in [-126, 0]: a normal exponent
}

// ---- many classes (K > kSmallK): one row per draw --------------------------------------
// Draws are processed in blocks of about kBlockLogits logits per member: the conversion and
// the finiteness test run as one long vectorized loop, then each draw's row is reduced.
constexpr int64_t kBlockLogits = 1024;  // the block's scratch stays in L1
constexpr int64_t kSmallK = 16;         // up to this many classes, draws go column-wise (below)

inline float max_of(const float* v, int64_t k) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < k; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Index of the first maximum of v[0 .. k) (ties -> smaller class index): a vectorized max,
// then a search (which stops inside the row: the maximum is there).
inline int64_t argmax_first(const float* v, int64_t k, float* max_out) {
  const float m = max_of(v, k);
  int64_t i = 0;
  while (v[i] != m) ++i;
  *max_out = m;
  return i;
}

// Owns the per-thread scratch arrays of a kernel call: `take<T>(n)` gives n (>= 1)
// uninitialized elements, all freed when the arena goes out of scope.
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    for (int i = 0; i < count_; ++i) free(owned_[i]);
  }
  template <typename T>
  T* take(int64_t n) {
    T* ptr = static_cast<T*>(malloc(sizeof(T) * (size_t)(n > 0 ? n : 1)));
    owned_[count_++] = ptr;  // (no std::vector: see the note at the top)
    return ptr;
  }

 private:
  static constexpr int kMaxArrays = 16;
  void* owned_[kMaxArrays] = {};
  int count_ = 0;
};

// Per-thread scratch for one block of draws, freed at scope exit.
struct Scratch : Arena {
  Scratch(int64_t block_draws, int64_t k, int64_t members) {
    const int64_t n = block_draws * k;
    vals = take<float>(n);
    exps = take<float>(n);
    score = take<float>(n);
    bad = take<uint8_t>(block_draws);
    best_margin = take<float>(block_draws);
    mme_label = take<int64_t>(block_draws);
    distinct = take<int64_t>(block_draws);
    mv_labels = take<int64_t>(block_draws * members);
    mv_votes = take<double>(block_draws * members);
  }
  float *vals, *exps, *score;             // [block_draws * K]
  uint8_t* bad;                           // [block_draws]: a non-finite logit was seen
  float* best_margin;  // mme: per draw, the best member margin so far and its label
  int64_t* mme_label;
  int64_t* distinct;  // mv: number of distinct member labels of each draw
  int64_t* mv_labels;  // [block_draws, members]: distinct member labels and their summed weights
  double* mv_votes;
};

inline bool is_non_finite(float v) { return (bits_of(v) & 0x7F800000u) == 0x7F800000u; }

// Convert rows * k logits to fp32 in `vals`; returns whether any logit is not finite (all
// exponent bits set: an integer test that vectorizes).
template <typename T, typename ToFloat>
inline bool load(const T* src, int64_t n, ToFloat to_float, float* vals) {
  uint32_t non_finite = 0;
#pragma omp simd reduction(| : non_finite)
  for (int64_t i = 0; i < n; ++i) {
    vals[i] = to_float(src[i]);
    non_finite |= is_non_finite(vals[i]);
  }
  return non_finite != 0;
}

inline bool any_non_finite(const float* v, int64_t k) {
  uint32_t non_finite = 0;
#pragma omp simd reduction(| : non_finite)
  for (int64_t i = 0; i < k; ++i) non_finite |= is_non_finite(v[i]);
  return non_finite != 0;
}

// e[i] = exp(v[i] - top1) over one row; returns their sum.
inline float row_exps(const float* v, float top1, int64_t k, float* e) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < k; ++i) {
    e[i] = exp_nonpositive(v[i] - top1);
    sum += e[i];
  }
  return sum;
}

inline void fill(float* dst, float value, int64_t k) {
  for (int64_t i = 0; i < k; ++i) dst[i] = value;
}

// Labels of draws [r0, r0 + nb) into labels[0 .. nb) (-1: a logit was not finite).
template <typename T, typename ToFloat>
void block_labels_rows(const VoteArgs& p, ToFloat to_float, int64_t r0, int64_t nb, Scratch& s, int64_t* labels) {
  const int64_t k = p.classes;
  const int64_t n = nb * k;
  const T* logits = static_cast<const T*>(p.logits);
  float top1_value;
  for (int64_t j = 0; j < nb; ++j) {
    s.bad[j] = 0;
    s.best_margin[j] = -1.0f;
    s.mme_label[j] = 0;
    s.distinct[j] = 0;
  }
  if (p.members == 1 && p.weights[0] > 0.0f) {
    // one member: every mode picks its argmax (softmax is monotone)
    const bool some_bad = load(logits + r0 * k, n, to_float, s.vals);
    for (int64_t j = 0; j < nb; ++j) {
      const float* row = s.vals + j * k;
      labels[j] = (some_bad && any_non_finite(row, k)) ? -1 : argmax_first(row, k, &top1_value);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) s.score[i] = 0.0f;
  for (int64_t m = 0; m < p.members; ++m) {
    const float w = p.weights[m];
    if (load(logits + (m * p.draws + r0) * k, n, to_float, s.vals)) {
      for (int64_t j = 0; j < nb; ++j) {
        if (any_non_finite(s.vals + j * k, k)) {
          s.bad[j] = 1;
          fill(s.vals + j * k, 0.0f, k);  // keep the arithmetic below finite; the draw is dropped
        }
      }
    }
    if (p.agg == kLogit) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) s.score[i] += w * s.vals[i];
      continue;
    }
    for (int64_t j = 0; j < nb; ++j) {
      float* row = s.vals + j * k;
      if (p.agg == kWeightedSoftmax) {  // score += w * softmax(row); needs the max, not its index
        float* exps = s.exps + j * k;
        const float scale = w / row_exps(row, max_of(row, k), k, exps);
        float* score = s.score + j * k;
#pragma omp simd
        for (int64_t i = 0; i < k; ++i) score[i] += exps[i] * scale;
        continue;
      }
      const int64_t top1 = argmax_first(row, k, &top1_value);
      if (p.agg == kMaxMargin) {
        // top-1 minus top-2 softmax probability = (1 - exp(l2 - l1)) / sum exp(l - l1)
        const float sum = row_exps(row, top1_value, k, s.exps + j * k);
        row[top1] = -INFINITY;  // our copy: mask the top-1 to find the top-2
        const float top2_value = k > 1 ? max_of(row, k) : top1_value;
        const float numerator = k > 1 ? 1.0f - exp_nonpositive(top2_value - top1_value) : 1.0f;
        const float margin = numerator / sum;
        if (margin > s.best_margin[j]) {  // strict: ties keep the smaller member index
          s.best_margin[j] = margin;
          s.mme_label[j] = top1;
        }
      } else {  // kMajorityVote: weights summed in double, in member order (majority_vote.h)
        mv_add(s.mv_labels + j * p.members, s.mv_votes + j * p.members, &s.distinct[j], top1, (double)w);
      }
    }
  }
  for (int64_t j = 0; j < nb; ++j) {
    if (s.bad[j]) {
      labels[j] = -1;
    } else if (p.agg == kMaxMargin) {
      labels[j] = s.mme_label[j];
    } else if (p.agg == kMajorityVote) {
      labels[j] = mv_winner(s.mv_labels + j * p.members, s.mv_votes + j * p.members, s.distinct[j], k);
    } else {
      labels[j] = argmax_first(s.score + j * k, k, &top1_value);
    }
  }
}

// ---- few classes (K <= kSmallK: digits, MNIST, CIFAR-10): columns of draws ---------------
// A block of kColumn draws is loaded class-major (v[i * kColumn + j]: class i of draw j), so
// that every step -- maxima, exps, sums, argmaxes, the aggregation -- is a loop over draws
// with no reduction across a vector: each vector lane is one draw. (A row per draw spends most
// of its time in the cross-lane reductions of a 10-float row.) Every result is the same as
// the row path's up to the order of additions in a softmax sum.
constexpr int64_t kColumn = 256;

struct ColumnScratch : Arena {
  ColumnScratch() {
    v = take<float>(kSmallK * kColumn);
    e = take<float>(kSmallK * kColumn);
    score = take<float>(kSmallK * kColumn);
    votes = take<double>(kSmallK * kColumn);
    top1 = take<float>(kColumn);
    top2 = take<float>(kColumn);
    sum = take<float>(kColumn);
    best_margin = take<float>(kColumn);
    top1_index = take<int32_t>(kColumn);
    label = take<int32_t>(kColumn);
    bad = take<int32_t>(kColumn);
  }
  float *v, *e, *score;   // [kSmallK][kColumn]
  double* votes;          // mv: summed weights per class (-1: no member voted for it)
  float *top1, *top2, *sum, *best_margin;   // [kColumn]
  int32_t *top1_index, *label, *bad;         // [kColumn]
};

// Member m's logits of draws [r0, r0 + nb) into s.v, class-major; a draw with a non-finite
// logit is marked in s.bad and its column zeroed (keeps the arithmetic finite; it casts no vote).
template <typename T, typename ToFloat>
inline void load_columns(const T* src, int64_t nb, int64_t k, ToFloat to_float, ColumnScratch& s) {
  uint32_t non_finite = 0;
  for (int64_t i = 0; i < k; ++i) {
    float* vi = s.v + i * kColumn;
#pragma omp simd reduction(| : non_finite)
    for (int64_t j = 0; j < nb; ++j) {
      vi[j] = to_float(src[j * k + i]);
      non_finite |= is_non_finite(vi[j]);
    }
  }
  if (!non_finite) return;
  for (int64_t i = 0; i < k; ++i) {
    const float* vi = s.v + i * kColumn;
    for (int64_t j = 0; j < nb; ++j) s.bad[j] |= is_non_finite(vi[j]);
  }
  for (int64_t i = 0; i < k; ++i) {
    float* vi = s.v + i * kColumn;
    for (int64_t j = 0; j < nb; ++j) vi[j] = s.bad[j] ? 0.0f : vi[j];
  }
}

// s.top1 / s.top1_index: each draw's largest logit and its first class (ties -> smaller index).
inline void column_top1(int64_t nb, int64_t k, ColumnScratch& s) {
  float* top1 = s.top1;
  int32_t* index = s.top1_index;
#pragma omp simd
  for (int64_t j = 0; j < nb; ++j) {
    top1[j] = s.v[j];
    index[j] = 0;
  }
  for (int64_t i = 1; i < k; ++i) {
    const float* vi = s.v + i * kColumn;
#pragma omp simd
    for (int64_t j = 0; j < nb; ++j) {
      const bool more = vi[j] > top1[j];  // strict: the first maximum stays
      top1[j] = more ? vi[j] : top1[j];
      index[j] = more ? (int32_t)i : index[j];
    }
  }
}

// s.sum = sum over classes of exp(v - top1), with the exps in s.e.
inline void column_exps(int64_t nb, int64_t k, ColumnScratch& s) {
  float* sum = s.sum;
#pragma omp simd
  for (int64_t j = 0; j < nb; ++j) sum[j] = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    const float* vi = s.v + i * kColumn;
    float* ei = s.e + i * kColumn;
#pragma omp simd
    for (int64_t j = 0; j < nb; ++j) {
      ei[j] = exp_nonpositive(vi[j] - s.top1[j]);
      sum[j] += ei[j];
    }
  }
}

// labels[j] = the first class of draw j's largest score (float or double rows).
template <typename S>
inline void column_argmax(const S* score, int64_t nb, int64_t k, int32_t* label) {
  for (int64_t j = 0; j < nb; ++j) label[j] = 0;
  S best[kColumn];
  for (int64_t j = 0; j < nb; ++j) best[j] = score[j];
  for (int64_t i = 1; i < k; ++i) {
    const S* si = score + i * kColumn;
#pragma omp simd
    for (int64_t j = 0; j < nb; ++j) {
      const bool more = si[j] > best[j];
      best[j] = more ? si[j] : best[j];
      label[j] = more ? (int32_t)i : label[j];
    }
  }
}

template <typename T, typename ToFloat>
void block_labels_columns(const VoteArgs& p, ToFloat to_float, int64_t r0, int64_t nb, ColumnScratch& s,
                          int64_t* labels) {
  const int64_t k = p.classes;
  const T* logits = static_cast<const T*>(p.logits);
  for (int64_t j = 0; j < nb; ++j) {
    s.bad[j] = 0;
    s.best_margin[j] = -1.0f;
    s.label[j] = 0;
  }
  const bool one = p.members == 1 && p.weights[0] > 0.0f;  // every mode picks its argmax
  for (int64_t i = 0; i < k * kColumn; ++i) {
    s.score[i] = 0.0f;
    s.votes[i] = -1.0;
  }
  for (int64_t m = 0; m < p.members; ++m) {
    const float w = p.weights[m];
    load_columns(logits + (m * p.draws + r0) * k, nb, k, to_float, s);
    if (one) {
      column_top1(nb, k, s);
      for (int64_t j = 0; j < nb; ++j) s.label[j] = s.top1_index[j];
      break;
    }
    if (p.agg == kLogit) {
#pragma omp simd
      for (int64_t i = 0; i < k * kColumn; ++i) s.score[i] += w * s.v[i];
      continue;
    }
    if (p.agg == kWeightedSoftmax) {  // score += w * softmax: only the maximum is needed
      float* top1 = s.top1;
#pragma omp simd
      for (int64_t j = 0; j < nb; ++j) top1[j] = s.v[j];
      for (int64_t i = 1; i < k; ++i) {
        const float* vi = s.v + i * kColumn;
#pragma omp simd
        for (int64_t j = 0; j < nb; ++j) top1[j] = vi[j] > top1[j] ? vi[j] : top1[j];
      }
      column_exps(nb, k, s);
      float* scale = s.sum;
#pragma omp simd
      for (int64_t j = 0; j < nb; ++j) scale[j] = w / scale[j];
      for (int64_t i = 0; i < k; ++i) {
        const float* ei = s.e + i * kColumn;
        float* si = s.score + i * kColumn;
#pragma omp simd
        for (int64_t j = 0; j < nb; ++j) si[j] += ei[j] * scale[j];
      }
      continue;
    }
    column_top1(nb, k, s);
    if (p.agg == kMaxMargin) {
      // top-1 minus top-2 softmax probability = (1 - exp(l2 - l1)) / sum exp(l - l1)
      column_exps(nb, k, s);
      float* top2 = s.top2;
#pragma omp simd
      for (int64_t j = 0; j < nb; ++j) top2[j] = -INFINITY;
      for (int64_t i = 0; i < k; ++i) {
        const float* vi = s.v + i * kColumn;
#pragma omp simd
        for (int64_t j = 0; j < nb; ++j) {
          top2[j] = (s.top1_index[j] != (int32_t)i && vi[j] > top2[j]) ? vi[j] : top2[j];
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < nb; ++j) {
        const float numerator = k > 1 ? 1.0f - exp_nonpositive(top2[j] - s.top1[j]) : 1.0f;
        const float margin = numerator / s.sum[j];
        const bool better = margin > s.best_margin[j];  // strict: ties keep the smaller member
        s.best_margin[j] = better ? margin : s.best_margin[j];
        s.label[j] = better ? s.top1_index[j] : s.label[j];
      }
    } else {  // kMajorityVote: weights summed in double, in member order
      for (int64_t i = 0; i < k; ++i) {
        double* vi = s.votes + i * kColumn;
        for (int64_t j = 0; j < nb; ++j) {
          if (s.top1_index[j] == (int32_t)i) vi[j] = (vi[j] < 0.0 ? 0.0 : vi[j]) + (double)w;
        }
      }
    }
  }
  if (!one) {
    if (p.agg == kLogit || p.agg == kWeightedSoftmax) column_argmax(s.score, nb, k, s.label);
    if (p.agg == kMajorityVote) column_argmax(s.votes, nb, k, s.label);
  }
  for (int64_t j = 0; j < nb; ++j) labels[j] = s.bad[j] ? -1 : (int64_t)s.label[j];
}

template <typename T, typename ToFloat>
void vote_labels(const VoteArgs& p, ToFloat to_float, int64_t* labels) {
  const bool small = p.classes <= kSmallK;
  const int64_t block = small ? kColumn : (p.classes >= kBlockLogits ? 1 : kBlockLogits / p.classes);
  const int64_t blocks = (p.draws + block - 1) / block;
  const bool parallel = p.members * p.draws * p.classes >= kMinParallelLogits;
#pragma omp parallel if (parallel)
  {
    if (small) {
      ColumnScratch scratch;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t r0 = b * block;
        const int64_t nb = p.draws - r0 < block ? p.draws - r0 : block;
        block_labels_columns<T>(p, to_float, r0, nb, scratch, labels + r0);
      }
    } else {
      Scratch scratch(block, p.classes, p.members);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t r0 = b * block;
        const int64_t nb = p.draws - r0 < block ? p.draws - r0 : block;
        block_labels_rows<T>(p, to_float, r0, nb, scratch, labels + r0);
      }
    }
  }
}

// Logit loaders: functors (not function pointers) so that the conversion inlines and vectorizes.
struct FromFloat32 {
  float operator()(float v) const { return v; }
};
struct FromBFloat16 {
  float operator()(uint16_t v) const { return bf16_to_float(v); }
};
struct FromFloat16 {
  float operator()(uint16_t v) const { return fp16_to_float(v); }
};

}  // namespace

int64_t vote_cpu(const VoteArgs& p) {
  for (int64_t r = 0; r < p.draws; ++r) {
    if (p.rows[r] < 0 || p.rows[r] >= p.batch) return r;
  }
  int64_t* labels = static_cast<int64_t*>(malloc(sizeof(int64_t) * (size_t)(p.draws > 0 ? p.draws : 1)));
  switch (p.logits_dtype) {
    case kFloat32:
      vote_labels<float>(p, FromFloat32{}, labels);
      break;
    case kBFloat16:
      vote_labels<uint16_t>(p, FromBFloat16{}, labels);
      break;
    case kFloat16:
      vote_labels<uint16_t>(p, FromFloat16{}, labels);
      break;
  }
  for (int64_t r = 0; r < p.draws; ++r) {
    if (labels[r] >= 0) p.counts[p.rows[r] * p.classes + labels[r]] += 1;
  }
  free(labels);
  return -1;
}

}  // namespace DRT_ISA_NAMESPACE
}  // namespace drt
