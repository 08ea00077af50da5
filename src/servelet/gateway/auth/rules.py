"""What each request needs to be let in, read from its method, path and headers before any route runs.

One table for every route family, so a new route is covered by default: a path not named here needs a valid key
(any scope). Data routes name their endpoint in the path, in a query parameter or in a JSON body field; the
field is read only for a key limited to some endpoints (`invoke:endpoint/NAME`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from starlette.datastructures import Headers, QueryParams

from ...control.endpoints import DEFAULT_ENDPOINT

Kind = Literal["open", "any", "metrics", "admin", "invoke", "invoke_some"]
# How a refusal is written: "sagemaker" (runtime, rest-json), "aws-json" (the control APIs on `POST /`), "openai",
# "tgi", or "plain" ({"code", "error_type", "error"}, the gateway's default).
Family = Literal["sagemaker", "aws-json", "openai", "tgi", "plain"]

OPEN_PATHS = ("/ping", "/health")  # liveness for load balancers and `servelet` itself: no data, no names of keys
RUNTIME_PATH = re.compile(r"^/endpoints/([^/]+)/(invocations|invocations-response-stream|async-invocations)$")
JOB_PATH = re.compile(r"^/async-invocations/([^/]+)$")
# What an InferenceId may hold (gateway/api/sagemaker_async.py): an id past it names no job, and is never looked up (a
# NUL in it would fail PostgreSQL's query).
INFERENCE_ID = re.compile(r"[!-~]{1,64}")


@dataclass(frozen=True)
class Need:
    kind: Kind
    family: Family = "plain"
    endpoint: str | None = None  # invoke: the endpoint, when the path or the query names it
    body_field: str | None = None  # invoke: the JSON body field that names it (its absence means `default`)
    job: str | None = None  # invoke: an async job's InferenceId, whose endpoint the store knows
    json_only: bool = False  # a route that reads JSON only: browser-simple content types are refused

    @property
    def reads_body(self) -> bool:
        return self.body_field is not None


def need_for(method: str, path: str, headers: Headers, query: QueryParams) -> Need:
    if path in OPEN_PATHS:
        return Need("open")
    if path == "/metrics":
        return Need("metrics")
    if path == "/":
        if method != "POST":
            return Need("any")
        if "x-amz-target" in headers:  # SageMaker control, Application Auto Scaling, transform jobs
            return Need("admin", "aws-json", json_only=True)
        return Need("invoke", "tgi", endpoint=DEFAULT_ENDPOINT, json_only=True)  # TGI's compat route
    if match := RUNTIME_PATH.match(path):
        return Need("invoke", "sagemaker", endpoint=match[1])
    if path == "/invocations":
        return Need("invoke", "sagemaker", endpoint=DEFAULT_ENDPOINT)
    if match := JOB_PATH.match(path):
        return Need("invoke", "sagemaker", job=match[1] if INFERENCE_ID.fullmatch(match[1]) else None)
    if path.startswith("/v1/"):
        if method == "POST":
            return Need("invoke", "openai", body_field="model", json_only=True)
        return Need("invoke_some", "openai")  # listing models
    if path in ("/generate", "/generate_stream"):
        # /generate also takes the QA body, whose `endpoint` field names the endpoint (TGI bodies refuse one).
        return Need("invoke", "tgi", body_field="endpoint", json_only=True)
    if path == "/info":
        return Need("invoke", "tgi", endpoint=DEFAULT_ENDPOINT)
    if path == "/question":
        if method == "POST":
            return Need("invoke", body_field="endpoint", json_only=True)
        return Need("invoke", endpoint=query.get("endpoint", DEFAULT_ENDPOINT))
    if path == "/ws":
        return Need("invoke_some")  # each message's endpoint is checked as it comes (api/websocket.py)
    if path.startswith(("/endpoints/", "/async-invocations/")):
        return Need("any", "sagemaker")  # no such route, refused in the family its path names
    return Need("any")  # /, /docs, /openapi.json and whatever is added later
