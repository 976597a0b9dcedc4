"""Philox4x32-10 and Box-Muller (csrc/philox.h, ops/reference.py): known answers, C++ ==
torch reference bit for bit, accuracy, the exact law of the radius out to its last bit."""
import math
import struct

import numpy as np
import pytest
import torch

from drt_fast import ops
from drt_fast.ops import reference
from drt_fast.ops.extension import cpu_kernels

# Random123's kat_vectors (philox4x32 10): counter[4] key[2] -> output[4]
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers_cpp(counter, key, expected):
    assert cpu_kernels.philox4x32_10(*counter, *key) == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers_reference(counter, key, expected):
    words = ops.philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in counter], *key)
    assert tuple(int(w) for w in words) == expected


def test_philox_reference_matches_cpp_on_random_counters():
    gen = torch.Generator().manual_seed(1)
    c = torch.randint(0, 2**32, (4, 300), generator=gen)
    k0, k1 = 0x9E3779B9, 0x00000007
    ref = torch.stack(ops.philox4x32_10(c[0], c[1], c[2], c[3], k0, k1), dim=1)
    for i in range(c.shape[1]):
        assert tuple(ref[i].tolist()) == cpu_kernels.philox4x32_10(*[int(v) for v in c[:, i]], k0, k1)


def _edge_words():
    """Words at the ends of the uniform grid and at every quadrant/octant boundary of the angle."""
    words = [0, 0xFF, 0x100, 0xFFFFFFFF, 0xFFFFFF00, 0x80000000]
    for boundary in range(0, 1 << 24, 1 << 21):  # octants of the angle, in units of the 24-bit grid
        for delta in (-1, 0, 1):
            words.append(((boundary + delta) % (1 << 24)) << 8)
    return words


def _tail_words():
    """First words a around and below the tail-word threshold 2^15, and where W's top 24
    significant bits cross from a into b's low byte and into the tail word."""
    return [0, 1, 2, 0xFF, 0x100, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0xFFFFFF, 0x1000000]


def f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def test_box_muller_reference_matches_cpp_bitwise():
    gen = torch.Generator().manual_seed(2)
    a = torch.cat([torch.randint(0, 2**32, (3000,), generator=gen), torch.tensor(_edge_words()),
                   torch.randint(0, 2**15, (500,), generator=gen), torch.tensor(_tail_words())])
    b = torch.cat([torch.randint(0, 2**32, (3000,), generator=gen), torch.tensor(_edge_words()[::-1]),
                   torch.randint(0, 2**32, (500,), generator=gen), torch.tensor(_edge_words()[:len(_tail_words())])])
    c = torch.randint(0, 2**32, a.shape, generator=gen)
    c[-len(_tail_words()):] = torch.tensor([0, 0xFFFFFFFF, 0x100, 0xFF] * 3)[:len(_tail_words())]
    z0, z1 = reference.box_muller(a, b, c)
    cpp = np.array([cpu_kernels.box_muller(int(x), int(y), int(w)) for x, y, w in zip(a, b, c)], dtype=np.float32)
    np.testing.assert_array_equal(cpp[:, 0], z0.numpy())
    np.testing.assert_array_equal(cpp[:, 1], z1.numpy())


def test_tail_word_is_read_only_when_needed():
    # a >= 2^15: W's top 40 bits hold its 24 significant bits, the tail word changes nothing
    for a in (0x8000, 0x12345678, 0xFFFFFFFF):
        assert cpu_kernels.box_muller(a, 0x1234, 0) == cpu_kernels.box_muller(a, 0x1234, 0xFFFFFFFF)
    # a < 2^15: it does
    assert cpu_kernels.box_muller(0x10, 0x1234, 0) != cpu_kernels.box_muller(0x10, 0x1234, 0xFFFFFF00)


def _uniform(w: int) -> float:
    """u of philox.h for the 64-bit word w, from its definition: w's top 24 significant bits
    plus one unit in the last of them, over 2^64 (exact as a Python float: 24 bits)."""
    t = max(0, w.bit_length() - 24)
    return math.ldexp((w >> t) + 1, t - 64)


def _pair(a: int, b: int, c: int) -> int:
    return (a << 32) | ((b & 0xFF) << 24) | (c >> 8)


