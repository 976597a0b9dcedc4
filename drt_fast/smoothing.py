"""Randomized smoothing of an ensemble: Cohen et al.'s PREDICT and CERTIFY.

The algorithm reads as Cohen's ``core.py`` (the method: docs/method.md); the sampling --
noise, members, votes, batches -- is the engine's (`drt_fast.engine`), which returns vote
counts. Noise is counter-based (docs/internals.md): draw ``d`` of the input with key ``k``
is a pure function of ``(seed, k, d)``. CERTIFY selects with draws ``0 .. n0-1`` and
estimates with draws ``n0 .. n0+n-1`` of stream ``seed``; PREDICT uses draws ``0 .. n-1``
of stream ``seed ^ PREDICT_STREAM``. So a seed gives the same certificates whatever the
batch size, packing or order of the inputs (exactly so for a model whose output for one
row does not depend on the other rows of its batch).
"""
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ops, stats, validate
from .engine import Engine, check_votes, count_ranges
from .engine.inputs import check_inputs, eval_mode, warn_outside_pixel_range
from .ensemble import as_ensemble
from .errors import InvalidArgument, InvalidArgumentType

ABSTAIN = -1

# PREDICT's noise stream is seed + PREDICT_STREAM: seeds are below 2^63, so no certify stream
# is ever a predict stream, whatever the two seeds (docs/internals.md).
PREDICT_STREAM = 2**63

