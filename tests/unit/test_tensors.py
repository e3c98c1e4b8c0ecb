"""sluice.tensors: NumPy <-> OIP v2 wire tensors <-> JSON records, on real tritonclient messages."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from sluice.tensors import (
    DATATYPE_TO_DTYPE,
    TensorError,
    TensorSpec,
    arrays_to_records,
    datatype_of,
    decode_bytes,
    encode_bytes,
    fill_response,
    from_contents,
    from_raw,
    raw_outputs,
    records_to_arrays,
    request_inputs,
    response_outputs,
    to_raw,
)

NUMERIC = sorted(k for k in DATATYPE_TO_DTYPE if k != "BYTES")


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values that use the datatype's range: its extremes where it has them."""
    dtype = DATATYPE_TO_DTYPE[datatype]
    n = int(np.prod(shape))
    if datatype == "BOOL":
        values = np.arange(n) % 2 == 0
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = (np.arange(n) * 37 % 100).astype(dtype)
        values[0], values[-1] = info.min, info.max
    else:
        values = (np.arange(n) - n / 2) * 0.25
    return np.asarray(values, dtype=dtype).reshape(shape)


def _len_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# --- numeric raw round trips ----------------------------------------------------------


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("shape", [(2, 3), (5,), (), (0, 4), (1, 2, 2)])
def test_raw_round_trip_every_numeric_datatype(datatype: str, shape: tuple[int, ...]) -> None:
    array = _sample(datatype, shape) if np.prod(shape) else np.zeros(shape, DATATYPE_TO_DTYPE[datatype])
    got_type, raw = to_raw(array)
    assert got_type == datatype
    assert len(raw) == array.size * array.dtype.itemsize
    back = from_raw(raw, datatype, list(shape))
    assert back.dtype == DATATYPE_TO_DTYPE[datatype]
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_raw_is_little_endian_even_from_big_endian_arrays() -> None:
    assert to_raw(np.array([1, 258], dtype=np.int32)) == ("INT32", b"\x01\x00\x00\x00\x02\x01\x00\x00")
    big = np.array([1.5, -2.0], dtype=">f4")
    datatype, raw = to_raw(big)
    assert datatype == "FP32"
    assert raw == np.array([1.5, -2.0], dtype="<f4").tobytes()


def test_to_raw_converts_to_the_requested_datatype() -> None:
    datatype, raw = to_raw(np.array([[1.0, 2.0]], dtype=np.float64), "FP32")
    assert datatype == "FP32" and len(raw) == 8
    np.testing.assert_array_equal(from_raw(raw, "FP32", [1, 2]), [[1.0, 2.0]])


def test_to_raw_of_a_non_contiguous_view() -> None:
    array = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]
    _, raw = to_raw(array)
    np.testing.assert_array_equal(from_raw(raw, "INT64", [3, 2]), array)


def test_datatype_of() -> None:
    assert datatype_of(np.zeros(1, np.float64)) == "FP64"
    assert datatype_of(np.zeros(1, np.bool_)) == "BOOL"
    assert datatype_of(np.array(["a"])) == "BYTES"
    assert datatype_of(np.array([b"a"])) == "BYTES"
    assert datatype_of(np.array([1, "x"], dtype=object)) == "BYTES"
    with pytest.raises(TensorError, match="complex128 has no OIP datatype"):
        datatype_of(np.zeros(1, np.complex128))


def test_from_raw_size_mismatch_says_what_it_needs() -> None:
    with pytest.raises(TensorError, match=r"FP32 tensor of shape \[2, 3\] needs 24 bytes, got 20"):
        from_raw(b"\x00" * 20, "FP32", [2, 3])
    with pytest.raises(TensorError, match=r"needs 8 bytes, got 16"):
        from_raw(b"\x00" * 16, "INT64", [])
    with pytest.raises(TensorError, match=r"needs 0 bytes, got 1"):
        from_raw(b"\x00", "UINT8", [0])


def test_from_raw_unknown_datatype_and_negative_shape() -> None:
    with pytest.raises(TensorError, match="unknown datatype 'FP128'"):
        from_raw(b"", "FP128", [0])
    for datatype in ("FP32", "BYTES"):
        with pytest.raises(TensorError, match="negative dimension"):
            from_raw(b"\x00" * 8, datatype, [-1, 2])


