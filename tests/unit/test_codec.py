"""The codec: `loads(dumps(v))` gives back an equal value of the same type for every type it
claims (property-tested with hypothesis), plain JSON stays plain, tagged-looking dicts are
never mistaken for tags, and unknown types raise `CodecError` (an `InvalidArguments`)."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor import InvalidArguments, codec
from conveyor.codec import CodecError


def same(left: Any, right: Any) -> bool:
    """Equal and of the same type, recursively; NaN equals NaN and -0.0 differs from 0.0."""
    if type(left) is not type(right):
        return False
    if isinstance(left, list | tuple):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, dict):
        right_items = {_key(k): v for k, v in right.items()}
        return len(left) == len(right) and all(
            _key(k) in right_items and same(v, right_items[_key(k)]) for k, v in left.items()
        )
    if isinstance(left, set | frozenset):
        return {_key(x) for x in left} == {_key(x) for x in right}
    return _same_scalar(left, right)


def _same_scalar(left: Any, right: Any) -> bool:
    if isinstance(left, float):
        both_nan = math.isnan(left) and math.isnan(right)
        return both_nan or (left == right and math.copysign(1, left) == math.copysign(1, right))
    if isinstance(left, Decimal):
        return str(left) == str(right)  # also tells NaN, sNaN, -0 and trailing zeros apart
    if isinstance(left, datetime):
        # Same wall time and same offset: the same instant, shown the same way. (A zone
        # such as Europe/Paris comes back as its fixed offset at that instant.)
        return bool(
            left.replace(tzinfo=None) == right.replace(tzinfo=None)
            and left.utcoffset() == right.utcoffset()
        )
    return bool(left == right)


def _key(value: Any) -> Any:
    if isinstance(value, tuple):
        return ("tuple", tuple(_key(v) for v in value))
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    if isinstance(value, float) and value == 0:
        return ("float", repr(value))
    return (type(value).__name__, value)


def round_trip(value: Any) -> Any:
    text = codec.dumps(value)
    json.loads(text, parse_constant=_no_constants)  # strict JSON: no NaN/Infinity literals
    return codec.loads(text)


def _no_constants(name: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {name} in encoded text")


# -- strategies ------------------------------------------------------------------

floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1e300, -1e300, 5e-324, 1e16, 0.1, 1.5, float("inf"), float("-inf"), math.nan]
)
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = (
    st.text()
    | st.text(alphabet=st.sampled_from(["\x00", "a", "$", "é", "\n", "\udcff"]))
    | st.text(alphabet=surrogates | st.characters(max_codepoint=0x7F))
)
aware = st.datetimes(timezones=st.timezones())
fixed_offsets = st.builds(
    lambda dt, minutes: dt.replace(tzinfo=timezone(timedelta(minutes=minutes))),
    st.datetimes(),
    st.integers(min_value=-23 * 60, max_value=23 * 60),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    floats,
    texts,
    st.decimals(allow_nan=False),
    st.decimals(allow_nan=True),
    st.datetimes(),
    aware,
    fixed_offsets,
    st.dates(),
    st.times(),
    st.times(timezones=st.just(UTC)),
    st.timedeltas(),
    st.uuids(),
    st.binary(),
)
hashable = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        texts,
        st.decimals(allow_nan=False),
        st.dates(),
        st.datetimes(),
        st.uuids(),
        st.binary(max_size=8),
        st.floats(allow_nan=False),
    ),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=4,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(texts, inner, max_size=4),
        st.dictionaries(st.sampled_from(["$decimal", "$x", "$", "a", "$dict"]), inner),
        st.dictionaries(hashable, inner, max_size=4),
        st.sets(hashable, max_size=4),
        st.frozensets(hashable, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(values)
def test_every_supported_value_round_trips_with_its_type(value: Any) -> None:
    assert same(value, round_trip(value)), (value, codec.dumps(value))


# -- the promised special cases ------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        Decimal("1.10"),
        Decimal("-0"),
        Decimal("1E+2"),
        Decimal("sNaN"),
        datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 0),
        datetime(1, 1, 1),
        date(2026, 2, 28),
        time(23, 59, 59, 999999),
        timedelta(days=-3, seconds=5, microseconds=7),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        b"\x00\xffbytes",
        (1, (2, "3"), []),
        {1, 2, 3},
        {1: "int key", "1": "str key", None: "none", (1, 2): "tuple"},
        {"$decimal": "not a tag"},
        {"$dict": [[1, 2]]},
        {"$": 1},
        "nul\x00inside\x00",
        "\x00",
        float("inf"),
        float("-inf"),
        -0.0,
        1e300,
        -1e-300,
        5e-324,
        2**100,
        -(2**64),
    ],
    ids=repr,
)
def test_documented_special_values_round_trip(value: Any) -> None:
    assert same(value, round_trip(value))


def test_nan_round_trips_as_nan() -> None:
    assert math.isnan(round_trip(float("nan")))


def test_plain_json_values_stay_plain() -> None:
    value = {"count": 3, "names": ["a", "b"], "ok": True, "ratio": 0.5, "none": None}
    assert json.loads(codec.dumps(value)) == value


def test_tags_are_one_key_dollar_objects() -> None:
    assert codec.encode(Decimal("1.10")) == {"$decimal": "1.10"}
    assert codec.encode((1, 2)) == {"$tuple": [1, 2]}
    assert codec.encode({"$x": 1}) == {"$dict": [["$x", 1]]}
    assert codec.encode("a\x00b") == {"$str": ["a", "b"]}
    assert codec.encode(-0.0) == {"$float": "-0.0"}
    assert codec.encode(1e300) == {"$float": "1e+300"}


def test_bytearray_and_memoryview_decode_as_equal_bytes() -> None:
    assert round_trip(bytearray(b"ab")) == b"ab"
    assert round_trip(memoryview(b"ab")) == b"ab"


def test_frozensets_round_trip_as_hashable_values() -> None:
    """A frozenset is encoded (`$set`), so it must come back usable where it was:
    as a dict key or a set member. Decoding it as a mutable `set` breaks both."""
    assert round_trip(frozenset({1, 2})) == frozenset({1, 2})
    assert round_trip({frozenset({1}): "x"}) == {frozenset({1}): "x"}
    assert round_trip({frozenset({1}), frozenset({2})}) == {frozenset({1}), frozenset({2})}


def test_unknown_types_raise_codec_error() -> None:
    with pytest.raises(CodecError):
        codec.dumps(object())
    with pytest.raises(CodecError):
        codec.dumps({"nested": [complex(1, 2)]})
    assert issubclass(CodecError, InvalidArguments)


def test_unknown_tag_raises_codec_error() -> None:
    with pytest.raises(CodecError, match="unknown codec tag"):
        codec.loads('{"$nope": 1}')


def test_decode_of_parsed_json_equals_loads_of_text() -> None:
    value = {"when": date(2026, 1, 1), "amount": Decimal("9.99"), "t": (1,)}
    text = codec.dumps(value)
    assert codec.decode(json.loads(text)) == codec.loads(text) == value
