"""The __NAME__ model's handler, in the SageMaker inference toolkit's contract (servelet runs it the same way).

`model_fn` loads the model once per instance; each request then goes `input_fn` → `predict_fn` → `output_fn`.
This one is a linear model kept in model.json: replace the loading and the arithmetic with your own.
Any function you leave out gets the toolkit's default (JSON, CSV and NPY bodies as numpy arrays).
"""

import json
import os

import numpy as np

JSON = "application/json"


def model_fn(model_dir):
    """Load the model from the folder (an unpacked model.tar.gz); what this returns is `model` below."""
    with open(os.path.join(model_dir, "model.json")) as f:
        params = json.load(f)
    return {"weights": np.asarray(params["weights"], dtype=float), "bias": float(params["bias"])}


def input_fn(request_body, request_content_type):
    """The request body as model input: JSON `{"instances": [[x1, x2, x3], ...]}` becomes rows of numbers."""
    if request_content_type.split(";")[0].strip() != JSON:
        raise ValueError(f"this model reads {JSON}, not {request_content_type}")
    rows = np.asarray(json.loads(request_body)["instances"], dtype=float)
    if rows.ndim != 2:
        raise ValueError("instances must be a list of rows of numbers")
    return rows


def predict_fn(rows, model):
    """One prediction per row."""
    if rows.shape[1] != model["weights"].size:
        raise ValueError(f"each row needs {model['weights'].size} numbers, not {rows.shape[1]}")
    return rows @ model["weights"] + model["bias"]


def output_fn(prediction, accept):
    """The answer's body and content type (JSON whatever the Accept header says, in this example)."""
    return json.dumps({"predictions": prediction.tolist()}), JSON
