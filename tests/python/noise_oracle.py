"""An oracle of the noise that shares no code with the ops (csrc/ops/noise.h):
Philox-4x32-10 in NumPy (checked against Random123's known answers), the uniform
mapping as docs/DESIGN.md, "The noise", states it, and Box-Muller in float64 with
NumPy's log, sqrt, sin and cos. The reference (reference.py) checks every z it
uses against it, so a noise bug cannot hide in a noise the reference shares
with the optimizer."""

import numpy as np

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def key_of(seed, direction=0):
    """SplitMix64 of the seed: its low and high words are the Philox key of
    direction 0; direction j > 0 takes SplitMix64 of that key (as a 64-bit
    word) xor SplitMix64(j)."""
    x = _splitmix64(seed % 2**64)
    if direction:
        x = _splitmix64(x ^ _splitmix64(direction))
    return x & _MASK, x >> 32


def philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of counters given as arrays of 32-bit words (held in
    uint64, so that the 32x32 -> 64-bit products are exact)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(_M0) * c0
        p1 = np.uint64(_M1) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & np.uint64(_MASK), (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & np.uint64(_MASK)
        k0 = (k0 + np.uint64(_W0)) & np.uint64(_MASK)
        k1 = (k1 + np.uint64(_W1)) & np.uint64(_MASK)
    return c0, c1, c2, c3


def uniform(word):
    """(2k + 1) / 2^24 for k the top 23 bits of the word."""
    return (2.0 * (word >> np.uint64(9)).astype(np.float64) + 1.0) / 2.0**24


def radius_uniform(word):
    """uniform(word), except for top 23 bits 0: (2k' + 1) / 2^33 for the low 9
    bits k'."""
    fine = (2.0 * (word & np.uint64(0x1FF)).astype(np.float64) + 1.0) / 2.0**33
    return np.where((word >> np.uint64(9)) == 0, fine, uniform(word))


def noise(kind, seed, step, index, numel, direction=0):
    """z of elements 0..numel-1 of parameter `index` at `step`, float64, and
    how far a float32 z may be from each (`tolerance`).
    Element l * 32 + j of tile t takes, for Gaussian noise, words (0, 1)
    (l = 0, 1) or (2, 3) (l = 2, 3) of counter block 32 t + j, as r cos (l even)
    or r sin (l odd) of the angle 2 pi v, r = sqrt(-2 ln u) (u the radius's
    uniform of the first word, v the uniform of the second); for Rademacher
    noise, bit j of word l of counter block t, 1 -> +1 and 0 -> -1. A counter is
    (block low, block high, index, step)."""
    element = np.arange(numel, dtype=np.uint64)
    tile, lane, word_index = element // np.uint64(128), element % np.uint64(32), (element % np.uint64(128)) // np.uint64(32)
    key = key_of(seed, direction)
    if kind == "rademacher":
        block = tile
    else:
        block = tile * np.uint64(32) + lane
    words = philox(block & np.uint64(_MASK), block >> np.uint64(32), np.full(numel, index), np.full(numel, step), *key)
    words = np.stack(words)
    if kind == "rademacher":
        bits = (words[word_index.astype(np.int64), np.arange(numel)] >> lane) & np.uint64(1)
        return np.where(bits == 1, 1.0, -1.0), np.zeros(numel)
    low = word_index < 2
    radius = np.sqrt(-2.0 * np.log(radius_uniform(np.where(low, words[0], words[2]))))
    angle = 2.0 * np.pi * uniform(np.where(low, words[1], words[3]))
    z = radius * np.where(word_index % np.uint64(2) == 0, np.cos(angle), np.sin(angle))
    return z, tolerance(radius)


def tolerance(radius):
    """How far a float32 Gaussian z may be from the oracle's: the float32
    transform's rounding, a few units of 2^-24 times the radius r (the sine or
    cosine's absolute error times r, r's relative error times |z| <= r)."""
    return 1e-6 * np.maximum(1.0, radius)


def perturbation(kind, seed, step, index, shape, direction=0, rank=0):
    """z of a parameter of `shape`, float64 and flat, and its tolerance: the
    noise itself (rank 0, or one dimension), or the low-rank z of
    docs/DESIGN.md, "The noise": viewed as rows by the rest, the sum over l <
    rank of the outer product of u_l (elements l (rows + cols) + [0, rows) of
    the noise) and v_l (the next cols), over sqrt(rank)."""
    numel = int(np.prod(shape))
    if rank == 0 or len(shape) < 2:
        return noise(kind, seed, step, index, numel, direction)
    rows = shape[0]
    cols = numel // rows
    factors, factor_tolerance = noise(kind, seed, step, index, rank * (rows + cols), direction)
    z = np.zeros((rows, cols))
    bound = np.zeros((rows, cols))
    for l in range(rank):
        first = l * (rows + cols)
        u, v = factors[first:first + rows], factors[first + rows:first + rows + cols]
        du, dv = factor_tolerance[first:first + rows], factor_tolerance[first + rows:first + rows + cols]
        z += np.outer(u, v)
        bound += np.outer(np.abs(u) + du, np.abs(v) + dv) - np.outer(np.abs(u), np.abs(v))
        bound += np.outer(np.abs(u), np.abs(v)) * (rank + 1) * 2.0**-23  # float32 products, sums and scale
    return (z / np.sqrt(rank)).ravel(), (bound / np.sqrt(rank)).ravel()
