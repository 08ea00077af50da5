"""Tests of the __NAME__ handler's functions, run as SageMaker (and servelet) run them: `pytest test_handler.py`."""

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "code"))

import inference  # noqa: E402  (code/ is on the path now, as it is when the model serves)


@pytest.fixture(scope="module")
def model():
    return inference.model_fn(str(HERE))


def test_a_request_goes_through_every_step(model):
    rows = [[1, 2, 3], [0, 0, 0], [-1, 0.5, 4]]
    data = inference.input_fn(json.dumps({"instances": rows}).encode(), "application/json")
    body, content_type = inference.output_fn(inference.predict_fn(data, model), "application/json")

    params = json.loads((HERE / "model.json").read_text())
    expected = [sum(w * x for w, x in zip(params["weights"], row)) + params["bias"] for row in rows]
    assert content_type == "application/json"
    assert json.loads(body)["predictions"] == pytest.approx(expected)


def test_a_body_it_cannot_read_is_refused_with_a_reason(model):
    with pytest.raises(ValueError, match="reads application/json"):
        inference.input_fn(b"1,2,3", "text/csv")
    with pytest.raises(ValueError, match="needs 3 numbers"):
        inference.predict_fn(inference.input_fn(b'{"instances": [[1, 2]]}', "application/json"), model)
