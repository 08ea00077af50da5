"""The QA routes our users call with plain HTTP: `GET /question`, `POST /question`, and `POST /generate`
with a question body; the answer is a span of the context, with its offsets and a score."""

from __future__ import annotations

import pytest

CAR = {"question": "What is the color of my car now?", "context": "My car used to be blue but I painted red"}
BERLIN = {"question": "Where do I live?", "context": "My name is Wolfgang and I live in Berlin"}


@pytest.fixture(scope="module")
def http(gateway):
    with gateway.http(timeout=120) as client:
        yield client


def assert_span(answer: dict, context: str) -> None:
    """The shape every QA route answers: the answer is context[start:end], scored in [0, 1]."""
    assert set(answer) == {"score", "start", "end", "answer"}
    assert 0 <= answer["start"] <= answer["end"] <= len(context)
    assert context[answer["start"] : answer["end"]] == answer["answer"]
    assert 0 <= answer["score"] <= 1


# Our users' harder questions (issue 18), each with the context it was asked about.
HARDER = [
    (
        "What are the frameworks backing transformers?",
        "Transformers provides thousands of pretrained models to perform tasks on different modalities such as text, "
        "vision, and audio. Transformers is backed by the three most popular deep learning libraries, Jax, PyTorch "
        "and TensorFlow, with a seamless integration between them.",
        "Jax, PyTorch and TensorFlow",
    ),
    (
        "What are the pillars for well architected framework?",
        "The AWS Well-Architected Framework describes key concepts, design principles, and architectural best "
        "practices for designing and running workloads in the cloud. Its six pillars are operational excellence, "
        "security, reliability, performance efficiency, cost optimization, and sustainability.",
        "operational excellence, security, reliability, performance efficiency, cost optimization, and sustainability",
    ),
    (
        "What is the foundation for ChatGPT?",
        "ChatGPT is a chatbot developed by OpenAI. It is built on top of the GPT large language model (LLM), which "
        "predicts the next word based on the words before it, and was fine-tuned with reinforcement learning from "
        "human feedback.",
        "the GPT large language model",
    ),
]


@pytest.mark.parametrize("question, context, expected", HARDER, ids=["frameworks", "pillars", "chatgpt"])
def test_harder_questions_are_answered_with_a_span_holding_the_answer(http, question, context, expected):
    """Constrained span decoding: the model may only copy runs of the context, so it cannot paraphrase or answer
    nothing (it did both before)."""
    answer = http.post("/question", json={"question": question, "context": context})
    assert answer.status_code == 200, answer.text
    assert_span(answer.json(), context)
    assert expected.lower() in answer.json()["answer"].lower()


def test_a_clearly_stated_answer_scores_higher_than_a_guess(http):
    clear = http.post("/question", json=CAR).json()
    guess = http.post("/question", json={"question": "What is the name of my dog?", "context": CAR["context"]}).json()
    assert clear["score"] > guess["score"]


def test_get_question_answers_from_the_context(http):
    answer = http.get("/question", params=CAR)
    assert answer.status_code == 200, answer.text
    assert_span(answer.json(), CAR["context"])
    assert answer.json()["answer"].lower() == "red"


def test_post_question_answers_the_same(http):
    answer = http.post("/question", json=CAR)
    assert answer.status_code == 200, answer.text
    assert answer.json() == http.get("/question", params=CAR).json()


def test_generate_takes_a_question_body(http):
    answer = http.post("/generate", json=CAR)
    assert answer.status_code == 200, answer.text
    assert_span(answer.json(), CAR["context"])
    assert answer.json()["answer"].lower() == "red"


def test_a_second_question(http):
    answer = http.post("/question", json=BERLIN).json()
    assert_span(answer, BERLIN["context"])
    assert "Berlin" in answer["answer"]


# -- what users get wrong -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, named",
    [
        ({"question": CAR["question"]}, "context"),
        ({"context": CAR["context"]}, "question"),
        ({"question": "  ", "context": CAR["context"]}, "question"),
        ({"question": CAR["question"], "context": ""}, "context"),
    ],
)
def test_get_question_names_what_is_missing(http, params, named):
    answer = http.get("/question", params=params)
    assert answer.status_code == 422, answer.text
    assert named in answer.json()["error"]


@pytest.mark.parametrize(
    "body, named",
    [
        ({"question": CAR["question"]}, "context"),
        ({"question": "", "context": CAR["context"]}, "question"),
        ({"question": 3, "context": CAR["context"]}, "question"),
        (CAR | {"top_k": 3}, "top_k"),
    ],
)
@pytest.mark.parametrize("route", ["/question", "/generate"])
def test_post_question_names_what_is_wrong(http, route, body, named):
    answer = http.post(route, json=body)
    assert answer.status_code == 422, answer.text
    assert named in answer.json()["error"]


@pytest.mark.parametrize("body", [{"prompt": "hello"}, {}, ["What?", "Where?"], {"inputs": "Hi", "question": "Why?"}])
def test_generate_says_which_bodies_it_takes(http, body):
    answer = http.post("/generate", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert "inputs" in error and "question" in error and "context" in error


def test_post_question_refuses_a_body_that_is_not_json(http):
    answer = http.post("/question", content=b"question=why", headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert "JSON" in answer.json()["error"]


def test_openapi_documents_both_generate_bodies(http):
    spec = http.get("/openapi.json").json()
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    shapes = [set(s["properties"]) for s in body["oneOf"]]
    assert {"inputs", "parameters"} <= shapes[0] and shapes[1] == {"question", "context", "endpoint"}
    question = spec["paths"]["/question"]
    assert {p["name"] for p in question["get"]["parameters"]} == {"question", "context", "endpoint"}
    assert set(question["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {
        "question", "context", "endpoint"
    }
    assert http.get("/docs").status_code == 200