# `certify` / `predict` without a key take the next of these: keys no dataset index reaches
# (those are below AUTO_KEYS), never the same twice in a process, so the noise of every
# such call is its own, as in Cohen's code.
AUTO_KEYS = 2**62
_auto_keys = itertools.count(AUTO_KEYS)


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer for one input.

    label: certified class, or -1 (abstain); radius: certified L2 radius in pixel units,
    0.0 when abstaining; pA_lower: Clopper-Pearson lower bound on the top-class
    probability; count: estimation draws that voted for the selected class; n: estimation
    draws. The vote counts ``[K]`` of the selection and estimation samples ride along (not
    compared by ``==``).
    """
    label: int
    radius: float
    pA_lower: float
    count: int
    n: int
    selection_counts: np.ndarray = field(default=None, repr=False, compare=False)
    estimation_counts: np.ndarray = field(default=None, repr=False, compare=False)

    @property
    def abstained(self):
        return self.label == ABSTAIN


class SmoothedClassifier:
    """The smoothed ensemble g(x) = argmax_c P(ensemble(x + N(0, sigma^2 I)) = c).

    model: a drt_fast.Ensemble or a bare nn.Module (one member) mapping ``[B, *S]`` pixels to
    logits ``[B, num_classes]``, run in eval mode while sampling (smoothing assumes a fixed
    base classifier). sigma: noise level in pixel units. seed: noise stream, in [0, 2^63).
    precision: "fp32" runs the model in its own dtype; "bf16"/"fp16" write the draws in that
    dtype and run the model under ``torch.autocast``. channels_last: write 4-d draws
    channels-last (the model is converted in place); None decides from the first inputs.
    fuse: run checked rewritten copies of the members (None: where it gains, True: insist,
    False: never); rewriter: how they are rewritten (`drt_fast.engine.rewriters`; None picks
    by device). cuda_graphs: replay steps as CUDA graphs (None: auto). ``fuse_status`` and
    ``graph_status`` (`drt_fast.engine.Status`) say what was done; docs/internals.md and
    bench/RESULTS.md say when each lever pays. ``draws_performed`` counts noisy draws.

    noise: "gaussian" adds N(0, sigma^2) in floating point; "discrete" takes inputs on the
    grid of ``grid`` steps per unit (pixels k / grid; others are refused) and adds that
    Gaussian rounded to the grid, drawn exactly, so that certificates hold for the floating-point
    computation too (docs/certificates.md says what each guarantees).
    """

    def __init__(self, model, num_classes, sigma, seed=0, precision="fp32", channels_last=None,
                 fuse=None, cuda_graphs=None, rewriter=None, noise="gaussian", grid=255):
        self.model = as_ensemble(model)
        self.num_classes = validate.positive_int(num_classes, "num_classes")
        self.sigma = validate.sigma(sigma)
        self.noise = validate.noise(noise)
        self.grid = validate.grid(grid)
        # discrete: the rounded Gaussian's table, built from sigma itself; gaussian: the kernels
        # add float32(sigma) * z, so radii use the smaller of the two noise levels
        self.table = ops.discrete_table(self.sigma, self.grid) if self.noise == "discrete" else None
        self.radius_sigma = self.sigma if self.table else min(self.sigma, float(np.float32(self.sigma)))
        self.seed = validate.seed(seed)
        self.precision = validate.precision(precision)
        for name, value in (("fuse", fuse), ("cuda_graphs", cuda_graphs)):
            if not (value is None or isinstance(value, bool)):
                raise InvalidArgumentType(f"{name} must be None (auto), True or False, got {value!r}")
        self.engine = Engine(self.model, self.num_classes, self.sigma, self.precision,
                             None if channels_last is None else bool(channels_last), fuse,
                             cuda_graphs, rewriter, discrete=self.table)
        self._warned_range = False

    @property
    def fuse_status(self):
        return self.engine.runner.status

    @property
    def graph_status(self):
        return self.engine.graphs.status

    @property
    def draws_performed(self):
        return self.engine.draws_performed

    # ----------------------------------------------------------------- Cohen's algorithms
    def predict(self, x, n, alpha, batch_size, key=None):
        """PREDICT for one input x ``[*S]`` with dataset index ``key``: the top class, or -1
        when the two-sided binomial test of the top two counts has p-value > alpha.
        ``key=None``: noise no other call draws (see `AUTO_KEYS`)."""
        key = next(_auto_keys) if key is None else key
        return self.predict_many(torch.as_tensor(x)[None], [key], n, alpha, batch_size)[0]

    def certify(self, x, n0, n, alpha, batch_size, key=None):
        """CERTIFY for one input x ``[*S]`` with dataset index ``key`` -> Certificate.
        ``key=None``: noise no other call draws (see `AUTO_KEYS`); pass the input's dataset
        index for certificates that a later run reproduces."""
        key = next(_auto_keys) if key is None else key
        return self.certify_many(torch.as_tensor(x)[None], [key], n0, n, alpha, batch_size)[0]

    def predict_many(self, xs, keys, n, alpha, batch_size):
        """PREDICT for inputs xs ``[B, *S]`` with dataset indices ``keys`` ``[B]`` -> B labels."""
        n, alpha = validate.positive_int(n, "n"), validate.alpha(alpha)
        keys, counts, slack = self._sample(xs, keys, [(0, n)], batch_size, self.seed + PREDICT_STREAM)
        # discrete: the n draws follow the smoothing noise except with probability <= n * slack
        level = alpha - n * slack
        if level <= 0:
            raise InvalidArgument(f"alpha = {alpha} is below what {n} draws of this discrete noise table "
                                  f"can guarantee ({n * slack:.3g})")
        labels = []
        for key, (c,) in zip(keys, counts):
            check_votes(c, n, key)
            top2 = np.argsort(-c, kind="stable")[:2]          # stable: ties -> smaller class
            nA, nB = int(c[top2[0]]), int(c[top2[1]]) if len(c) > 1 else 0
            labels.append(ABSTAIN if stats.binom_pvalue(nA, nA + nB) > level else int(top2[0]))
        return labels

    def certify_many(self, xs, keys, n0, n, alpha, batch_size):
        """CERTIFY for inputs xs ``[B, *S]`` with dataset indices ``keys`` ``[B]``; the draws of
        several inputs share a batch, the certificates equal those of `certify` on each."""
        n0, n = validate.positive_int(n0, "n0"), validate.positive_int(n, "n")
        alpha = validate.alpha(alpha)
        keys, counts, slack = self._sample(xs, keys, [(0, n0), (n0, n)], batch_size, self.seed)
        certs = []
        for key, (selection, estimation) in zip(keys, counts):
            check_votes(selection + estimation, n0 + n, key)
            cA = int(selection.argmax())                       # ties -> smaller class
            nA = int(estimation[cA])
            # discrete: the sampled noise's pA is within `slack` of the rounded Gaussian's
            pA_lower = max(0.0, stats.lower_confidence_bound(nA, n, alpha) - slack)
            if pA_lower < 0.5:
                certs.append(Certificate(ABSTAIN, 0.0, pA_lower, nA, n, selection, estimation))
            else:
                certs.append(Certificate(cA, stats.radius(self.radius_sigma, pA_lower), pA_lower, nA,
                                         n, selection, estimation))
        return certs

    def certify_radii(self, xs, keys, radii, n0, n_max, alpha, batch_size, futility=0.01):
        """Sequential certification of inputs xs ``[B, *S]`` (dataset indices ``keys``) at the
        grid ``radii``: each input takes the draws it needs, up to ``n_max`` estimation draws
        (`drt_fast.sequential`; the guarantee: docs/sequential.md) -> one Certificate each:
        label (-1 = abstain), radius = the largest certified grid radius (0.0 for level r = 0
        and for an abstention), pA_lower = a lower bound on pA valid at level alpha at the
        stopping time, count = estimation draws for the label, n = estimation draws used.
        ``futility``: the level of the test that gives up an input early (0: only when its
        next level is out of reach); it costs certificates, never soundness."""
        from . import sequential

        radii, n0, n_max, alpha, batch_size = sequential.validate_settings(
            radii, self.radius_sigma, n0, n_max, alpha, batch_size)
        futility = validate.alpha(futility, "futility", zero=True)
        xs, keys, slack = self._inputs(xs, keys)
        # discrete: each level is tested against p_j + slack, so that the sampled noise's pA,
        # within slack of the rounded Gaussian's, certifies the latter
        settings = sequential.plan(self.radius_sigma, radii, n0, n_max, alpha, futility, slack)
        with eval_mode(self.model):
            states = sequential.certify_radii(self.engine, xs, keys, settings, n0, batch_size, self.seed)
        return [Certificate(s.cA if s.certified else ABSTAIN,
                            settings.radii[s.certified - 1] if s.certified else 0.0,
                            sequential.lower_bound(s, settings), s.count, s.n,
                            s.selection.counts, s.estimation.counts) for s in states]

    # ----------------------------------------------------------------- sampling
    def sample_counts(self, xs, keys, num, batch_size, first_draw=0, stream="certify"):
        """Raw vote counts ``[B, K]`` (int64, numpy) of draws ``first_draw .. first_draw+num-1``
        of each input, from the certify stream (``seed``) or the predict stream."""
        if stream not in ("certify", "predict"):
            raise InvalidArgument(f"stream must be 'certify' or 'predict', got {stream!r}")
        num = validate.positive_int(num, "num")
        first_draw = validate.int_in_range(first_draw, "first_draw", 0)
        seed = self.seed if stream == "certify" else self.seed + PREDICT_STREAM
        return self._sample(xs, keys, [(first_draw, num)], batch_size, seed)[1][:, 0]

    def prepare(self, xs):
        """Build now what the first inputs like xs ``[B, *S]`` would build: the layout and
        the rewritten copies. A ``fuse=True`` that cannot be honored fails here (the copies
        are still checked on the first batch)."""
        example = torch.as_tensor(xs)[:1].to(device=self.engine.device, dtype=torch.float32)
        with eval_mode(self.model):
            self.engine.begin(example)

    def _sample(self, xs, keys, ranges, batch_size, seed):
        """(keys, counts ``[B, P, K]``, slack (see `_inputs`)) of the draw ``ranges``
        ``[(first, num)]`` of each input."""
        batch_size = validate.positive_int(batch_size, "batch_size")
        for first, num in ranges:
            validate.draw_range(first, num)
        xs, keys, slack = self._inputs(xs, keys)
        with eval_mode(self.model):
            return keys, count_ranges(self.engine, xs, keys, ranges, batch_size, seed), slack

    def _inputs(self, xs, keys):
        """(xs, keys, slack): the inputs and keys checked (`check_inputs`; inputs outside
        [0, 1] named once). slack: for discrete noise -- whose pixels off the grid are refused
        here, as the engine's `to_grid` trusts them -- how far any probability of one draw under
        the sampled noise may be from the rounded Gaussian's (`DiscreteTable.slack`); 0.0 for
        Gaussian noise."""
        xs, keys = check_inputs(xs, keys)
        if not self._warned_range:
            self._warned_range = warn_outside_pixel_range(xs)
        if self.table is None:
            return xs, keys, 0.0
        ops.grid_indices(xs, self.grid, self.table.half_width)
        return xs, keys, self.table.slack(int(np.prod(xs.shape[1:])))
