"""The SageMaker inference toolkit's default decoders and encoders: JSON, CSV, NPY and plain text.

A handler script that leaves out `input_fn` or `output_fn` gets these, with the toolkit's shapes: a JSON array
or a CSV body becomes a numpy array, a prediction is written with `tolist()`, one CSV row per array row.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from .base import InvocationError

JSON, CSV, NPY, TEXT = "application/json", "text/csv", "application/x-npy", "text/plain"
ANY = "*/*"


def default_accept() -> str:
    """What `Accept: */*` or no Accept means: the toolkit's SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT, else JSON."""
    return os.environ.get("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT") or JSON


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def decode(body: bytes, content_type: str):
    """The body as data a `predict_fn` can use; 415 for a type without a decoder, 400 for a body that is not it."""
    kind = media_type(content_type)
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise InvocationError(
            415, f"content type {kind or '(none)'!r} has no decoder here; accepted: {', '.join(_DECODERS)} "
            "(or write an input_fn for it)", "unsupported_media_type",
        )
    if not body:
        raise InvocationError(400, f"the request body is empty; send {kind} data")
    try:
        return decoder(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise InvocationError(400, f"the request body is not valid {kind}: {exc}") from None


def encode(prediction, accept: str) -> tuple[bytes, str]:
    """The prediction as bytes of the first type in `accept` that has an encoder; 406 when none has."""
    wanted = [media_type(part) for part in accept.split(",")] if accept else [ANY]
    for kind in wanted:
        kind = default_accept() if kind == ANY else kind
        if kind in _ENCODERS:
            return _ENCODERS[kind](prediction), kind
    raise InvocationError(
        406, f"accept {accept!r}: no encoder for it here; accepted: {', '.join(_ENCODERS)} (or write an output_fn for it)",
        "not_acceptable",
    )


def _from_json(body: bytes):
    value = json.loads(body)
    if isinstance(value, list):  # numbers become an array, as the toolkit's decoder does, so `predict_fn` can compute
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            return value
        if array.dtype.kind in "biuf":
            return array
    return value


def _from_csv(body: bytes) -> np.ndarray:
    return np.loadtxt(io.StringIO(body.decode()), delimiter=",", dtype=float)


def _from_npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)  # never unpickle what a caller sent


def _from_text(body: bytes) -> str:
    return body.decode()


def _to_json(prediction) -> bytes:
    return json.dumps(prediction, default=_plain).encode()


def _plain(value):
    """numpy arrays and scalars (and anything else with `tolist`) as JSON can write them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} cannot be written as JSON")


def _to_csv(prediction) -> bytes:
    stream = io.StringIO()
    np.savetxt(stream, np.atleast_1d(np.asarray(prediction)), delimiter=",", fmt="%s")
    return stream.getvalue().encode()


def _to_npy(prediction) -> bytes:
    stream = io.BytesIO()
    np.save(stream, np.asarray(prediction), allow_pickle=False)
    return stream.getvalue()


def _to_text(prediction) -> bytes:
    return prediction if isinstance(prediction, bytes) else str(prediction).encode()


_DECODERS = {JSON: _from_json, CSV: _from_csv, NPY: _from_npy, TEXT: _from_text}
_ENCODERS = {JSON: _to_json, CSV: _to_csv, NPY: _to_npy, TEXT: _to_text}
