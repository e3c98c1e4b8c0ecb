"""Custom scikit-learn transformers the scikit runtime can unpickle ("custom scikit").

``ListingPairFeatures`` turns a pair of product listings into similarity features for
a same-product classifier (``pm_spark``). Its input columns are the seed demo's record
fields, ``Title1, ItemSpecifics1, Title2, ItemSpecifics2``; item specifics are eBay's
``'Key': ' value'; 'Key': ' value'`` text, read by ``parse_item_specifics``.

Features (``FEATURE_NAMES``, in order):

- ``title_cosine``, ``specifics_cosine``: TF-IDF cosine (character 2-4 grams, robust to
  spelling variants) of the titles and of the specifics' values. One vectorizer call
  for all four texts of a batch: its fixed cost dominates small batches.
- ``title_jaccard``: word-token Jaccard of the titles.
- ``key_jaccard``: Jaccard of the two key sets (0 when both are empty).
- ``value_agreement``: fraction of the shared product keys whose values agree (0.5, no
  evidence, when none is shared); ``value_conflicts``: how many disagree (at most 3).
  Values agree when equal once normalised (``32 GB`` = ``32GB``) or when one's words
  are all within the other's (``Silver`` within ``White & Silver``). Keys about the
  item rather than the product (cosmetic condition, accessories, warranty) are left out.
- ``code_agreement``: product codes on both sides: barcodes (UPC/EAN/ISBN/GTIN, compared
  across those keys) and MPN; +1 per code that agrees, -1 per code that differs,
  averaged; 0 when neither is on both sides.
- ``brand_model_agreement``: the same vote for Brand and Model (``iPhone 5`` agrees
  with ``Apple iPhone 5``, not with ``iPhone 5s``).
- ``number_agreement``: Jaccard of the numbers in the titles (capacities and model
  numbers decide "iPhone 5 16GB" vs "iPhone 5 32GB").
- ``length_gap``: relative length difference of the titles.

Keys are compared case-insensitively with a few aliases (Colour = Color,
Designer/Brand = Brand, ...); values lower-cased without punctuation or spaces, barcodes
without leading zeros; placeholder values (``Does not apply``, ``N/A``, ``Unbranded``,
...) count as absent. Featurizing is a per-row Python loop over parsed specifics plus
one TF-IDF call per batch: about a millisecond for one record.
"""

from __future__ import annotations

import re

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.feature_extraction.text import TfidfVectorizer

COLUMNS = ("Title1", "ItemSpecifics1", "Title2", "ItemSpecifics2")
FEATURE_NAMES = (
    "title_cosine",
    "specifics_cosine",
    "title_jaccard",
    "key_jaccard",
    "value_agreement",
    "value_conflicts",
    "code_agreement",
    "brand_model_agreement",
    "number_agreement",
    "length_gap",
)

# A pair's header, 'Key': , at the start or after the ";" that ends the previous pair.
# The value runs to the next header, so it may hold quotes (' 4'') and ";" (' a; b').
_HEADER = re.compile(r"(?:^|;)\s*'([^;\n]*?)'\s*:\s*")
_TOKEN = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")
_KEY_ALIASES = {
    "colour": "color",
    "designer/brand": "brand",
    "manufacturer": "brand",
    "manufacturer part number": "mpn",
    "storage": "storage capacity",
    "model number": "model",
}
_PLACEHOLDERS = frozenset(
    {"", "doesnotapply", "na", "none", "unknown", "notapplicable", "unbranded", "generic", "nobrand", "seedescription"}
)
_BARCODES = ("upc", "ean", "isbn", "gtin")
# Keys about the item on sale, not the product: two listings of one product may differ there.
_ITEM_KEYS = frozenset({"cosmetic condition", "condition", "no accessories", "bundle listing", "warranty", "modified item"})


def parse_item_specifics(text) -> dict[str, str]:
    """``'Brand': ' Apple'; 'Screen Size': ' 4''`` -> ``{"Brand": "Apple", "Screen Size": "4'"}``.

    Keys and values are stripped of their quotes and surrounding spaces; a value keeps
    the quotes and ";" inside it. A repeated key keeps its first value. Text without
    any quoted key is read best effort as ``Key: value; Key: value``. Never raises:
    empty or unreadable text gives ``{}``.
    """
    if text is None:
        return {}
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = str(text)
    pairs: dict[str, str] = {}
    headers = list(_HEADER.finditer(text))
    if headers:
        ends = [h.start() for h in headers[1:]] + [len(text)]
        for header, end in zip(headers, ends):
            _add(pairs, header.group(1), text[header.end() : end])
    else:
        for part in text.split(";"):
            key, colon, value = part.partition(":")
            if colon:
                _add(pairs, key, value)
    return pairs


def _add(pairs: dict[str, str], key: str, value: str) -> None:
    key, value = _unquote(key), _unquote(value)
    if key and key not in pairs:
        pairs[key] = value


def _unquote(text: str) -> str:
    """Strips spaces, then one quote at each end, then spaces: ``' 4''`` -> ``4'``."""
    text = text.strip()
    if text.startswith("'"):
        text = text[1:]
    if text.endswith("'"):
        text = text[:-1]
    return text.strip()


