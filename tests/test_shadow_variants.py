"""Shadow variants (SageMaker's shadow tests): an endpoint config's ShadowProductionVariants variant gets a copy of the
production variant's real-time requests, by its weight relative to production's, and answers no client.

Handler models write every request they see to a file, so the tests see what the shadow got while the client got
the production variant's answer. CreateEndpointConfig used to refuse the member as unsupported.
"""

from __future__ import annotations

import json
import textwrap

import botocore.exceptions
import httpx
import pytest
from conftest import boto, start_gateway, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families
from servelet.control.endpoints import Variant
from servelet.control.shadows import sampled

# Each model's Environment says where it writes what it saw (SEEN), what it answers as (ANSWER_AS), and whether it
# fails (FAIL), waits for a file before it is loaded (LOAD_GATE) or before it answers (ANSWER_GATE).
RECORDING = '''
import json, os, time

def wait_for_file(variable):
    deadline = time.monotonic() + 120
    while os.environ.get(variable) and not os.path.exists(os.environ[variable]) and time.monotonic() < deadline:
        time.sleep(0.05)

def model_fn(model_dir):
    wait_for_file("LOAD_GATE")
    return None

def transform_fn(model, body, content_type, accept):
    seen = json.loads(body)
    with open(os.environ["SEEN"], "a") as seen_file:
        seen_file.write(json.dumps(seen) + "\\n")
    if os.environ.get("FAIL"):
        raise RuntimeError("this shadow model fails on every request")
    wait_for_file("ANSWER_GATE")
    return json.dumps({"answered_by": os.environ["ANSWER_AS"], "seen": seen}), "application/json"
'''
MAX_COPIES_IN_FLIGHT = 4  # SERVELET_SHADOW_MAX_IN_FLIGHT here
WAIT = {"Delay": 1, "MaxAttempts": 120}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shadows")
    (root / "recording" / "code").mkdir(parents=True)
    (root / "recording" / "code" / "inference.py").write_text(textwrap.dedent(RECORDING))
    return root


@pytest.fixture(scope="module")
def gateway(root):
    env = {"SERVELET_INSTANCES": "0", "SERVELET_SHADOW_MAX_IN_FLIGHT": str(MAX_COPIES_IN_FLIGHT)}
    gateway = start_gateway(root / "gateway", env=env, ready=None)
    yield gateway
    stop_process(gateway.process)


@pytest.fixture(scope="module")
def sagemaker(gateway, root):
    sagemaker = boto("sagemaker", gateway.base_url, retries={"max_attempts": 1})
    models = {
        "production": {}, "candidate": {}, "failing": {"FAIL": "true"},
        "held": {"LOAD_GATE": str(root / "held-loads"), "ANSWER_GATE": str(root / "held-answers")},
    }
    for name, environment in models.items():
        environment = environment | {"SEEN": str(root / f"{name}.jsonl"), "ANSWER_AS": name}
        container = {"ModelDataUrl": str(root / "recording"), "Environment": environment}
        sagemaker.create_model(ModelName=name, PrimaryContainer=container)
    return sagemaker


@pytest.fixture(scope="module")
def runtime(gateway):
    return boto("sagemaker-runtime", gateway.base_url, retries={"max_attempts": 1})


def variant(name: str, model: str, weight: float = 1.0) -> dict:
    return {"VariantName": name, "ModelName": model, "InitialInstanceCount": 1, "InitialVariantWeight": weight}


def shadow_config(sagemaker, name: str, production: str, shadow: str | None) -> None:
    shadows = {"ShadowProductionVariants": [variant("shadow", shadow)]} if shadow else {}
    production_variants = [variant("main", production)]
    sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=production_variants, **shadows)


@pytest.fixture(scope="module")
def shadowed(sagemaker):
    """The endpoint `shadowed`: production variant `main` (model production), shadow `shadow` (model candidate)."""
    shadow_config(sagemaker, "mirror-all", "production", "candidate")
    sagemaker.create_endpoint(EndpointName="shadowed", EndpointConfigName="mirror-all")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="shadowed", WaiterConfig=WAIT)
    return "shadowed"


def seen(root, model: str) -> list[dict]:
    path = root / f"{model}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ask(runtime, endpoint: str, body: dict, **extra) -> dict:
    answer = runtime.invoke_endpoint(
        EndpointName=endpoint, Body=json.dumps(body), ContentType="application/json", **extra
    )
    return {"variant": answer["InvokedProductionVariant"]} | json.loads(answer["Body"].read())


