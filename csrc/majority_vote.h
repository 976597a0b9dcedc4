// vote_'s weighted majority vote (agg = mv) over a draw's member labels, kept as at most M
// distinct (label, summed weight) pairs: shared by the CPU kernel's row path (vote.cpp) and
// the CUDA block kernel (vote.cu), so that both agree with the per-class score rows of the
// other paths and the reference (drt_fast.ops.reference_labels) for any finite weights,
// negative ones included: every class starts at -1 (no vote), a member's vote sets its
// class to max(score, 0) + weight, summed in double in member order, and the first largest
// score over all classes wins.
#pragma once

#include <math.h>
#include <stdint.h>

#include "philox.h"  // DRT_HD (internal linkage on the CPU: each ISA build has its own copy)

namespace drt {

// Adds a member's vote for `label` with weight w to the pairs labels / votes [*distinct].
template <typename L>
DRT_HD void mv_add(L* labels, double* votes, int64_t* distinct, L label, double w) {
  int64_t d = 0;
  while (d < *distinct && labels[d] != label) ++d;
  if (d == *distinct) {
    labels[d] = label;
    votes[d] = -1.0;
    ++*distinct;
  }
  votes[d] = (votes[d] < 0.0 ? 0.0 : votes[d]) + w;
}

// The winner among the pairs and the classes no member voted for (at -1: only the smallest
// can win, and there is one unless every class got a vote). A NaN sum (NaN weights, which
// the op does not check on CUDA) never wins; nothing winning gives class 0.
template <typename L>
DRT_HD int64_t mv_winner(const L* labels, const double* votes, int64_t distinct, int64_t classes) {
  int64_t unvoted = 0;
  for (bool taken = true; taken && unvoted < classes;) {
    taken = false;
    for (int64_t d = 0; d < distinct && !taken; ++d) taken = (int64_t)labels[d] == unvoted;
    if (taken) ++unvoted;
  }
  double best = unvoted < classes ? -1.0 : -INFINITY;
  int64_t winner = unvoted;  // == classes: none yet
  for (int64_t d = 0; d < distinct; ++d) {
    if (votes[d] > best || (votes[d] == best && (int64_t)labels[d] < winner)) {
      best = votes[d];
      winner = labels[d];
    }
  }
  return winner < classes ? winner : 0;
}

}  // namespace drt
