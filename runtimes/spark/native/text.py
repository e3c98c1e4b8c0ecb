"""Text transformers: tokenizers, stop words, term frequencies (HashingTF, CountVectorizer), IDF.

Spark's tokenizers use Java regular expressions; the ones reproduced here are those
Python's ``re`` reads the same way with ``re.ASCII`` (Java's ``\\s``, ``\\w``, ``\\d``
are ASCII by default). Patterns with Java-only syntax raise ``UnsupportedStage``.
Token lengths count UTF-16 code units, as Java's ``String.length`` does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from runtimes.spark.native.base import (
    STRING,
    STRINGS,
    ColumnType,
    Frame,
    InvalidInput,
    Stage,
    StageMeta,
    UnaryStage,
    in_out_columns,
    unsupported,
    vector,
)
from runtimes.spark.native.murmur3 import hash_terms
from runtimes.spark.native.numeric import VectorMap
from runtimes.spark.native.persist import read_data_row, require_spark3, to_vector
from runtimes.spark.native.registry import register

_FEATURE = "org.apache.spark.ml.feature."
_JAVA_WHITESPACE = re.compile(r"[ \t\n\x0b\f\r]")  # Java's \s
# Java syntax that Python's re accepts but reads differently
_JAVA_ONLY = ("&&", r"\Z", r"\z", r"\G")


def java_split(pattern: re.Pattern[str], text: str) -> list[str]:
    """``String.split(regex)``: no leading empty piece for a zero-width match, trailing empties dropped."""
    pieces, index = [], 0
    for m in pattern.finditer(text):
        if index == 0 and m.start() == 0 and m.end() == 0:
            continue
        pieces.append(text[index : m.start()])
        index = m.end()
    if index == 0:
        return [text]  # no match: the input itself, even when empty
    pieces.append(text[index:])
    while pieces and not pieces[-1]:
        pieces.pop()
    return pieces


def java_length(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-16-le")) // 2


def _text(value: object, meta: StageMeta) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{meta.short_name} needs strings, got {type(value).__name__}")
    return value


class _TokenizerBase(UnaryStage):
    def input_type(self, column: str) -> ColumnType:
        return STRING

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        return {self.out: STRINGS}

    def transform(self, frame: Frame) -> None:
        out = np.empty(frame.n, dtype=object)
        out[:] = [self.tokens(_text(s, self.meta)) for s in frame.strings(self.inp)]
        frame[self.out] = out

    def tokens(self, text: str) -> list[str]:
        raise NotImplementedError


@register(_FEATURE + "Tokenizer")
class Tokenizer(_TokenizerBase):
    def tokens(self, text: str) -> list[str]:
        return java_split(_JAVA_WHITESPACE, text.lower())


@register(_FEATURE + "RegexTokenizer")
class RegexTokenizer(_TokenizerBase):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        source = meta.get("pattern", r"\s+")
        if any(token in source for token in _JAVA_ONLY):
            raise unsupported(meta, f"pattern {source!r} uses Java-only regex syntax")
        try:
            self.pattern = re.compile(source, re.ASCII)
        except re.error as exc:
            raise unsupported(meta, f"pattern {source!r} is not portable to Python: {exc}") from None
        self.gaps = bool(meta.get("gaps", True))
        self.min_length = int(meta.get("minTokenLength", 1))
        self.lower = bool(meta.get("toLowercase", True))

    def tokens(self, text: str) -> list[str]:
        if self.lower:
            text = text.lower()
        found = java_split(self.pattern, text) if self.gaps else [m.group(0) for m in self.pattern.finditer(text)]
        return [t for t in found if java_length(t) >= self.min_length]


@register(_FEATURE + "StopWordsRemover")
class StopWordsRemover(Stage):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        self.pairs = in_out_columns(meta)
        self.reads = [i for i, _ in self.pairs]
        self.case_sensitive = bool(meta.get("caseSensitive", False))
        locale = str(meta.get("locale", "en")).replace("_", "-").split("-")[0].lower()
        if not self.case_sensitive and locale in ("tr", "az", "lt"):
            raise unsupported(meta, f"locale {locale!r} lower-cases differently from Python")
        words = meta.get("stopWords", [])
        self.stop = frozenset(words if self.case_sensitive else (w.lower() for w in words))

    def input_type(self, column: str) -> ColumnType:
        return STRINGS

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        return {o: STRINGS for _, o in self.pairs}

    def transform(self, frame: Frame) -> None:
        stop = self.stop
        for inp, out in self.pairs:
            result = np.empty(frame.n, dtype=object)
            if self.case_sensitive:
                result[:] = [[t for t in terms if t not in stop] for terms in frame.string_lists(inp)]
            else:
                result[:] = [
                    [t for t in terms if (t.lower() if t is not None else t) not in stop]
                    for terms in frame.string_lists(inp)
                ]
            frame[out] = result


class _TermFrequency(UnaryStage):
    """array<string> -> term-count vector."""

    width = 0

    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        self.binary = bool(meta.get("binary", False))

    def input_type(self, column: str) -> ColumnType:
        return STRINGS

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        return {self.out: vector(self.width)}

    @staticmethod
    def flatten(docs: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All terms of the batch, the row each came from, and each row's token count."""
        counts = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        terms = [t for doc in docs for t in doc]
        return terms, np.repeat(np.arange(len(docs)), counts), counts


@register(_FEATURE + "HashingTF")
class HashingTF(_TermFrequency):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)  # Spark 2 used a different hash
        self.width = int(meta.get("numFeatures", 1 << 18))

    def transform(self, frame: Frame) -> None:
        terms, rows, _ = self.flatten(frame.string_lists(self.inp))
        out = np.zeros((frame.n, self.width), dtype=np.float64)
        if terms:
            idx = np.mod(hash_terms(terms).astype(np.int64), self.width)
            if self.binary:
                out[rows, idx] = 1.0
            else:
                np.add.at(out, (rows, idx), 1.0)
        frame[self.out] = out


@register(_FEATURE + "CountVectorizerModel")
class CountVectorizer(_TermFrequency):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        vocabulary = read_data_row(meta)["vocabulary"]
        self.vocab = {term: i for i, term in enumerate(vocabulary)}
        self.width = len(vocabulary)
        self.min_tf = float(meta.get("minTF", 1.0))

    def transform(self, frame: Frame) -> None:
        terms, rows, lengths = self.flatten(frame.string_lists(self.inp))
        counts = np.zeros((frame.n, self.width), dtype=np.float64)
        if terms:
            idx = np.fromiter((self.vocab.get(t, -1) for t in terms), dtype=np.int64, count=len(terms))
            known = idx >= 0
            np.add.at(counts, (rows[known], idx[known]), 1.0)
        # minTF below 1 is a fraction of the document's token count (unknown tokens included)
        floor = self.min_tf if self.min_tf >= 1.0 else (lengths * self.min_tf).reshape(-1, 1)
        kept = (counts > 0) & (counts >= floor)
        frame[self.out] = np.where(kept, 1.0, 0.0) if self.binary else np.where(kept, counts, 0.0)


@register(_FEATURE + "IDFModel")
class IDF(VectorMap):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        self.idf = to_vector(read_data_row(meta)["idf"])
        self.size = len(self.idf)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x * self.idf
