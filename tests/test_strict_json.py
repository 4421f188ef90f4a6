"""Strict JSON: what every file read back goes through (depth bound, duplicate keys, NaN) and how it is written."""

import json
import math

import pytest

from farms_lightning.files.strict_json import dumps, loads, nesting_depth


@pytest.mark.parametrize("text", ['{"a": [1, {"b": "]]]}}[[\\\\"}]}', '["[[[", {"k": "\\"{{"}]', "[]", "1", '"["'])
def test_nesting_depth_equals_the_parsers_nesting(text):
    def depth(value):
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        return 0

    assert nesting_depth(text) == depth(json.loads(text))


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 1000 + "]" * 1000, "nests 1000 levels deep"),
    ('{"a": 1, "a": 2}', "holds the key 'a' twice"),
    ("[NaN]", "holds NaN"),
    ("[-Infinity]", "holds -Infinity"),
    ("\ufeff[]", "byte-order mark"),
    ("[1,", "is not valid JSON"),
    (b"\xff[]", "is not UTF-8"),
])
def test_loads_refuses_with_one_line_naming_what_was_read(text, message):
    with pytest.raises(ValueError, match=message) as error:
        loads(text, "cache entry x.json")
    assert str(error.value).startswith("cache entry x.json") and "\n" not in str(error.value)


def test_loads_accepts_nan_of_earlier_files_only_when_asked():
    assert math.isnan(loads("[NaN]", allow_nan=True)[0])
    assert loads('{"a": [1, 2.5, null, "x"]}') == {"a": [1, 2.5, None, "x"]}


def test_dumps_is_standard_json_with_null_for_non_finite_numbers():
    text = dumps({"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, 3)})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {
        "a": None, "b": [1.0, None, {"c": None}], "d": [2, 3]}
    with pytest.raises(TypeError):
        dumps({"dtype": object()})
