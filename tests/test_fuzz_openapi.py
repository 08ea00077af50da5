"""Schemathesis over the gateway's own `/openapi.json`: every operation, valid and invalid requests generated from
its schema, against one real gateway serving the default model. No answer is a server error, none hangs, what the
schema describes conforms to it, and every refusal is written in its API family's error shape (what that family's
client parses: botocore, openai, huggingface_hub).

The gateway's own limits keep generation cheap: each request may ask for a few tokens only
(SERVELET_MAX_TOKENS_PER_REQUEST), and the context is short (SERVELET_MAX_MODEL_LEN); a generated request asking
for more is refused with a 4xx, which is itself a case the fuzz run checks. Run it alone:
`.venv/bin/pytest tests/test_fuzz_openapi.py -q` (FUZZ_EXAMPLES=200 for a longer run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import schemathesis
from conftest import create_key, start_gateway, stop_process
from error_shapes import family, problem
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))  # per operation and phase; make test keeps it small
CONTROL_EXAMPLES = max(1, EXAMPLES // 3)  # per control operation and mode (valid, invalid): 25 operations
REQUEST_TIMEOUT = 60  # seconds: an answer slower than this is a hang (a few tokens take well under a second)
# Few tokens per request and a short context: every generated request that runs the model is cheap. 24 tokens is
# what the QA routes ask for an answer (gateway/questions.py); fewer, and every question would be refused.
LIMITS = {"SERVELET_MAX_TOKENS_PER_REQUEST": "24", "SERVELET_MAX_MODEL_LEN": "128", "SERVELET_MAX_BATCH_SIZE": "4"}
# Generated control requests may name s3:// or https:// models and data: whatever the gateway would fetch for them
# goes to a closed port on this machine, never out of it.
NOWHERE = "http://127.0.0.1:9"
OFFLINE = {"AWS_ENDPOINT_URL": NOWHERE, "HTTP_PROXY": NOWHERE, "HTTPS_PROXY": NOWHERE, "NO_PROXY": "127.0.0.1,localhost"}
AMZ_JSON = "application/x-amz-json-1.1"

# The control API's bodies are JSON under AWS's own media type, which Schemathesis does not know as JSON.
schemathesis.serializer.alias(AMZ_JSON, "application/json")


@schemathesis.deserializer(AMZ_JSON)
def amz_json(ctx, response):
    return json.loads(response.content)


@pytest.fixture(scope="module")
def admin(tmp_path_factory) -> tuple[Path, dict]:
    """The gateway's folder and an admin key's header. Auth is on so that generated transform jobs and async
    requests cannot name file:// paths: none is allowed without SERVELET_FILE_ROOTS."""
    root = tmp_path_factory.mktemp("fuzz")
    key = create_key(root / "data", "fuzzer", "--scope", "admin", "--scope", "invoke:*", "--scope", "metrics")["key"]
    return root, {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def gateway(admin, model_path):
    running = start_gateway(admin[0], env=LIMITS | OFFLINE | {"SERVELET_AUTH": "true"})
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def api_schema(gateway, admin):
    return schemathesis.openapi.from_url(f"{gateway.base_url}/openapi.json", headers=admin[1], timeout=REQUEST_TIMEOUT)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def node_id_for_schemathesis(request):
    """schemathesis' schema-from-a-fixture test (4.x) reads and renames pytest's private `Function._nodeid`,
    which pytest 9 no longer has; the copy only names each operation's subtest in reports."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schemathesis.check
def error_in_family_shape(ctx, response, case) -> bool | None:
    """A 4xx or 5xx answer carries its family's error shape, with a message that says what is wrong."""
    if response.status_code < 400:
        return None
    name = family(case.method, case.formatted_path, response.request.headers)
    headers = {key: values[0] for key, values in response.headers.items()}  # lower-case names, a list of values
    if wrong := problem(name, response.content, headers):
        raise AssertionError(f"{response.status_code} in the {name} family's shape: {wrong}: {response.content[:300]!r}")
    return None


CHECKS = [not_a_server_error, response_schema_conformance, error_in_family_shape]


# The whole run is one test per family of operations; it grows with the API, so it gets more than the suite's 600 s
# per test on a loaded machine. A hang still fails it sooner: REQUEST_TIMEOUT bounds each request.
@pytest.mark.timeout(1500)
@schema.parametrize()
@settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True
)
def test_every_operation_answers_without_a_server_error_in_its_family_s_shape(case, admin):
    case.call_and_validate(headers=admin[1], checks=CHECKS, timeout=REQUEST_TIMEOUT)


# -- the control APIs, each operation with its own bodies ---------------------------------------------------------
def one_document_per_target(document: dict):
    """(X-Amz-Target, an OpenAPI document of POST / taking only that operation's body): the whole document lets any
    target meet any operation's body, so most generated control requests are refused before the operation runs."""
    post = document["paths"]["/"]["post"]
    for body in post["requestBody"]["content"][AMZ_JSON]["schema"]["oneOf"]:
        operation = post | {"requestBody": {"required": True, "content": {AMZ_JSON: {"schema": body}}}}
        yield body["title"], document | {"paths": {"/": {"post": operation}}}


@pytest.mark.timeout(1500)
def test_each_control_operation_with_bodies_of_its_own_shape(gateway, admin):
    with gateway.http(headers=admin[1], timeout=REQUEST_TIMEOUT) as http:
        document = http.get("/openapi.json").json()
    targets = 0
    for target, single in one_document_per_target(document):
        operation = schemathesis.openapi.from_dict(single)["/"]["POST"]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(mode, headers={"X-Amz-Target": target}, media_type=AMZ_JSON))
            @settings(max_examples=CONTROL_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def answers(case):
                case.call_and_validate(base_url=gateway.base_url, headers=admin[1], checks=CHECKS,
                                       timeout=REQUEST_TIMEOUT)

            answers()
        targets += 1
    assert targets >= 20  # SageMaker's, its transform jobs', Application Auto Scaling's
