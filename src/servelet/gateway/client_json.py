"""JSON from clients, parsed with an explicit nesting limit.

Python's `json` recurses once per level: a 200 KB body of 100,000 brackets raises RecursionError, which no route
expects and which answered 500. Every route that parses a client's JSON parses it here, and a body nested deeper
than the limit (`SERVELET_MAX_JSON_DEPTH`) is a 400 naming it, in the route's own error shape.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import BadRequest

SETTING = "SERVELET_MAX_JSON_DEPTH"


class TooDeep(BadRequest):
    def __init__(self, max_depth: int):
        super().__init__(f"the JSON nests deeper than {max_depth} levels, the limit ({SETTING})")


def loads(data: bytes | str, max_depth: int) -> Any:
    """`json.loads`, refusing values nested deeper than `max_depth` arrays and objects with TooDeep.

    Invalid JSON raises what `json.loads` raises (ValueError)."""
    try:
        value = json.loads(data)
    except RecursionError:  # deeper than the interpreter goes, so deeper than any limit it allows
        raise TooDeep(max_depth) from None
    if _openings(data) > max_depth and depth(value) > max_depth:
        raise TooDeep(max_depth)
    return value


def _openings(data: bytes | str) -> int:
    """An upper bound of the depth, counted in C: a body with few brackets needs no walk."""
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def depth(value: Any) -> int:
    """How many arrays and objects nest at the deepest point (a scalar: 0); a loop, not recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in node if isinstance(child, (dict, list)))
    return deepest
