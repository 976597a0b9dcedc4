"""Philox4x32-10 and Box-Muller (csrc/philox.h, ops/reference.py): known answers, C++ ==
torch reference bit for bit, accuracy."""
import math

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


def test_box_muller_reference_matches_cpp_bitwise():
    gen = torch.Generator().manual_seed(2)
    a = torch.cat([torch.randint(0, 2**32, (3000,), generator=gen), torch.tensor(_edge_words())])
    b = torch.cat([torch.randint(0, 2**32, (3000,), generator=gen), torch.tensor(_edge_words()[::-1])])
    z0, z1 = reference.box_muller(a, b)
    cpp = np.array([cpu_kernels.box_muller(int(x), int(y)) for x, y in zip(a, b)], dtype=np.float32)
    np.testing.assert_array_equal(cpp[:, 0], z0.numpy())
    np.testing.assert_array_equal(cpp[:, 1], z1.numpy())


def test_log_accuracy():
    k = torch.cat([torch.arange(1, 5000), torch.randint(1, 2**24 + 1, (20000,), generator=torch.Generator().manual_seed(3)),
                   torch.arange(2**24 - 5000, 2**24 + 1)])
    ours = reference.log_u24(k).double()
    exact = torch.log(k.double() * 2.0**-24)
    # relative to max(1, |ln u|): near u = 1 the log is tiny and only absolute error matters
    err = (ours - exact).abs() / exact.abs().clamp(min=1.0)
    assert err.max() < 3e-7
    assert ours[-1] == 0.0  # u = 1 gives radius 0, never a NaN


def test_sin_cos_accuracy():
    m = torch.cat([torch.arange(0, 1 << 24, 997), torch.tensor([(1 << 24) - 1, 1 << 21, (1 << 22) - 1])])
    sin_t, cos_t = reference.sin_cos_quadrant(m)
    angle = m.double() * (2 * math.pi / 2**24)
    assert (sin_t.double() - torch.sin(angle)).abs().max() < 3e-7
    assert (cos_t.double() - torch.cos(angle)).abs().max() < 3e-7
    assert (sin_t.double() ** 2 + cos_t.double() ** 2 - 1).abs().max() < 6e-7


def test_noise_layout_matches_contract():
    """Element e of draw d of key k under seed s comes from Philox counter (e//4, d, k_lo, k_hi), key (s_lo, s_hi)."""
    seed, key, draw = (7 << 32) | 0x1234, (3 << 32) | 99, 41
    x = torch.zeros(1, 11)
    out = ops.noisy_draws(x, torch.tensor([key]), torch.tensor([draw - 2]), 3, 1.0, seed)[2]  # row r=2: draw 41
    for e in range(11):
        words = cpu_kernels.philox4x32_10(e // 4, draw, key & 0xFFFFFFFF, key >> 32, seed & 0xFFFFFFFF, seed >> 32)
        pair = 2 * ((e % 4) // 2)
        z = cpu_kernels.box_muller(words[pair], words[pair + 1])[e % 2]
        assert out[e].item() == z
