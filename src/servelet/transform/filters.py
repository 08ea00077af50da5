"""SageMaker batch transform's `DataProcessing`: InputFilter, JoinSource and OutputFilter, one record at a time.

Jobs written for SageMaker carry these three fields unchanged, so they behave as SageMaker documents them
(https://docs.aws.amazon.com/sagemaker/latest/dg/batch-transform-data-processing.html):

- JSONPath is SageMaker's subset, enforced when the job is created: `$`, `.name`, `['name']`, `['a','b']`,
  `[n]` (negative counts from the end), `[a,b]`, `[start:end]`, `*`, and one index list mixed with one slice as
  the last step (`$[0,5:]`). No `..`, filters, steps or relative paths; at most 63 characters.
- Slices are JSONPath's (end excluded, as in the Jayway library SageMaker points to): `$[1:4]` is items 1, 2, 3.
- A path with only keys and single indexes gives the value itself; `['a','b']` gives an object of those keys;
  anything with a wildcard, an index list or a slice gives an array.
- A key the record lacks, or an index past its end, fails that record (`FilterError` with the path and an
  excerpt), rather than quietly writing less than was asked for.
- JoinSource=Input adds the model's output to a JSON object input under `SageMakerOutput` (replacing a key of that
  name, as SageMaker warns); any other JSON input becomes `{"SageMakerInput": input, "SageMakerOutput": output}`.
  A CSV row gets the output's columns appended.
- CSV rows are arrays of their (string) columns, so only index paths apply to them.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from jsonpath_ng import parse as parse_jsonpath
from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.jsonpath import Child, Fields, Index, JSONPath, Root, Slice, Wildcard

OUTPUT_KEY = "SageMakerOutput"
INPUT_KEY = "SageMakerInput"
MAX_FILTER_CHARS = 63  # CreateTransformJob's length limit on InputFilter and OutputFilter
JOIN_SOURCES = ("None", "Input")
_FIELDS = {"InputFilter": "input_filter", "JoinSource": "join_source", "OutputFilter": "output_filter"}
_JSON_TYPES = frozenset({"application/json", "application/jsonlines", "application/x-jsonlines"})
_CSV_TYPE = "text/csv"
_EXCERPT_CHARS = 80
# `$…[0,5:]`: jsonpath-ng has no mixed index/slice bracket, so the last bracket is split and each part parsed alone.
_MIXED_LAST_BRACKET = re.compile(r"^(?P<prefix>.*)\[(?P<parts>[-\d\s:,]*)\]$", re.DOTALL)


class FilterError(ValueError):
    """An InputFilter/OutputFilter SageMaker would refuse (at job creation) or a record it cannot apply to."""


class _Positions:
    """A last bracket that mixes indexes with one slice (`[0,5:]`): items in the order the parts name them."""

    def __init__(self, parts: list[Index | Slice]):
        self.parts = parts


_Step = Fields | Index | Slice | Wildcard | _Positions


@dataclass(frozen=True)
class _Path:
    """A validated filter: its text (for messages) and its steps after `$`."""

    text: str
    steps: tuple[_Step, ...]

    @property
    def selects_all(self) -> bool:
        return not self.steps

    @property
    def gives_array(self) -> bool:
        """Jayway's "indefinite" paths: a wildcard, index list or slice anywhere means an array of matches."""
        return any(_is_indefinite(step) for step in self.steps)

    @property
    def index_only(self) -> bool:
        """Whether it can apply to a CSV row (an array of columns) at all."""
        return all(not isinstance(step, Fields) for step in self.steps)


def _is_indefinite(step: _Step) -> bool:
    if isinstance(step, Index):
        return len(step.indices) > 1
    return isinstance(step, (Slice, Wildcard, _Positions))


def _compile(field_name: str, text: object) -> _Path:
    """Parse with jsonpath-ng, then keep only SageMaker's subset, naming the field in every refusal."""
    if not isinstance(text, str):
        raise FilterError(f"{field_name} must be a JSONPath string, got {type(text).__name__}")
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"{field_name} {text!r} is {len(text)} characters; "
                          f"SageMaker allows at most {MAX_FILTER_CHARS}")
    if not text.strip().startswith("$"):
        raise FilterError(f"{field_name} {text!r} must start at the record's root `$` (for example `$`, `$.features`)")
    try:
        steps = _parse_steps(text)
    except (JsonPathLexerError, JsonPathParserError, ValueError) as error:
        raise FilterError(f"{field_name} {text!r} is not valid JSONPath: {error}") from None
    for position, step in enumerate(steps):
        problem = _unsupported(step, is_last=position == len(steps) - 1)
        if problem:
            raise FilterError(f"{field_name} {text!r}: {problem}; SageMaker supports `$`, `.name`, `['a','b']`, `[n]`, "
                              f"`[a,b]`, `[start:end]` and `*`")
    return _Path(text, tuple(steps))