def test_from_raw_is_a_read_only_zero_copy_view() -> None:
    raw = np.arange(4, dtype="<f4").tobytes()
    array = from_raw(raw, "FP32", [4])
    assert not array.flags.writeable
    assert array.base is not None


# --- BYTES --------------------------------------------------------------------------


def test_encode_bytes_is_tritons_length_prefixed_layout() -> None:
    array = np.array([b"ab", b"", "é"], dtype=object)
    assert encode_bytes(array) == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"


@pytest.mark.parametrize(
    "values, shape",
    [
        (["", "", ""], (3,)),
        (["héllo", "日本語", "🙂", ""], (2, 2)),
        ([f"s{i}" * i for i in range(8)], (2, 2, 2)),
        (["only"], ()),
        ([], (0, 3)),
    ],
)
def test_bytes_round_trip(values: list[str], shape: tuple[int, ...]) -> None:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    array = array.reshape(shape)
    datatype, raw = to_raw(array)
    assert datatype == "BYTES"
    back = from_raw(raw, "BYTES", list(shape))
    assert back.shape == shape and back.dtype == object
    assert [b.decode() for b in back.reshape(-1)] == values


def test_bytes_from_numpy_string_arrays_and_other_values() -> None:
    _, raw = to_raw(np.array([["a", "bc"], ["", "d"]]))
    assert decode_bytes(raw, [2, 2]).tolist() == [[b"a", b"bc"], [b"", b"d"]]
    _, raw = to_raw(np.array([None, 3, 1.5, b"\xff"], dtype=object))
    assert decode_bytes(raw, [4]).tolist() == [b"", b"3", b"1.5", b"\xff"]


def test_decode_bytes_truncated_prefix() -> None:
    raw = _len_prefixed(b"ab")
    with pytest.raises(TensorError, match="shorter than its shape says"):
        decode_bytes(raw, [2])
    with pytest.raises(TensorError, match="shorter than its shape says"):
        decode_bytes(raw + b"\x01\x00", [2])  # half a length prefix


def test_decode_bytes_element_runs_past_the_end() -> None:
    with pytest.raises(TensorError, match="runs past the end"):
        decode_bytes(struct.pack("<I", 5) + b"abc", [1])
    with pytest.raises(TensorError, match="runs past the end"):
        decode_bytes(struct.pack("<I", 0xFFFFFFFF), [1])


def test_decode_bytes_overlong() -> None:
    with pytest.raises(TensorError, match="longer than its shape says"):
        decode_bytes(_len_prefixed(b"a", b"b"), [1])
    with pytest.raises(TensorError, match="longer than its shape says"):
        decode_bytes(b"x", [0])
    assert decode_bytes(b"", [0]).shape == (0,)


# --- typed contents (what MLServer sends) ----------------------------------------------


@pytest.mark.parametrize(
    "datatype, field, values",
    [
        ("BOOL", "bool_contents", [True, False, True, True]),
        ("UINT8", "uint_contents", [0, 1, 200, 255]),
        ("UINT32", "uint_contents", [0, 1, 2, 4294967295]),
        ("UINT64", "uint64_contents", [0, 1, 2, 2**64 - 1]),
        ("INT8", "int_contents", [-128, 0, 1, 127]),
        ("INT32", "int_contents", [-(2**31), 0, 1, 2**31 - 1]),
        ("INT64", "int64_contents", [-(2**63), 0, 1, 2**63 - 1]),
        ("FP16", "fp32_contents", [0.5, -1.0, 2.0, 0.0]),
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 1e-3]),
        ("FP64", "fp64_contents", [0.1, -1e300, 2.5, 0.0]),
        ("BYTES", "bytes_contents", [b"a", b"", "é".encode(), b"\x00\xff"]),
    ],
)
def test_from_contents_every_typed_field(datatype: str, field: str, values: list) -> None:
    contents = pb.InferTensorContents()
    getattr(contents, field).extend(values)
    array = from_contents(contents, datatype, [2, 2])
    assert array.shape == (2, 2)
    assert array.dtype == DATATYPE_TO_DTYPE[datatype]
    expected = np.empty(4, dtype=object) if datatype == "BYTES" else None
    if expected is not None:
        expected[:] = values
    else:
        expected = np.asarray(values, dtype=DATATYPE_TO_DTYPE[datatype])
    np.testing.assert_array_equal(array.reshape(-1), expected)