def metric(gateway, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    text = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
    return sum(
        sample.value for family in text_string_to_metric_families(text) for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def copied(root, model: str, *markers: str) -> list[dict]:
    """What `model` saw, once the copies of the requests marked `markers` arrived: a shadow takes its copies in the
    order they were sent, so the copies sent before those have arrived too."""
    def arrived() -> bool:
        return set(markers) <= {s.get("marker") for s in seen(root, model)}

    assert wait_for(arrived, 30), seen(root, model)
    return seen(root, model)


def test_every_request_is_copied_to_the_shadow_and_the_client_gets_the_production_answer(shadowed, runtime, root):
    for n in range(5):
        answer = ask(runtime, shadowed, {"n": n, "marker": f"whole-{n}"})
        assert answer["variant"] == "main" and answer["answered_by"] == "production", answer
    streamed = runtime.invoke_endpoint_with_response_stream(
        EndpointName=shadowed, Body=json.dumps({"marker": "streamed"}), ContentType="application/json"
    )
    assert streamed["InvokedProductionVariant"] == "main"
    parts = b"".join(event["PayloadPart"]["Bytes"] for event in streamed["Body"] if "PayloadPart" in event)
    assert json.loads(parts)["answered_by"] == "production"
    sent = [f"whole-{n}" for n in range(5)] + ["streamed"]
    markers = [s["marker"] for s in copied(root, "candidate", *sent)]
    assert sorted(markers) == sorted(sent)
    production = [s["marker"] for s in seen(root, "production")]
    assert set(markers) <= set(production)


def test_both_variants_latency_and_the_copies_are_in_the_metrics(shadowed, runtime, root, gateway):
    ask(runtime, shadowed, {"marker": "measured"})
    copied(root, "candidate", "measured")
    assert wait_for(lambda: metric(gateway, "servelet_requests_total", endpoint=shadowed, variant="shadow",
                                   route="shadow", status="200") >= 1, 10)
    for name in ("main", "shadow"):
        assert metric(gateway, "servelet_variant_latency_seconds_count", endpoint=shadowed, variant=name) >= 1


def test_describe_shows_the_shadow_variant_as_sagemaker_does(shadowed, sagemaker):
    config = sagemaker.describe_endpoint_config(EndpointConfigName="mirror-all")
    assert [v["VariantName"] for v in config["ProductionVariants"]] == ["main"]
    (shadow,) = config["ShadowProductionVariants"]
    assert shadow["VariantName"] == "shadow" and shadow["ModelName"] == "candidate"
    assert shadow["InitialInstanceCount"] == 1 and shadow["InitialVariantWeight"] == 1.0
    endpoint = sagemaker.describe_endpoint(EndpointName=shadowed)
    assert [v["VariantName"] for v in endpoint["ProductionVariants"]] == ["main"]
    (summary,) = endpoint["ShadowProductionVariants"]
    assert summary["VariantName"] == "shadow"
    assert summary["CurrentInstanceCount"] == summary["DesiredInstanceCount"] == 1
    assert summary["CurrentWeight"] == summary["DesiredWeight"] == 1.0


def test_a_request_targeting_the_shadow_variant_is_refused(shadowed, runtime):
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        ask(runtime, shadowed, {"marker": "targeted"}, TargetVariant="shadow")
    error = refused.value.response["Error"]
    assert error["Code"] == "ValidationError" and "is a shadow variant" in error["Message"], error
    assert ask(runtime, shadowed, {"marker": "pinned"}, TargetVariant="main")["answered_by"] == "production"


def test_the_shadow_weight_is_the_share_of_requests_copied(shadowed, sagemaker, runtime, root):
    """Weight 0: none; 0.5 of production's 1: every other request; back to 1, a marker that ends the count."""

    def weigh(weight: float) -> None:
        sagemaker.update_endpoint_weights_and_capacities(
            EndpointName=shadowed, DesiredWeightsAndCapacities=[{"VariantName": "shadow", "DesiredWeight": weight}]
        )

    before = len(seen(root, "candidate"))
    weigh(0.0)
    for n in range(3):
        ask(runtime, shadowed, {"marker": f"unweighted-{n}"})
    weigh(0.5)
    for n in range(4):
        ask(runtime, shadowed, {"marker": f"half-{n}"})
    weigh(1.0)
    ask(runtime, shadowed, {"marker": "weighted-again"})
    markers = [s["marker"] for s in copied(root, "candidate", "weighted-again")[before:]]
    assert not [m for m in markers if m.startswith("unweighted")], markers
    assert len([m for m in markers if m.startswith("half")]) == 2, markers
    described = sagemaker.describe_endpoint(EndpointName=shadowed)["ShadowProductionVariants"][0]
    assert described["CurrentWeight"] == 1.0


def test_a_failing_shadow_never_reaches_the_client_and_is_counted(shadowed, sagemaker, runtime, root, gateway):
    """Also an UpdateEndpoint (blue/green) to a config with another shadow; then the shadow promoted."""
    shadow_config(sagemaker, "mirror-failing", "production", "failing")
    sagemaker.update_endpoint(EndpointName=shadowed, EndpointConfigName="mirror-failing")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=shadowed, WaiterConfig=WAIT)
    described = sagemaker.describe_endpoint(EndpointName=shadowed)
    assert described["EndpointConfigName"] == "mirror-failing" and "FailureReason" not in described, described
    for n in range(3):
        answer = ask(runtime, shadowed, {"marker": f"failing-{n}"})
        assert answer["answered_by"] == "production", answer
    copied(root, "failing", "failing-0", "failing-1", "failing-2")
    assert wait_for(lambda: metric(gateway, "servelet_requests_total", endpoint=shadowed, variant="shadow",
                                   route="shadow", status="500") >= 3, 10)

    shadow_config(sagemaker, "promoted", "candidate", None)
    sagemaker.update_endpoint(EndpointName=shadowed, EndpointConfigName="promoted")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=shadowed, WaiterConfig=WAIT)
    assert ask(runtime, shadowed, {"marker": "promoted"})["answered_by"] == "candidate"
    assert "ShadowProductionVariants" not in sagemaker.describe_endpoint(EndpointName=shadowed)