def _canonical(specifics: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Canonical key -> (comparable value, raw value); placeholder values dropped."""
    out: dict[str, tuple[str, str]] = {}
    for key, raw in specifics.items():
        key = " ".join(key.lower().split())
        key = _KEY_ALIASES.get(key, key)
        value = _NOT_ALNUM.sub("", raw.lower())
        if value not in _PLACEHOLDERS and key not in out:
            out[key] = (value.lstrip("0") if key in _BARCODES and value.isdigit() else value, raw)
    return out


def _vote(votes: list[float]) -> float:
    return sum(votes) / len(votes) if votes else 0.0


def _agree(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Equal once normalised ("32 GB" = "32GB"), or one raw value's words all within the
    other's ("Silver" within "White & Silver", "iPhone 5" within "Apple iPhone 5")."""
    if a[0] == b[0]:
        return True
    ta, tb = set(_TOKEN.findall(a[1].lower())), set(_TOKEN.findall(b[1].lower()))
    return bool(ta and tb) and (ta <= tb or tb <= ta)


def _specifics_features(specifics_a: dict[str, str], specifics_b: dict[str, str]) -> tuple[float, float, float, float, float]:
    """key_jaccard, value_agreement, value_conflicts, code_agreement, brand_model_agreement."""
    a, b = _canonical(specifics_a), _canonical(specifics_b)
    shared = a.keys() & b.keys()
    union = len(a.keys() | b.keys())
    key_jaccard = len(shared) / union if union else 0.0
    compared = shared - _ITEM_KEYS
    agreed = sum(_agree(a[k], b[k]) for k in compared)
    value_agreement = agreed / len(compared) if compared else 0.5
    conflicts = min(len(compared) - agreed, 3)

    codes = []
    barcodes_a = {a[k][0] for k in _BARCODES if k in a}
    barcodes_b = {b[k][0] for k in _BARCODES if k in b}
    if barcodes_a and barcodes_b:
        codes.append(1.0 if barcodes_a & barcodes_b else -1.0)
    if "mpn" in shared:
        codes.append(1.0 if a["mpn"][0] == b["mpn"][0] else -1.0)
    identity = [1.0 if _agree(a[k], b[k]) else -1.0 for k in ("brand", "model") if k in shared]
    return key_jaccard, value_agreement, conflicts, _vote(codes), _vote(identity)


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _texts(X) -> tuple[list[str], list[str], list[str], list[str]]:
    X = np.asarray(X, dtype=object)
    if X.ndim != 2 or X.shape[1] != len(COLUMNS):
        raise ValueError(f"expected [n, {len(COLUMNS)}] columns {COLUMNS}, got shape {X.shape}")
    return tuple([_text(v) for v in X[:, i]] for i in range(len(COLUMNS)))  # type: ignore[return-value]


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class ListingPairFeatures(BaseEstimator, TransformerMixin):
    """X: object array [n, 4] with columns COLUMNS -> float64 [n, 10] (FEATURE_NAMES)."""

    def __init__(self, ngram_range: tuple[int, int] = (2, 4)):
        self.ngram_range = ngram_range

    def fit(self, X, y=None):
        t1, s1, t2, s2 = _texts(X)
        values = [" ".join(parse_item_specifics(s).values()) for s in s1 + s2]
        self.vectorizer_ = TfidfVectorizer(analyzer="char_wb", ngram_range=self.ngram_range, lowercase=True).fit(
            t1 + t2 + values
        )
        return self

    def transform(self, X) -> np.ndarray:
        t1, s1, t2, s2 = _texts(X)
        n = len(t1)
        if n == 0:  # TfidfTransformer refuses an empty batch
            return np.empty((0, len(FEATURE_NAMES)), dtype=np.float64)
        parsed_1 = [parse_item_specifics(s) for s in s1]
        parsed_2 = [parse_item_specifics(s) for s in s2]
        v1 = [" ".join(p.values()) for p in parsed_1]
        v2 = [" ".join(p.values()) for p in parsed_2]
        # one vectorizer call for the four texts of every row; rows are L2-normalised
        m = self.vectorizer_.transform(t1 + v1 + t2 + v2)
        mt1, mv1, mt2, mv2 = (m[i * n : (i + 1) * n] for i in range(4))
        title_cosine = np.asarray(mt1.multiply(mt2).sum(axis=1)).reshape(-1)
        specifics_cosine = np.asarray(mv1.multiply(mv2).sum(axis=1)).reshape(-1)

        out = np.empty((n, len(FEATURE_NAMES)), dtype=np.float64)
        out[:, 0] = title_cosine
        out[:, 1] = specifics_cosine
        for i, (a, b, pa, pb) in enumerate(zip(t1, t2, parsed_1, parsed_2)):
            la, lb = a.lower(), b.lower()
            out[i, 2] = _jaccard(set(_TOKEN.findall(la)), set(_TOKEN.findall(lb)))
            out[i, 3:8] = _specifics_features(pa, pb)
            out[i, 8] = _jaccard(set(_NUMBER.findall(a)), set(_NUMBER.findall(b)))
            out[i, 9] = abs(len(a) - len(b)) / max(len(a), len(b), 1)
        return out