def test_log_uniform_accuracy():
    gen = torch.Generator().manual_seed(3)
    words = [(int(a), int(b), int(c)) for a, b, c in torch.randint(0, 2**32, (3000, 3), generator=gen)]
    words += [(int(a), int(b), int(c)) for a, b, c in zip(torch.randint(0, 2**15, (2000,), generator=gen),
                                                          torch.randint(0, 2**32, (2000,), generator=gen),
                                                          torch.randint(0, 2**32, (2000,), generator=gen))]
    words += [(a, b, c) for a in _tail_words() for b in (0, 0xFF, 0x80) for c in (0, 0x100, 0xFFFFFFFF)]
    words += [(0xFFFFFFFF, 0xFF, 0xFFFFFFFF)]  # u = 1
    for a, b, c in words:
        radius = cpu_kernels.box_muller(a, b & 0xFF, c)[0]  # angle 0: z0 is the radius
        log_u = math.log(_uniform(_pair(a, b, c)))
        exact = math.sqrt(-2.0 * log_u)
        # the fp32 log's error is about 1e-7 of max(1, |ln u|), sqrt halves it
        assert abs(radius - exact) <= 2e-7 * max(1.0, exact), (a, b, c, radius, exact)
    assert cpu_kernels.box_muller(0xFFFFFFFF, 0xFF, 0xFFFFFFFF) == (0.0, 0.0)      # u = 1: radius 0, never a NaN
    assert cpu_kernels.box_muller(0, 0, 0)[0] == pytest.approx(math.sqrt(128 * math.log(2)), rel=1e-6)  # u = 2^-64


@pytest.mark.parametrize("t", [1.0, 3.0, 5.0, 5.77, 5.8, 6.0, 7.0, 8.0, 9.0, 9.4])
def test_radius_has_the_gaussian_tail(t):
    """P(radius > t) of the generator, exactly: the radius falls as the pair's 64-bit word W
    grows, so P = (number of words below the first W whose radius is <= t) / 2^64; for a 2-d
    standard normal it is exp(-t^2 / 2). The 24-bit uniform before issue 19 gave 0 beyond 5.77."""
    def radius(w):
        return cpu_kernels.box_muller(w >> 32, (w >> 24) & 0xFF, (w & 0xFFFFFF) << 8)[0]

    lo, hi = 0, 2**64 - 1  # radius(lo) > t >= radius(hi)
    if radius(lo) <= t:
        lo = None
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if radius(mid) > t else (lo, mid)
    p = 0.0 if lo is None else (lo + 1) / 2**64
    assert p == pytest.approx(math.exp(-t * t / 2), rel=2e-5)


def test_sin_cos_accuracy():
    m = torch.cat([torch.arange(0, 1 << 24, 997), torch.tensor([(1 << 24) - 1, 1 << 21, (1 << 22) - 1])])
    sin_t, cos_t = reference.sin_cos_quadrant(m)
    angle = m.double() * (2 * math.pi / 2**24)
    assert (sin_t.double() - torch.sin(angle)).abs().max() < 3e-7
    assert (cos_t.double() - torch.cos(angle)).abs().max() < 3e-7
    assert (sin_t.double() ** 2 + cos_t.double() ** 2 - 1).abs().max() < 6e-7


def _words(seed, key, draw, block):
    return cpu_kernels.philox4x32_10(block, draw, key & 0xFFFFFFFF, key >> 32, seed & 0xFFFFFFFF, seed >> 32)


