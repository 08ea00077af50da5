"""Settings read LMI's names; an instance says 503 on /ping until its model has loaded."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

import servelet.artifacts as artifacts
from servelet.instance.app import create_app
from servelet.settings import DEFAULT_MODEL_URI, SettingsError, load_instance_settings


def test_lmi_environment_names_configure_the_instance(monkeypatch):
    monkeypatch.setenv("HF_MODEL_ID", "/models/m.gguf")
    monkeypatch.setenv("OPTION_ROLLING_BATCH", "llamacpp")
    monkeypatch.setenv("OPTION_MAX_ROLLING_BATCH_SIZE", "8")
    monkeypatch.setenv("OPTION_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "9090")
    monkeypatch.setenv("SERVELET_PREFILL_CHUNK", "64")
    settings = load_instance_settings()
    assert (settings.model, settings.rolling_batch, settings.port) == ("/models/m.gguf", "llamacpp", 9090)
    engine = settings.engine_config()
    assert (engine.max_batch_size, engine.max_model_len, engine.prefill_chunk) == (8, 1024, 64)


def test_servelet_names_win_over_lmi_names_and_defaults_hold(monkeypatch):
    monkeypatch.setenv("OPTION_MODEL_ID", "/models/lmi.gguf")
    monkeypatch.setenv("SERVELET_MODEL", "/models/servelet.gguf")
    assert load_instance_settings().model == "/models/servelet.gguf"
    monkeypatch.delenv("OPTION_MODEL_ID")
    monkeypatch.delenv("SERVELET_MODEL")
    assert load_instance_settings().model == DEFAULT_MODEL_URI


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("OPTION_ROLLING_BATCH", "lmi-dist", "not a rolling-batch backend"),
        ("OPTION_DTYPE", "int3", "not a data type"),
        ("TENSOR_PARALLEL_DEGREE", "two", "not a device count"),
        ("SERVELET_RUNTIME", "onnx", "not a runtime"),
        ("OPTION_MAX_ROLLING_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("SERVELET_KV_CACHE_TOKENS", "512", "smaller than the context length"),
    ],
)
def test_values_that_cannot_apply_are_refused_naming_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        load_instance_settings()
    assert variable in str(refused.value) and message in str(refused.value)


def test_ping_is_503_while_the_model_loads_then_200(monkeypatch, model_path):
    release = threading.Event()

    def slow_resolve(_uri):
        release.wait(timeout=60)
        return model_path

    monkeypatch.setattr(artifacts, "resolve_model", slow_resolve)
    app = create_app(load_instance_settings(max_batch_size=2, max_model_len=256))
    with TestClient(app) as client:
        assert client.get("/ping").status_code == 503
        early = client.post("/invocations", json={"inputs": "hi"})
        assert early.status_code == 503 and "loading" in early.json()["error"]
        release.set()
        deadline = time.monotonic() + 60
        while client.get("/ping").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/ping").status_code == 200
        assert client.post("/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200
