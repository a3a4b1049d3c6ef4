"""JSON that strict parsers accept: non-finite floats (NaN, inf) are written as null.

Python's json module writes bare ``NaN``/``Infinity`` by default, which JavaScript, jq and most
other parsers reject; every JSON file dsforget writes goes through `dumps`."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float inside dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` with non-finite floats as null (and an error if one slips through)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