def test_from_contents_errors() -> None:
    contents = pb.InferTensorContents(fp32_contents=[1.0, 2.0, 3.0])
    with pytest.raises(TensorError, match=r"3 values do not fill shape \[2, 2\]"):
        from_contents(contents, "FP32", [2, 2])
    with pytest.raises(TensorError, match="unknown datatype 'STRING'"):
        from_contents(contents, "STRING", [3])
    with pytest.raises(TensorError, match="negative dimension"):
        from_contents(contents, "FP32", [-1])
    # the wrong field is empty: no values for the declared datatype
    with pytest.raises(TensorError, match="0 values do not fill"):
        from_contents(contents, "INT64", [3])


def _typed_response() -> pb.ModelInferResponse:
    """An MLServer-style answer: typed contents, no raw_output_contents."""
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    label = response.outputs.add(name="label", datatype="BYTES", shape=[2])
    label.contents.bytes_contents.extend([b"setosa", "versicolor".encode()])
    proba = response.outputs.add(name="proba", datatype="FP32", shape=[2, 3])
    proba.contents.fp32_contents.extend([0.5, 0.25, 0.25, 0.0, 1.0, 0.0])
    idx = response.outputs.add(name="idx", datatype="INT64", shape=[2])
    idx.contents.int64_contents.extend([0, 1])
    return pb.ModelInferResponse.FromString(response.SerializeToString())


def test_response_outputs_from_typed_contents() -> None:
    arrays = response_outputs(_typed_response())
    assert list(arrays) == ["label", "proba", "idx"]
    assert arrays["label"].tolist() == [b"setosa", b"versicolor"]
    np.testing.assert_allclose(arrays["proba"], [[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    assert arrays["proba"].dtype == np.float32
    assert arrays["idx"].dtype == np.int64 and arrays["idx"].tolist() == [0, 1]


def test_raw_outputs_converts_typed_contents_to_raw() -> None:
    out = raw_outputs(_typed_response())
    assert out["label"] == ("BYTES", [2], _len_prefixed(b"setosa", b"versicolor"))
    assert out["proba"][:2] == ("FP32", [2, 3])
    assert out["proba"][2] == np.array([0.5, 0.25, 0.25, 0.0, 1.0, 0.0], "<f4").tobytes()
    assert out["idx"] == ("INT64", [2], np.array([0, 1], "<i8").tobytes())


def test_raw_outputs_passes_raw_bytes_through_unchanged() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="a", datatype="FP32", shape=[2])
    response.outputs.add(name="s", datatype="BYTES", shape=[1])
    blob_a = b"\x00\x00\x80?\x00\x00\x00@"
    blob_s = _len_prefixed(b"xyz")
    response.raw_output_contents.extend([blob_a, blob_s])
    assert raw_outputs(response) == {"a": ("FP32", [2], blob_a), "s": ("BYTES", [1], blob_s)}


def test_raw_count_must_match_outputs() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="a", datatype="FP32", shape=[1])
    response.outputs.add(name="b", datatype="FP32", shape=[1])
    response.raw_output_contents.append(b"\x00" * 4)
    for decode in (response_outputs, raw_outputs):
        with pytest.raises(TensorError, match="one entry per output"):
            decode(response)
    request = pb.ModelInferRequest()
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.raw_input_contents.extend([b"\x00" * 4, b"\x00" * 4])
    with pytest.raises(TensorError, match="one entry per input"):
        request_inputs(request)


def test_request_inputs_raw_and_typed() -> None:
    raw_request = pb.ModelInferRequest(model_name="m")
    raw_request.inputs.add(name="x", datatype="FP64", shape=[1, 2])
    raw_request.inputs.add(name="s", datatype="BYTES", shape=[1])
    raw_request.raw_input_contents.extend([np.array([1.0, 2.0]).tobytes(), _len_prefixed("ü".encode())])
    arrays = request_inputs(pb.ModelInferRequest.FromString(raw_request.SerializeToString()))
    np.testing.assert_array_equal(arrays["x"], [[1.0, 2.0]])
    assert arrays["s"].tolist() == ["ü".encode()]

    typed = pb.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="x", datatype="INT32", shape=[3])
    tensor.contents.int_contents.extend([1, -2, 3])
    arrays = request_inputs(typed)
    assert arrays["x"].dtype == np.int32 and arrays["x"].tolist() == [1, -2, 3]


