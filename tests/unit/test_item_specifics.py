"""``parse_item_specifics``: the seed demo's item-specifics text -> key/value pairs,
and the featurizer on the demo's records."""

from __future__ import annotations

import numpy as np
import pytest

from models.listings import DEMO_RECORDS, listing_pairs
from runtimes.scikit.transformers import COLUMNS, FEATURE_NAMES, ListingPairFeatures, parse_item_specifics

IPHONE = (
    "'Brand': ' Apple'; 'Style': ' Bar'; 'Processor': ' Dual Core'; 'Camera Resolution': ' 8.0MP'; "
    "'Color': ' Silver'; 'Lock Status': ' Network Locked'; 'Network': ' Verizon'; 'Model': ' iPhone 5'; "
    "'Storage Capacity': ' 32GB'; 'Cosmetic condition': ' Excellent'; 'Screen Size': ' 4''; "
    "'No accessories': ' Yes'; 'UPC': ' 492550400162'"
)
VACUUM = (
    "'Brand': ' Unbranded'; 'EAN': ' 4894462250013'; 'MPN': ' Does not apply'; "
    "'ISBN': ' 4894462250013'; 'UPC': ' 4894462250013'; 'Designer/Brand': ' Unbranded'"
)


def test_the_published_iphone_record():
    parsed = parse_item_specifics(IPHONE)
    assert list(parsed.items()) == [
        ("Brand", "Apple"),
        ("Style", "Bar"),
        ("Processor", "Dual Core"),
        ("Camera Resolution", "8.0MP"),
        ("Color", "Silver"),
        ("Lock Status", "Network Locked"),
        ("Network", "Verizon"),
        ("Model", "iPhone 5"),
        ("Storage Capacity", "32GB"),
        ("Cosmetic condition", "Excellent"),
        ("Screen Size", "4'"),
        ("No accessories", "Yes"),
        ("UPC", "492550400162"),
    ]
    assert parse_item_specifics(DEMO_RECORDS[0]["ItemSpecifics1"]) == parsed


def test_the_published_vacuum_record():
    assert parse_item_specifics(VACUUM) == {
        "Brand": "Unbranded",
        "EAN": "4894462250013",
        "MPN": "Does not apply",
        "ISBN": "4894462250013",
        "UPC": "4894462250013",
        "Designer/Brand": "Unbranded",
    }


@pytest.mark.parametrize("text", ["", "   ", None, ";", "; ;", "no specifics here", "''", "'''", "';'"])
def test_empty_or_unreadable_text_gives_no_pairs(text):
    assert parse_item_specifics(text) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # quotes inside values, at the end and in the middle
        ("'Screen Size': ' 4''; 'Size': ' 5' 2\"'", {"Screen Size": "4'", "Size": "5' 2\""}),
        ("'Name': ' Men's Watch'", {"Name": "Men's Watch"}),
        ("'Men's Size': ' 10'", {"Men's Size": "10"}),
        # ";" inside a value is not a separator unless a quoted key follows it
        ("'Features': ' Wi-Fi; Bluetooth'; 'Color': ' Red'", {"Features": "Wi-Fi; Bluetooth", "Color": "Red"}),
        ("'Ratio': ' 16:9'", {"Ratio": "16:9"}),
        # extra or missing spaces, values without quotes, empty values
        ("  'Brand' :'Apple' ;   'Model':   '  iPhone 5  '  ", {"Brand": "Apple", "Model": "iPhone 5"}),
        ("'Brand': Apple; 'Model': iPhone 5", {"Brand": "Apple", "Model": "iPhone 5"}),
        ("'Brand': ''; 'Model': ' '", {"Brand": "", "Model": ""}),
        # a repeated key keeps its first value; a quoted empty key is skipped
        ("'Brand': ' Apple'; 'Brand': ' Samsung'", {"Brand": "Apple"}),
        ("'': ' x'; 'Brand': ' Apple'", {"Brand": "Apple"}),
        # unquoted text, best effort
        ("Brand: Apple; Model: iPhone 5", {"Brand": "Apple", "Model": "iPhone 5"}),
        (b"'Brand': ' Apple'", {"Brand": "Apple"}),
    ],
)
def test_awkward_text(text, expected):
    assert parse_item_specifics(text) == expected


@pytest.mark.parametrize("text", ["'Brand", "'Brand':", "Brand: 'Apple", ":::", "'a': 'b': 'c'", "\x00'\n';:", 12, 3.5])
def test_malformed_text_never_raises(text):
    parsed = parse_item_specifics(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())


def test_synthetic_listings_parse_into_their_specifics():
    pairs, _ = listing_pairs(n=200, seed=5)
    for title_1, specifics_1, _, _ in pairs:
        parsed = parse_item_specifics(specifics_1)
        assert len(parsed) == (specifics_1.count("'; '") + 1 if specifics_1 else 0)
        assert all(v and v == v.strip() for v in parsed.values())


@pytest.fixture(scope="module")
def featurizer():
    pairs, _ = listing_pairs(n=400)
    return ListingPairFeatures().fit(pairs)


def test_demo_records_features(featurizer):
    X = np.array([[r[c] for c in COLUMNS] for r in DEMO_RECORDS], dtype=object)
    features = dict(zip(FEATURE_NAMES, featurizer.transform(X).T))
    different, same = 0, 1
    assert features["code_agreement"][different] == -1.0  # the UPCs differ
    assert features["value_agreement"][different] == 0.0  # Brand: Apple vs Unbranded (a placeholder, left out) -> UPC only
    assert features["number_agreement"][different] == 0.0
    for name in ("title_cosine", "specifics_cosine", "title_jaccard", "key_jaccard", "value_agreement", "code_agreement", "number_agreement"):
        assert features[name][same] == pytest.approx(1.0), name
    assert features["value_conflicts"][same] == 0.0 and features["length_gap"][same] == 0.0


def test_featurizer_shape_and_column_order(featurizer):
    X = np.array([[r[c] for c in COLUMNS] for r in DEMO_RECORDS], dtype=object)
    out = featurizer.transform(X)
    assert out.shape == (2, len(FEATURE_NAMES)) and out.dtype == np.float64
    swapped = featurizer.transform(X[:, [2, 3, 0, 1]])
    np.testing.assert_allclose(out, swapped, atol=1e-12)  # symmetric in the two listings
    assert featurizer.transform(X[:0]).shape == (0, len(FEATURE_NAMES))
    with pytest.raises(ValueError):
        featurizer.transform(X[:, :3])
