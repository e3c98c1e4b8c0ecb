"""MurmurHash3 x86_32 over many byte strings at once, as Spark's HashingTF uses it.

Spark 3+ hashes a term as ``Murmur3_x86_32.hashUnsafeBytes2(utf8, seed=42)``, which is
the reference MurmurHash3 (little-endian 4-byte blocks, standard tail). Here every
term of a batch is hashed together: the terms are packed, zero-padded, into one
uint32 matrix and the block rounds run column by column over all terms.
"""

from __future__ import annotations

import numpy as np

_C1 = np.uint32(0xCC9E2D51)
_C2 = np.uint32(0x1B873593)
_M5 = np.uint32(5)
_N1 = np.uint32(0xE6546B64)
_F1 = np.uint32(0x85EBCA6B)
_F2 = np.uint32(0xC2B2AE35)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _mix_k1(k1: np.ndarray) -> np.ndarray:
    return _rotl(k1 * _C1, 15) * _C2


def hash_bytes(items: list[bytes], seed: int = 42) -> np.ndarray:
    """Signed 32-bit MurmurHash3 of each byte string (int32 array, Java's ``int``)."""
    n = len(items)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=n)
    # one spare word per row, so the tail word of a 4-aligned term is a zero word
    words_per_row = int(lengths.max()) // 4 + 1
    width = 4 * words_per_row
    buf = np.zeros(n * width, dtype=np.uint8)
    flat = np.frombuffer(b"".join(items), dtype=np.uint8)
    starts = np.arange(n, dtype=np.int64) * width
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    buf[offsets + np.arange(len(flat))] = flat
    words = buf.view("<u4").reshape(n, words_per_row).astype(np.uint32)

    blocks = lengths // 4
    h1 = np.full(n, seed & 0xFFFFFFFF, dtype=np.uint32)
    for j in range(int(blocks.max())):
        mixed = _rotl(h1 ^ _mix_k1(words[:, j]), 13) * _M5 + _N1
        h1 = np.where(j < blocks, mixed, h1)
    # the tail bytes sit zero-padded in word `blocks`; mixK1(0) == 0 keeps aligned terms as they are
    h1 ^= _mix_k1(words[np.arange(n), blocks])

    h1 ^= lengths.astype(np.uint32)
    h1 ^= h1 >> np.uint32(16)
    h1 *= _F1
    h1 ^= h1 >> np.uint32(13)
    h1 *= _F2
    h1 ^= h1 >> np.uint32(16)
    return h1.view(np.int32)


def hash_terms(terms: list[str | None], seed: int = 42) -> np.ndarray:
    """Spark's ``FeatureHasher.murmur3Hash`` for string terms (null hashes to the seed)."""
    # Java's UTF-8 encoder writes '?' for a lone surrogate, as "replace" does
    encoded = [b"" if t is None else t.encode("utf-8", "replace") for t in terms]
    hashes = hash_bytes(encoded, seed)
    if any(t is None for t in terms):
        hashes = np.where(np.array([t is None for t in terms]), np.int32(seed), hashes)
    return hashes
