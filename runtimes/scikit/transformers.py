"""Custom scikit-learn transformers the scikit runtime can unpickle ("custom scikit").

``ListingPairFeatures`` turns a pair of product listings (title and item specifics
of each) into similarity features for a same-product classifier: TF-IDF cosine of
the titles and of the specifics (character n-grams, robust to spelling variants),
token Jaccard of each, agreement of the numbers in the titles (model numbers and
capacities decide "iPhone 5" vs "iPhone 6"), and the relative length difference.
"""

from __future__ import annotations

import re

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.feature_extraction.text import TfidfVectorizer

COLUMNS = ("title_1", "specifics_1", "title_2", "specifics_2")
FEATURE_NAMES = ("title_cosine", "specifics_cosine", "title_jaccard", "specifics_jaccard", "number_agreement", "length_gap")
_TOKEN = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _tokens(text: str) -> set[str]:
    return set(_TOKEN.findall(text.lower()))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class ListingPairFeatures(BaseEstimator, TransformerMixin):
    """X: object array [n, 4] with columns COLUMNS -> float64 [n, 6] (FEATURE_NAMES)."""

    def __init__(self, ngram_range: tuple[int, int] = (2, 4)):
        self.ngram_range = ngram_range

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=object)
        corpus = [str(v) for v in X.reshape(-1)]
        self.vectorizer_ = TfidfVectorizer(analyzer="char_wb", ngram_range=self.ngram_range, lowercase=True).fit(corpus)
        return self

    def _cosines(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """TF-IDF cosine of the titles and of the specifics; one vectorizer call for all
        four columns (its fixed cost dominates small batches), rows L2-normalised."""
        n = len(X)
        m = self.vectorizer_.transform([str(v) for v in X.T.reshape(-1)])  # column-major: t1, s1, t2, s2
        t1, s1, t2, s2 = (m[i * n : (i + 1) * n] for i in range(4))
        return (
            np.asarray(t1.multiply(t2).sum(axis=1)).reshape(-1),
            np.asarray(s1.multiply(s2).sum(axis=1)).reshape(-1),
        )

    def transform(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=object)
        t1, s1, t2, s2 = (X[:, i] for i in range(4))
        title_cosine, specifics_cosine = self._cosines(X)
        numbers = [
            _jaccard(set(_NUMBER.findall(str(a))), set(_NUMBER.findall(str(b)))) for a, b in zip(t1, t2)
        ]
        gaps = [abs(len(str(a)) - len(str(b))) / max(len(str(a)), len(str(b)), 1) for a, b in zip(t1, t2)]
        return np.column_stack(
            [
                title_cosine,
                specifics_cosine,
                [_jaccard(_tokens(str(a)), _tokens(str(b))) for a, b in zip(t1, t2)],
                [_jaccard(_tokens(str(a)), _tokens(str(b))) for a, b in zip(s1, s2)],
                numbers,
                gaps,
            ]
        ).astype(np.float64)