def test_noise_layout_matches_contract():
    """Element e of draw d of key k under seed s: pair (e % 4) // 2 of main block e // 4 (Philox
    counter (e//4, d, k_lo, k_hi), key (s_lo, s_hi)), its tail word from block 2^30 + e // 4."""
    seed, key, draw = (7 << 32) | 0x1234, (3 << 32) | 99, 41
    x = torch.zeros(1, 11)
    out = ops.noisy_draws(x, torch.tensor([key]), torch.tensor([draw - 2]), 3, 1.0, seed)[2]  # row r=2: draw 41
    for e in range(11):
        words = _words(seed, key, draw, e // 4)
        tail = _words(seed, key, draw, (1 << 30) + e // 4)
        pair = (e % 4) // 2
        z = cpu_kernels.box_muller(words[2 * pair], words[2 * pair + 1], tail[pair])[e % 2]
        assert out[e].item() == z


# Known answers: (seed, key, draw, element) -> the fp32 bits of the standard normal noise. The
# third is a pair that needs its tail word (a = 795 < 2^15, |z| = 5.54); the others cover keys,
# seeds and draws at their limits. Every implementation must give these bits.
KNOWN_NORMALS = [
    ((0, 0, 0, 0), 0x3F7DBB2F),
    ((0, 0, 0, 3), 0xBEF6D1A9),
    ((20240611, 7, 24182, 666), 0x40B16B3B),
    ((2**40 + 5, 2**33 + 17, 99, 1029), 0xBF2C0611),
    ((2**64 - 1, 2**63 - 1, 2**32 - 1, 150527), 0x4038D67B),
    ((2**63 + 12345, 4, 100, 65), 0xBF4D7677),
]
# (a, b, c) -> the bits of the pair's two normals, in the deep tail (W < 2^40) and at u = 1.
KNOWN_PAIRS = [
    ((0, 0, 0), (0x4116B55F, 0x00000000)),             # u = 2^-64: radius sqrt(128 ln 2) = 9.4193, angle 0
    ((0, 0x40000000, 0x12345678), (0x80000000, 0x40F9646F)),   # W < 2^40: |z| = 7.79, angle pi/2
    ((0x7FFF, 0xFFFFFFFF, 0xFFFFFFFF), (0x409B58C5, 0xB5F404A4)),  # the last pair that reads its tail word
    ((0xFFFFFFFF, 0xFF, 0), (0x80000000, 0x80000000)),   # u = 1: radius -0.0 (sqrt(-0.0)), z = -0.0
]


def known_normal_inputs(case):
    """(x, keys, first_draw) of a noisy_draws call whose only row is the case's draw (x = 0,
    sigma = 1: the output is the noise); the element is `case[3]`."""
    seed, key, draw, element = case
    return torch.zeros(1, element + 1), torch.tensor([key]), torch.tensor([draw]), seed


@pytest.mark.parametrize("case,bits", KNOWN_NORMALS)
def test_known_normals(case, bits):
    seed, key, draw, element = case
    x, keys, first, _ = known_normal_inputs(case)
    # (the eager entry point: the dispatcher's ints stop below 2^63, seeds go to 2^64)
    assert f32_bits(ops.noisy_draws_eager(x, keys, first, 1, 1.0, seed)[0, element].item()) == bits  # CPU kernel
    assert f32_bits(ops.reference_noisy_draws(x, keys, first, 1, 1.0, seed)[0, element].item()) == bits
    assert f32_bits(cpu_kernels.normals4(seed, key, draw, element // 4)[element % 4]) == bits  # CUDA's per-quad code


@pytest.mark.parametrize("words,bits", KNOWN_PAIRS)
def test_known_pairs(words, bits):
    cpp = cpu_kernels.box_muller(*words)
    ref = reference.box_muller(*[torch.tensor([w]) for w in words])
    assert tuple(f32_bits(z) for z in cpp) == bits
    assert tuple(f32_bits(float(z)) for z in ref) == bits


@pytest.mark.parametrize("case,bits", KNOWN_NORMALS)
def test_known_normals_follow_the_definition(case, bits):
    """The known answers against the noise's definition evaluated in float64 (independently of
    the fp32 polynomials): agreement to fp32 accuracy."""
    seed, key, draw, element = case
    quad, pair = element // 4, (element % 4) // 2
    words = _words(seed, key, draw, quad)
    a, b = words[2 * pair], words[2 * pair + 1]
    c = _words(seed, key, draw, (1 << 30) + quad)[pair]
    radius = math.sqrt(-2.0 * math.log(_uniform(_pair(a, b, c))))
    angle = 2 * math.pi * (b >> 8) / 2**24
    exact = radius * (math.cos(angle) if element % 2 == 0 else math.sin(angle))
    value = struct.unpack("<f", struct.pack("<I", bits))[0]
    assert abs(value - exact) < 1e-6 * max(1.0, abs(exact))