def test_fill_response_round_trip_over_the_wire() -> None:
    outputs = {
        "proba": np.array([[0.1, 0.9], [0.7, 0.3]], dtype=np.float64),
        "label": np.array(["yes", "nö"], dtype=object),
        "flag": np.array([True, False]),
    }
    specs = {"proba": TensorSpec("proba", "FP32", (-1, 2))}
    response = fill_response(pb.ModelInferResponse(model_name="m"), outputs, specs)
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("proba", "FP32", [2, 2]),
        ("label", "BYTES", [2]),
        ("flag", "BOOL", [2]),
    ]
    assert len(response.raw_output_contents) == 3
    assert len(response.raw_output_contents[0]) == 16  # FP32 per the spec, not the array's FP64
    back = response_outputs(pb.ModelInferResponse.FromString(response.SerializeToString()))
    np.testing.assert_allclose(back["proba"], outputs["proba"], rtol=1e-6)
    assert back["proba"].dtype == np.float32
    assert back["label"].tolist() == [b"yes", "nö".encode()]
    assert back["flag"].tolist() == [True, False]


def test_fill_response_appends_to_existing_outputs() -> None:
    response = pb.ModelInferResponse()
    fill_response(response, {"a": np.zeros(1, np.int8)})
    fill_response(response, {"b": np.ones(2, np.uint16)})
    assert [t.name for t in response.outputs] == ["a", "b"]
    assert response_outputs(response)["b"].tolist() == [1, 1]


# --- JSON records -> arrays -----------------------------------------------------------

X = TensorSpec("x", "FP32", (-1,))
FEATURES = TensorSpec("features", "FP64", (-1, 3))
NAME = TensorSpec("name", "BYTES", (-1,))


def test_records_to_arrays_typed_columns() -> None:
    records = [
        {"x": 1, "features": [1, 2, 3], "name": "a", "ignored": {"nested": True}},
        {"x": 2.5, "features": [4.0, 5, 6], "name": "ü", "ignored": None},
    ]
    arrays = records_to_arrays(records, [X, FEATURES, NAME])
    assert list(arrays) == ["x", "features", "name"]
    assert arrays["x"].dtype == np.float32 and arrays["x"].tolist() == [1.0, 2.5]
    assert arrays["features"].shape == (2, 3) and arrays["features"].dtype == np.float64
    assert arrays["name"].dtype == object and arrays["name"].tolist() == [b"a", "ü".encode()]


def test_records_to_arrays_bytes_column_stringifies_scalars() -> None:
    arrays = records_to_arrays([{"name": 1}, {"name": None}, {"name": True}], [NAME])
    assert arrays["name"].tolist() == [b"1", b"", b"True"]


def test_records_to_arrays_empty() -> None:
    with pytest.raises(TensorError, match="no records"):
        records_to_arrays([], [X])


def test_records_to_arrays_missing_field_is_named() -> None:
    with pytest.raises(TensorError, match="field 'x' is missing from a record"):
        records_to_arrays([{"x": 1}, {"y": 2}], [X])


def test_records_to_arrays_record_not_an_object() -> None:
    with pytest.raises(TensorError, match="each record must be a JSON object"):
        records_to_arrays([[1, 2]], [X])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "column",
    [
        ["1.5"],
        [1.0, "2.0"],  # a string after the first record too
        [1.0, 2.0, b"3"],
    ],
)
def test_records_to_arrays_refuses_numeric_strings(column: list) -> None:
    with pytest.raises(TensorError, match="field 'x' must hold FP32 values, got strings"):
        records_to_arrays([{"x": v} for v in column], [X])


def test_records_to_arrays_refuses_strings_inside_list_columns() -> None:
    with pytest.raises(TensorError, match="field 'features' must hold FP64 values, got strings"):
        records_to_arrays([{"features": [1, 2, 3]}, {"features": [1, "2", 3]}], [FEATURES])


@pytest.mark.parametrize("value", ["abc", {"a": 1}, [1, 2]])
def test_records_to_arrays_wrong_type(value: object) -> None:
    with pytest.raises(TensorError, match=r"field 'x' must (hold FP32 values|have shape \[-1\], got rank 2)"):
        records_to_arrays([{"x": 1.0}, {"x": value}], [X])


