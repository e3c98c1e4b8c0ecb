"""Parity of the text transformers with real Spark: tokenizers, stop words, TF, IDF."""

from __future__ import annotations

import pytest
from pyspark.ml import Pipeline
from pyspark.ml.feature import IDF, CountVectorizer, HashingTF, RegexTokenizer, StopWordsRemover, Tokenizer

pytestmark = pytest.mark.spark

TEXTS = [
    "Hello World hello",
    "",
    "   ",
    " leading and trailing  ",
    "tabs\tand\nnew\x0blines\fhere\r",
    "ÀÉÎ Ünïcode ß İstanbul ΣΑΣ",
    "no\u00a0break space",  # NBSP is not Java's \s
    "HelloWorld CamelCase",
    "😀a b 😀😀 punctuation, commas; and-dashes!",
    "The quick brown fox jumps over the lazy dog and the cat",
]


def test_tokenizers(parity):
    stages = [
        Tokenizer(inputCol="t", outputCol="tok"),
        RegexTokenizer(inputCol="t", outputCol="re_default"),
        RegexTokenizer(inputCol="t", outputCol="re_nonword", pattern="\\W+"),
        RegexTokenizer(inputCol="t", outputCol="re_words", pattern="\\w+", gaps=False),
        RegexTokenizer(inputCol="t", outputCol="re_min3", minTokenLength=3),  # 😀a is 3 UTF-16 units
        RegexTokenizer(inputCol="t", outputCol="re_case", pattern="(?=[A-Z])", toLowercase=False),
        RegexTokenizer(inputCol="t", outputCol="re_empty_tokens", pattern=" ", minTokenLength=0),
    ]
    got = parity.check(stages, [(t,) for t in TEXTS], "t string")
    assert list(got["tok"][1]) == [""] and list(got["tok"][2]) == []


def test_stop_words_remover(parity):
    rows = [(t, ["The", "a", None, "Fox", "THE", "ok"]) for t in TEXTS]
    stages = [
        Tokenizer(inputCol="t", outputCol="tok"),
        StopWordsRemover(inputCol="tok", outputCol="default"),
        StopWordsRemover(inputCol="words", outputCol="case", caseSensitive=True, stopWords=["The", "fox"]),
        StopWordsRemover(inputCols=["tok", "words"], outputCols=["tok_custom", "words_custom"], stopWords=["fox", "OK"]),
    ]
    parity.check(stages, rows, "t string, words array<string>")


def test_hashing_tf(parity):
    words = ["", "a", "ab", "abc", "abcd", "abcde", "héllo", "日本語", "😀", "x" * 37, None, "a"]
    rows = [(t, words[i:] + words[:i]) for i, t in enumerate(TEXTS)]
    stages = [
        Tokenizer(inputCol="t", outputCol="tok"),
        HashingTF(inputCol="tok", outputCol="tf_small", numFeatures=32),
        HashingTF(inputCol="words", outputCol="tf_default"),
        HashingTF(inputCol="words", outputCol="tf_binary", numFeatures=7, binary=True),
    ]
    got = parity.check(stages, rows, "t string, words array<string>")
    assert got["tf_default"].shape == (len(TEXTS), 1 << 18)


def test_count_vectorizer_and_idf(parity):
    rows = [(t,) for t in TEXTS]
    df = parity.frame(rows, "t string")
    tokenizer = Tokenizer(inputCol="t", outputCol="tok")
    stages = Pipeline(
        stages=[
            tokenizer,
            CountVectorizer(inputCol="tok", outputCol="counts", vocabSize=12),
            CountVectorizer(inputCol="tok", outputCol="min_tf", minTF=2.0, minDF=1.0),
            CountVectorizer(inputCol="tok", outputCol="min_tf_fraction", minTF=0.15, binary=True),
            HashingTF(inputCol="tok", outputCol="tf", numFeatures=64),
            IDF(inputCol="tf", outputCol="tfidf", minDocFreq=2),
            IDF(inputCol="counts", outputCol="count_idf"),
        ]
    ).fit(df).stages
    probe = [("unseen words and the the the fox",), ("fox",)]
    parity.check(stages, rows + probe, "t string")