def test_copies_are_dropped_and_counted_while_the_shadow_loads_and_past_the_bound(sagemaker, runtime, root, gateway):
    """The shadow waits for a file to load, then holds every copy until another file exists."""
    shadow_config(sagemaker, "held", "production", "held")
    sagemaker.create_endpoint(EndpointName="held", EndpointConfigName="held")
    try:
        def answers() -> bool:
            try:
                return ask(runtime, "held", {"marker": "early"})["answered_by"] == "production"
            except botocore.exceptions.ClientError:  # its production instance is still starting
                return False

        assert wait_for(answers, 60, poll=0.5)
        assert metric(gateway, "servelet_shadow_copies_dropped_total", endpoint="held", reason="not_ready") >= 1

        (root / "held-loads").touch()
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="held", WaiterConfig=WAIT)
        for n in range(MAX_COPIES_IN_FLIGHT + 2):
            assert ask(runtime, "held", {"marker": f"held-{n}"})["answered_by"] == "production"
        assert metric(gateway, "servelet_shadow_copies_dropped_total", endpoint="held", reason="in_flight_bound") == 2
        assert metric(gateway, "servelet_shadow_copies_in_flight", endpoint="held") == MAX_COPIES_IN_FLIGHT
        (root / "held-answers").touch()
        assert wait_for(lambda: metric(gateway, "servelet_requests_total", endpoint="held", variant="shadow",
                                       route="shadow", status="200") == MAX_COPIES_IN_FLIGHT, 30)
    finally:
        (root / "held-loads").touch()
        (root / "held-answers").touch()
        sagemaker.delete_endpoint(EndpointName="held")


PRODUCTION = variant("main", "production")
REFUSED = {
    "two shadows": (
        {"ProductionVariants": [PRODUCTION],
         "ShadowProductionVariants": [variant("s1", "candidate"), variant("s2", "candidate")]},
        "takes one shadow variant, not 2",
    ),
    "two production variants": (
        {"ProductionVariants": [PRODUCTION, variant("other", "production")],
         "ShadowProductionVariants": [variant("s", "candidate")]},
        "takes one production variant, not 2",
    ),
    "a name of both lists": (
        {"ProductionVariants": [PRODUCTION], "ShadowProductionVariants": [variant("main", "candidate")]},
        "variant names must be unique",
    ),
    "serverless": (
        {"ProductionVariants": [PRODUCTION], "ShadowProductionVariants": [
            {"VariantName": "s", "ModelName": "candidate",
             "ServerlessConfig": {"MemorySizeInMB": 2048, "MaxConcurrency": 1}}]},
        "has a ServerlessConfig",
    ),
    "async": (
        {"ProductionVariants": [PRODUCTION], "ShadowProductionVariants": [variant("s", "candidate")],
         "AsyncInferenceConfig": {"OutputConfig": {"S3OutputPath": "s3://bucket/out"}}},
        "AsyncInferenceConfig",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_shadow_test_sagemaker_does_not_allow_is_refused_naming_the_member(sagemaker, case):
    members, why = REFUSED[case]
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        sagemaker.create_endpoint_config(EndpointConfigName="refused", **members)
    error = refused.value.response["Error"]
    assert error["Code"] == "ValidationException", error
    assert "ShadowProductionVariants" in error["Message"] and why in error["Message"], error["Message"]


def test_a_multi_model_shadow_test_is_refused(sagemaker, root):
    container = {"ModelDataUrl": str(root), "Mode": "MultiModel"}
    sagemaker.create_model(ModelName="many", PrimaryContainer=container)
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        sagemaker.create_endpoint_config(
            EndpointConfigName="refused", ProductionVariants=[PRODUCTION],
            ShadowProductionVariants=[variant("s", "many")],
        )
    assert "ShadowProductionVariants: model 'many' is a multi-model" in refused.value.response["Error"]["Message"]


SHARES = [(1, 1, 8), (0.5, 1, 4), (0, 1, 0), (3, 1, 8), (1, 4, 2)]  # shadow weight, production weight, copies of 8


@pytest.mark.parametrize(("shadow_weight", "production_weight", "copies"), SHARES)
def test_the_share_copied_is_the_shadow_weight_over_the_production_weight(shadow_weight, production_weight, copies):
    shadow, production = Variant("s", "m", shadow_weight, shadow=True), Variant("p", "m", production_weight)
    assert sum(sampled(shadow, production) for _ in range(8)) == copies
