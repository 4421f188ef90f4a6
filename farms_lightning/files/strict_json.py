"""JSON read back with limits, and written strictly: what every file the package reads or writes goes through.

Reading (:func:`loads`): the nesting depth is bounded before the parser runs (Python's parser
recurses: about 1,000 levels raise ``RecursionError``), duplicate keys and a byte-order mark are
refused, and the non-standard literals ``NaN``/``Infinity`` are refused unless the caller accepts
them (files written by earlier versions of this package hold bare ``NaN``). Every problem is a
``ValueError`` with one line that says what was read.

Writing (:func:`dumps`): standard JSON only; non-finite floats become ``null``.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

#: Deepest nesting accepted: far beyond any file this package writes (histories nest 4 levels).
MAX_DEPTH = 64
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')  # a JSON string, escapes included
_BRACKETS = re.compile(r"[\[\]{}]")


def loads(data: str | bytes, what: str = "JSON", *, max_depth: int = MAX_DEPTH, allow_nan: bool = False) -> Any:
    """Parse ``data`` strictly; ``what`` names it in errors (e.g. ``"cache entry x.json"``).

    Raises:
        ValueError: not UTF-8, a byte-order mark, invalid JSON, nesting deeper than ``max_depth``,
            a duplicate key, or ``NaN``/``Infinity`` without ``allow_nan``.

    Example::

        >>> loads('{"alpha": 2.1}', "history")
        {'alpha': 2.1}
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{what} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    else:
        text = data
    if text.startswith("\ufeff"):
        raise ValueError(f"{what} starts with a byte-order mark, which JSON does not allow")
    depth = nesting_depth(text)
    if depth > max_depth:
        raise ValueError(f"{what} nests {depth} levels deep (at most {max_depth})")

    def constant(name: str) -> float:
        if not allow_nan:
            raise ValueError(f"{what} holds {name}, which is not JSON (null stands for a missing number)")
        return float(name.replace("Infinity", "inf"))

    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=constant)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    except _DuplicateKey as error:
        raise ValueError(f"{what} holds the key {error.args[0]!r} twice in one object") from None


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text (brackets inside strings do not count).

    Strings are removed by a regular expression and the brackets summed in C (``accumulate``), so a
    100 MB header costs a fraction of a second, not a character loop.
    """
    brackets = _BRACKETS.findall(_STRINGS.sub("", text))
    return max(accumulate(1 if b in "[{" else -1 for b in brackets), default=0)


def dumps(value: Any, *, indent: int | None = None) -> str:
    """Standard JSON: non-finite floats become ``null``; anything else non-JSON raises ``TypeError``."""
    return json.dumps(finite(value), indent=indent, allow_nan=False)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (lists and dicts walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result
