"""A type-preserving JSON codec for step results, run state and checkpoints.

Plain JSON (and PostgreSQL's jsonb, which re-prints numbers) loses types:
`Decimal`, `datetime`, `date`, `UUID`, `bytes` and tuples do not exist in it,
`1e300` comes back as an integer, `-0.0` as `0.0`, and a string holding NUL or
a lone surrogate cannot be stored at all. `encode` turns a value into JSON that survives a
jsonb round trip; `decode` gives back an equal value of the same type.

Values JSON already holds exactly stay as they are, so encoded data is still
readable in SQL (`data->'count'`). Everything else becomes a one-key object
whose key starts with `$` (`{"$decimal": "1.10"}`); a dict that itself has a
`$` key is wrapped (`{"$dict": [[k, v], ...]}`) so it is never mistaken for one.
"""

from __future__ import annotations

import base64
import json
import json.scanner
import math
import uuid
from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

from conveyor.errors import InvalidArguments

_TAG_PREFIX = "$"


class CodecError(InvalidArguments):
    """A value the codec cannot represent (a type it does not know)."""


def encode(value: Any) -> Any:
    """`value` as JSON-compatible data that `decode` turns back into an equal value."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _encode_str(value)
    if isinstance(value, list):
        return [encode(item) for item in value]
    if isinstance(value, Mapping):
        return _encode_mapping(value)
    # Order matters: a datetime is a date, a bool (above) is an int.
    for kind, encoder in _ENCODERS:
        if isinstance(value, kind):
            return encoder(value)
    raise CodecError(f"cannot encode a value of type {type(value).__name__}: {value!r:.80}")


def _encode_str(value: str) -> Any:
    if "\x00" in value:
        return {"$str": [_encode_str(part) for part in value.split("\x00")]}
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            # Lone surrogates (from surrogateescape'd bytes) are not valid JSON text.
            raw = value.encode("utf-8", "surrogatepass")
            return {"$surrogates": base64.b64encode(raw).decode("ascii")}
    return value


def _encode_datetime(value: datetime) -> Any:
    if isinstance(value.tzinfo, ZoneInfo):
        # Keep the zone itself, not the offset of the moment: wall time, zone and
        # fold rebuild the very same value, even in a DST gap or overlap.
        wall = value.replace(tzinfo=None).isoformat()
        return {"$zoned": [wall, value.tzinfo.key, value.fold]}
    return {"$datetime": value.isoformat()}


def _decode_zoned(payload: list[Any]) -> datetime:
    wall, zone, fold = payload
    return datetime.fromisoformat(wall).replace(tzinfo=ZoneInfo(zone), fold=fold)


def _encode_float(value: float) -> Any:
    text = repr(value)
    # jsonb prints 1e300 as an integer and drops the sign of -0.0; JSON has no
    # inf or nan. Floats that jsonb re-prints exactly stay plain numbers.
    if not math.isfinite(value) or "e" in text or (value == 0 and math.copysign(1, value) < 0):
        return {"$float": text}
    return value


def _encode_mapping(value: Mapping[Any, Any]) -> Any:
    plain = all(
        isinstance(k, str) and _encode_str(k) is k and not k.startswith(_TAG_PREFIX) for k in value
    )
    if plain:
        return {k: encode(v) for k, v in value.items()}
    return {"$dict": [[encode(k), encode(v)] for k, v in value.items()]}


def decode(data: Any) -> Any:
    """The value `encode` was given, from its JSON form (parsed or as text)."""
    if isinstance(data, list):
        return [decode(item) for item in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        ((key, payload),) = data.items()
        if key.startswith(_TAG_PREFIX):
            return _decode_tagged(key, payload)
    return {k: decode(v) for k, v in data.items()}


def _decode_tagged(tag: str, payload: Any) -> Any:
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise CodecError(f"unknown codec tag {tag!r}")
    return decoder(payload)


def _hashable(key: Any) -> Any:
    # A list key cannot come from a dict, but a hand-edited document might hold one.
    return tuple(key) if isinstance(key, list) else key


def _decode_timedelta(payload: list[int]) -> timedelta:
    days, seconds, micros = payload
    return timedelta(days=days, seconds=seconds, microseconds=micros)


_ENCODERS: tuple[tuple[type | tuple[type, ...], Callable[[Any], Any]], ...] = (
    (int, int),
    (float, _encode_float),
    (Decimal, lambda v: {"$decimal": str(v)}),
    (datetime, _encode_datetime),
    (date, lambda v: {"$date": v.isoformat()}),
    (time, lambda v: {"$time": v.isoformat()}),
    (timedelta, lambda v: {"$timedelta": [v.days, v.seconds, v.microseconds]}),
    (uuid.UUID, lambda v: {"$uuid": str(v)}),
    (
        (bytes, bytearray, memoryview),
        lambda v: {"$bytes": base64.b64encode(bytes(v)).decode("ascii")},
    ),
    (tuple, lambda v: {"$tuple": [encode(item) for item in v]}),
    (frozenset, lambda v: {"$frozenset": [encode(item) for item in v]}),
    (set, lambda v: {"$set": [encode(item) for item in v]}),
)

_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$float": float,
    "$str": lambda parts: "\x00".join(decode(part) for part in parts),
    "$surrogates": lambda payload: base64.b64decode(payload).decode("utf-8", "surrogatepass"),
    "$decimal": Decimal,
    "$datetime": datetime.fromisoformat,
    "$zoned": _decode_zoned,
    "$date": date.fromisoformat,
    "$time": time.fromisoformat,
    "$timedelta": _decode_timedelta,
    "$uuid": uuid.UUID,
    "$bytes": base64.b64decode,
    "$tuple": lambda payload: tuple(decode(item) for item in payload),
    "$set": lambda payload: {decode(item) for item in payload},
    "$frozenset": lambda payload: frozenset(decode(item) for item in payload),
    "$dict": lambda payload: {_hashable(decode(k)): decode(v) for k, v in payload},
}


def decode_values(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON object whose *values* were encoded one by one (run state, step results
    by step name): its keys are plain names, even one that starts with `$`."""
    return {name: decode(value) for name, value in (data or {}).items()}


def dumps(value: Any) -> str:
    """`value` encoded, as JSON text."""
    return compact_json(encode(value))


compact_json: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
"""Plain JSON text without spaces; NaN and infinities raise `ValueError`.

One shared encoder: `json.dumps` with options builds a new one per call,
which doubles the cost of encoding a small object (bulk enqueue, results).
"""


def _as_jsonb_prints(text: str) -> float | int:
    # jsonb keeps numbers as numeric and prints them without an exponent, so
    # 1e+16 comes back as the integer 10000000000000000; numeric has no -0.
    if "e+" in text:
        return int(Decimal(text))
    return float(text) or 0.0


# typeshed types make_scanner's argument as a scanner; it takes the decoder.
_scan_jsonb = json.scanner.make_scanner(cast(Any, json.JSONDecoder(parse_float=_as_jsonb_prints)))


def jsonb_loads(text: str) -> Any:
    """The value that JSON text `compact_json` wrote gives once stored as jsonb and read back.

    Lets a bulk enqueue build its jobs' `args` and `meta` from the text it sent,
    equal in value and type to what a worker will read, without returning them.
    Only for text `compact_json` wrote: it is scanned without the checks for
    whitespace and trailing data that `json.loads` makes.
    """
    if text == "{}":
        return {}
    return _scan_jsonb(text, 0)[0]


def loads(text: str | bytes) -> Any:
    """The value `dumps` was given."""
    return decode(json.loads(text))
