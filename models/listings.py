"""Deterministic synthetic product listings for the product-matching example.

A small catalogue (brand, model, category, specifics) and pairs of listings built
from it: positives are the same product written differently (word order, extra
marketing words, dropped specifics, case), negatives are different products, half
of them close (same brand and category, another model). No download; a fixed seed.
"""

from __future__ import annotations

import random

import numpy as np

CATALOGUE = [
    ("Apple", "iPhone 5", "phone", {"Storage": "16GB", "Colour": "Black"}),
    ("Apple", "iPhone 6", "phone", {"Storage": "64GB", "Colour": "Silver"}),
    ("Apple", "iPhone 7 Plus", "phone", {"Storage": "128GB", "Colour": "Gold"}),
    ("Samsung", "Galaxy S7", "phone", {"Storage": "32GB", "Colour": "Black"}),
    ("Samsung", "Galaxy S8", "phone", {"Storage": "64GB", "Colour": "Blue"}),
    ("Google", "Pixel 2", "phone", {"Storage": "64GB", "Colour": "White"}),
    ("Sony", "WH-1000XM3", "headphones", {"Type": "Over-ear", "Colour": "Black"}),
    ("Bose", "QuietComfort 35", "headphones", {"Type": "Over-ear", "Colour": "Silver"}),
    ("Hygger", "Aquarium Gravel Vacuum", "aquarium", {"Type": "Siphon", "Length": "60cm"}),
    ("Fluval", "Edge 46L", "aquarium", {"Volume": "46L", "Colour": "Black"}),
    ("Tetra", "Whisper 20", "aquarium", {"Type": "Filter", "Size": "20 gallon"}),
    ("Canon", "EOS 80D", "camera", {"Resolution": "24MP", "Mount": "EF-S"}),
    ("Nikon", "D750", "camera", {"Resolution": "24MP", "Mount": "F"}),
    ("Nikon", "D3500", "camera", {"Resolution": "24MP", "Mount": "F"}),
    ("Dell", "XPS 13", "laptop", {"RAM": "8GB", "Storage": "256GB SSD"}),
    ("Lenovo", "ThinkPad X1 Carbon", "laptop", {"RAM": "16GB", "Storage": "512GB SSD"}),
]
_EXTRAS = ["New", "Unlocked", "Genuine", "Free Shipping", "Fast Dispatch", "Boxed", "UK Seller", "Original"]


def _listing(rng: random.Random, product) -> tuple[str, str]:
    brand, model, category, specifics = product
    words = [brand, model, *specifics.values()]
    if rng.random() < 0.5:
        words = [model, brand, *specifics.values()]
    words += rng.sample(_EXTRAS, rng.randint(0, 2))
    if rng.random() < 0.3:
        words = [w for w in words if w not in specifics.values()]
    title = " ".join(words)
    title = title.upper() if rng.random() < 0.1 else title
    items = [("Brand", brand), ("Model", model), *specifics.items()]
    kept = [kv for kv in items if kv[0] in ("Brand", "Model") or rng.random() < 0.8]
    return title, "; ".join(f"{k}: {v}" for k, v in kept)


def listing_pairs(n: int = 2000, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs as an object array [n, 4] (title_1, specifics_1, title_2, specifics_2)
    and labels (1.0: same product)."""
    rng = random.Random(seed)
    rows, labels = [], []
    for i in range(n):
        a = rng.choice(CATALOGUE)
        if i % 2 == 0:
            b = a
        elif i % 4 == 1:
            b = rng.choice([p for p in CATALOGUE if p[0] == a[0] and p[1] != a[1]] or [p for p in CATALOGUE if p != a])
        else:
            b = rng.choice([p for p in CATALOGUE if p != a])
        rows.append((*_listing(rng, a), *_listing(rng, b)))
        labels.append(1.0 if a == b else 0.0)
    return np.array(rows, dtype=object), np.array(labels)


# The seed's demo records: the iPhone 5 listing against an aquarium vacuum, and against itself.
IPHONE = {"title": "Apple iPhone 5 16GB Black Unlocked", "specifics": "Brand: Apple; Model: iPhone 5; Storage: 16GB; Colour: Black"}
VACUUM = {"title": "Hygger Aquarium Gravel Vacuum Siphon 60cm", "specifics": "Brand: Hygger; Model: Aquarium Gravel Vacuum; Type: Siphon"}
DEMO_RECORDS = [
    {"title_1": IPHONE["title"], "specifics_1": IPHONE["specifics"], "title_2": VACUUM["title"], "specifics_2": VACUUM["specifics"]},
    {"title_1": IPHONE["title"], "specifics_1": IPHONE["specifics"], "title_2": IPHONE["title"], "specifics_2": IPHONE["specifics"]},
]