def _parse_steps(text: str) -> list[_Step]:
    mixed = _MIXED_LAST_BRACKET.match(text)
    if mixed and "," in mixed["parts"] and ":" in mixed["parts"]:
        parts = [_parse_steps(f"$[{part}]") for part in mixed["parts"].split(",")]
        if any(len(part) != 1 for part in parts):
            raise ValueError(f"cannot read the bracket [{mixed['parts']}]")
        if sum(isinstance(part, Slice) for (part,) in parts) > 1:
            raise ValueError(f"only one range may share a bracket, as in `$[0,5:]`; [{mixed['parts']}] has several")
        return _parse_steps(mixed["prefix"]) + [_Positions([part for (part,) in parts])]
    with warnings.catch_warnings():  # jsonpath-ng warns of syntax it will drop (`|`); _unsupported refuses it anyway
        warnings.simplefilter("ignore", DeprecationWarning)
        return _flatten(parse_jsonpath(text))


def _flatten(node: JSONPath, leading: bool = True) -> list[JSONPath]:
    """jsonpath-ng nests `a.b.c` as Child(Child(a, b), c); filters read better as a flat list after `$`."""
    if isinstance(node, Root) and leading:
        return []
    if isinstance(node, Child):
        return _flatten(node.left, leading) + _flatten(node.right, leading=False)
    return [node]  # anything else (a `$` mid-path, `..`, `|`, `where`) is refused by _unsupported


def _unsupported(step: JSONPath | _Positions, is_last: bool) -> str | None:
    """Why SageMaker would refuse this step, or None."""
    if isinstance(step, Wildcard):
        return None
    if isinstance(step, Slice):
        return "slice steps (`[a:b:c]`) are not supported" if step.step is not None else None
    if isinstance(step, Index):
        return None
    if isinstance(step, _Positions):
        return _unsupported_parts(step.parts)
    if isinstance(step, Fields):
        if "*" in step.fields:
            return "write the wildcard as `*` or `[*]`, not as a key"
        if len(step.fields) > 1 and not is_last:
            return "a bracket of several keys must be the last step"
        if len(step.fields) > 1 and any("." in name for name in step.fields):
            return "keys in a bracket of several keys cannot go deeper (`['a','b.c']`)"
        return None
    return f"`{step}` is outside SageMaker's JSONPath subset"


def _unsupported_parts(parts: list[Index | Slice]) -> str | None:
    return next((problem for part in parts if (problem := _unsupported(part, is_last=True))), None)


def _select(path: _Path, record: Any, excerpt: Callable[[], str]) -> Any:
    """Apply a validated path; a missing key or index fails the record instead of writing less."""
    matches = [record]
    for step in path.steps:
        matches = [child for value in matches for child in _children(step, value, path, excerpt)]
    return matches if path.gives_array else matches[0]


def _children(step: _Step, value: Any, path: _Path, excerpt: Callable[[], str]) -> list[Any]:
    def fail(reason: str) -> FilterError:
        return FilterError(f"filter {path.text!r}: {reason} in record {excerpt()}")

    if isinstance(step, Fields):
        if not isinstance(value, dict):
            raise fail(f"key {_keys(step)} applied to a {_kind(value)}")
        missing = [name for name in step.fields if name not in value]
        if missing:
            raise fail(f"no key {', '.join(map(repr, missing))}")
        if len(step.fields) == 1:
            return [value[step.fields[0]]]
        return [{name: value[name] for name in step.fields}]
    if isinstance(step, Wildcard):
        if isinstance(value, dict):
            return list(value.values())
        if isinstance(value, list):
            return list(value)
        raise fail(f"`*` applied to a {_kind(value)}")
    if not isinstance(value, list):
        raise fail(f"an index applied to a {_kind(value)}")
    parts = step.parts if isinstance(step, _Positions) else [step]
    picked: list[Any] = []
    for part in parts:
        if isinstance(part, Slice):
            picked.extend(value[part.start:part.end])
            continue
        for index in part.indices:
            if not -len(value) <= index < len(value):
                raise fail(f"index {index} is past the end of an array of {len(value)}")
            picked.append(value[index])
    return picked


def _keys(step: Fields) -> str:
    return ", ".join(map(repr, step.fields))


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "JSON object"
    if isinstance(value, list):
        return "array"
    return f"{type(value).__name__} value" if value is not None else "null"


