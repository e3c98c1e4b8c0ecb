"""The vectorised MurmurHash3 against scikit-learn's reference implementation (no JVM needed)."""

from __future__ import annotations

import numpy as np
from sklearn.utils import murmurhash3_32

from runtimes.spark.native.murmur3 import hash_bytes, hash_terms


def test_hash_bytes_matches_the_reference_for_every_tail_length():
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in range(41) for _ in range(3)]
    for seed in (42, 0, 2**31 - 1):
        expected = [murmurhash3_32(item, seed=seed, positive=False) for item in items]
        assert hash_bytes(items, seed).tolist() == expected


def test_hash_terms_encodes_utf8_and_hashes_null_to_the_seed():
    terms = ["héllo", "日本語", "😀", None, ""]
    expected = [murmurhash3_32(t.encode(), seed=42, positive=False) for t in terms if t is not None]
    got = hash_terms(terms).tolist()
    assert got[:3] + got[4:] == expected and got[3] == 42
    assert hash_terms([]).shape == (0,)