@pytest.mark.parametrize(
    "spec, value",
    [
        (TensorSpec("x", "UINT8", (-1,)), 300),
        (TensorSpec("x", "UINT32", (-1,)), -1),
        (TensorSpec("x", "INT64", (-1,)), 2**70),
        (TensorSpec("x", "INT32", (-1,)), None),
    ],
)
def test_records_to_arrays_out_of_range_or_null_integers(spec: TensorSpec, value: object) -> None:
    with pytest.raises(TensorError, match=f"field 'x' must hold {spec.datatype} values"):
        records_to_arrays([{"x": value}], [spec])


def test_records_to_arrays_bytes_column_refuses_containers() -> None:
    with pytest.raises(TensorError, match="field 'name' must be a string, got list"):
        records_to_arrays([{"name": "ok"}, {"name": ["a"]}], [NAME])
    with pytest.raises(TensorError, match="field 'name' must be a string, got dict"):
        records_to_arrays([{"name": {}}], [NAME])


def test_records_to_arrays_list_column_wrong_length() -> None:
    with pytest.raises(TensorError, match=r"field 'features' must have shape \[-1, 3\], got \[2, 2\]"):
        records_to_arrays([{"features": [1, 2]}, {"features": [3, 4]}], [FEATURES])


def test_records_to_arrays_list_column_ragged() -> None:
    with pytest.raises(TensorError, match="field 'features' must hold FP64 values"):
        records_to_arrays([{"features": [1, 2, 3]}, {"features": [1, 2]}], [FEATURES])


def test_records_to_arrays_rank_mismatch() -> None:
    with pytest.raises(TensorError, match=r"field 'features' must have shape \[-1, 3\], got rank 1"):
        records_to_arrays([{"features": 1.0}], [FEATURES])
    with pytest.raises(TensorError, match=r"field 'x' must have shape \[-1\], got rank 2"):
        records_to_arrays([{"x": [1.0]}], [X])


def test_records_to_arrays_variable_inner_dimension() -> None:
    spec = TensorSpec("v", "INT64", (-1, -1))
    arrays = records_to_arrays([{"v": [1, 2, 3, 4]}, {"v": [5, 6, 7, 8]}], [spec])
    assert arrays["v"].shape == (2, 4)


def test_tensor_spec_from_dict() -> None:
    spec = TensorSpec.from_dict({"name": "x", "datatype": "fp32", "shape": ["-1", 4]})
    assert spec == TensorSpec("x", "FP32", (-1, 4))
    assert spec.as_dict() == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    with pytest.raises(TensorError, match="unknown datatype 'FLOAT' for tensor 'x'"):
        TensorSpec.from_dict({"name": "x", "datatype": "float", "shape": [1]})


# --- arrays -> JSON records -----------------------------------------------------------


def test_arrays_to_records_bytes_become_text() -> None:
    records = arrays_to_records(
        {
            "label": np.array([b"setosa", "virginica".encode()], dtype=object),
            "raw": np.array([b"\xff\xfe", b""], dtype=object),
            "score": np.array([0.5, 0.25], dtype=np.float32),
        }
    )
    assert records == [
        {"label": "setosa", "raw": "fffe", "score": 0.5},  # non-UTF-8 bytes come back as hex
        {"label": "virginica", "raw": "", "score": 0.25},
    ]
    assert type(records[0]["score"]) is float


def test_arrays_to_records_two_dimensional_columns() -> None:
    records = arrays_to_records(
        {
            "proba": np.array([[0.5, 0.5], [1.0, 0.0]]),
            "tokens": np.array([[b"a", b"b"], [b"c", "d".encode()]], dtype=object),
            "idx": np.array([1, 2], dtype=np.int64),
        }
    )
    assert records == [
        {"proba": [0.5, 0.5], "tokens": ["a", "b"], "idx": 1},
        {"proba": [1.0, 0.0], "tokens": ["c", "d"], "idx": 2},
    ]
    assert type(records[0]["idx"]) is int


def test_arrays_to_records_scalar_and_empty() -> None:
    assert arrays_to_records({"n": np.array(3, dtype=np.int32)}) == [{"n": 3}]
    assert arrays_to_records({}) == []
    assert arrays_to_records({"x": np.zeros((0, 2))}) == []


def test_records_arrays_records_round_trip() -> None:
    records = [{"x": 1.5, "name": "é"}, {"x": -2.0, "name": ""}]
    arrays = records_to_arrays(records, [X, NAME])
    wire = {k: from_raw(to_raw(a)[1], to_raw(a)[0], a.shape) for k, a in arrays.items()}
    assert arrays_to_records(wire) == records