def _excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return repr(text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "…")


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# --- the two record formats: read a record to a value, write a value back --------------------------------------

def _read_json(raw: bytes, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FilterError(f"{what} is not one JSON value: {_excerpt(raw)}") from None


def _write_json(value: Any) -> bytes:
    return orjson.dumps(value)  # compact, no spaces, as SageMaker writes


def _read_csv(raw: bytes, what: str) -> list[str]:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise FilterError(f"{what} is not UTF-8 text: {_excerpt(raw)}") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if len(rows) > 1:
        raise FilterError(f"{what} is more than one CSV row (embedded newlines are not supported): {_excerpt(raw)}")
    return rows[0] if rows else []


def _write_csv(value: Any) -> bytes:
    columns = value if isinstance(value, list) else [value]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(columns)
    return buffer.getvalue().encode()


@dataclass(frozen=True)
class DataProcessing:
    """CreateTransformJob's DataProcessing; the defaults pass records and outputs through untouched."""

    input_filter: str = "$"
    join_source: str = "None"
    output_filter: str = "$"
    _input_path: _Path = field(init=False, repr=False, compare=False)
    _output_path: _Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.join_source not in JOIN_SOURCES:
            raise FilterError(f"JoinSource must be one of {', '.join(JOIN_SOURCES)}, got {self.join_source!r}")
        # Compiled once here, so a bad filter is refused when the job is created, not at its first record.
        object.__setattr__(self, "_input_path", _compile("InputFilter", self.input_filter))
        object.__setattr__(self, "_output_path", _compile("OutputFilter", self.output_filter))

    @classmethod
    def parse(cls, spec: dict | None) -> DataProcessing:
        """From the request's `DataProcessing` (None or {} for the defaults); unknown fields are refused by name."""
        if spec is None:
            return cls()
        if not isinstance(spec, dict):
            raise FilterError(f"DataProcessing must be an object, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(_FIELDS))
        if unknown:
            raise FilterError(f"DataProcessing has no field {', '.join(unknown)}; it takes {', '.join(_FIELDS)}")
        return cls(**{_FIELDS[name]: value for name, value in spec.items() if value is not None})

    @property
    def passes_through(self) -> bool:
        """Nothing to do: records and outputs go through byte for byte, whatever their content type."""
        return self._input_path.selects_all and self._output_path.selects_all and self.join_source == "None"

    def check_content_type(self, content_type: str) -> None:
        """Refuse at job creation what would fail every record: filters on a format they cannot read."""
        if self.passes_through:
            return
        media_type = _media_type(content_type)
        if media_type == _CSV_TYPE:
            for field_name, path in (("InputFilter", self._input_path), ("OutputFilter", self._output_path)):
                if not path.index_only:
                    raise FilterError(f"{field_name} {path.text!r} names keys, but CSV rows are arrays of columns: "
                                      f"use indexes such as `$[0]`, `$[1:]`, `$[0,-1]`")
        elif media_type not in _JSON_TYPES:
            raise FilterError(f"DataProcessing works on JSON, JSON Lines and CSV records, not {content_type!r}")

    def filter_input(self, record: bytes, content_type: str) -> bytes:
        """The part of one input record the model sees."""
        if self._input_path.selects_all:
            return record
        self.check_content_type(content_type)
        read, write = self._format(content_type)
        value = read(record, "input record")
        return write(_select(self._input_path, value, lambda: _excerpt(record)))

    def join_and_filter_output(self, input_record: bytes, output_record: bytes, content_type: str) -> bytes:
        """What is written for one record: the model's output, joined with the original input if asked, filtered."""
        if self.passes_through:
            return output_record
        self.check_content_type(content_type)
        read, write = self._format(content_type)
        output = read(output_record, "model output")
        if self.join_source == "Input":
            output = self._join(read(input_record, "input record"), output, content_type)
        if self._output_path.selects_all:
            return write(output)
        return write(_select(self._output_path, output, lambda: _excerpt(write(output))))

    @staticmethod
    def _join(input_value: Any, output: Any, content_type: str) -> Any:
        if _media_type(content_type) == _CSV_TYPE:
            return input_value + output
        if isinstance(input_value, dict):
            return {**input_value, OUTPUT_KEY: output}
        return {INPUT_KEY: input_value, OUTPUT_KEY: output}

    @staticmethod
    def _format(content_type: str) -> tuple[Callable[[bytes, str], Any], Callable[[Any], bytes]]:
        if _media_type(content_type) == _CSV_TYPE:
            return _read_csv, _write_csv
        return _read_json, _write_json
