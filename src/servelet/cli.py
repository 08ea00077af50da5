"""The `servelet` command line."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import click
import typer
from rich.console import Console
from rich.table import Column, Table
from typer.core import TyperGroup

from .client import DEFAULT_URL, Client, ServeletError
from .redaction import configure_logging
from .settings import SettingsError, load_gateway_settings, load_instance_settings

if TYPE_CHECKING:
    from .control.store import Store

app = typer.Typer(help="servelet: model serving on one machine.", no_args_is_help=True, add_completion=False)
endpoints_app = typer.Typer(help="List, describe and delete endpoints.", no_args_is_help=True)
app.add_typer(endpoints_app, name="endpoints")
new_app = typer.Typer(help="Start a model folder from a template.", no_args_is_help=True)
app.add_typer(new_app, name="new")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _start_instance(**overrides) -> None:
    configure_logging()
    try:
        settings = load_instance_settings(**overrides)
    except SettingsError as exc:
        typer.echo(f"servelet: {exc}", err=True)
        raise typer.Exit(2) from None
    from .instance.server import run_instance  # imports llama.cpp: only once settings are sound

    raise typer.Exit(run_instance(settings))


@app.command()
def container(
    model: Annotated[Optional[str], typer.Option(help="Model URI (default: $HF_MODEL_ID / $OPTION_MODEL_ID or the default model).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1; 0.0.0.0 inside a container image).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default $SAGEMAKER_BIND_TO_PORT or 8080).")] = None,
    socket: Annotated[Optional[Path], typer.Option(help="Listen on this Unix socket instead of a port.")] = None,
):
    """Run one instance: the SageMaker hosting contract (GET /ping, POST /invocations) over one model."""
    _start_instance(model=model, host=host, port=port, socket=socket)


@app.command(hidden=True)
def template(
    socket: Annotated[Path, typer.Option(help="The Unix socket it takes fork requests on.")],
    model: Annotated[Optional[str], typer.Option(help="Model URI (default: $SERVELET_MODEL, as the gateway passes it).")] = None,
):
    """A snapshot template (started by the gateway): prepare the model once, then fork instances of it on request."""
    configure_logging()
    try:
        settings = load_instance_settings(model=model, socket=socket)
    except SettingsError as exc:
        typer.echo(f"servelet: {exc}", err=True)
        raise typer.Exit(2) from None
    from .instance.template import run_template

    raise typer.Exit(run_template(settings))


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="Model URI of the endpoint `default` (default: the Gemma 3 270M package).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on (default 8080).")] = None,
    instances: Annotated[Optional[int], typer.Option(help="Instances of the endpoint `default`; 0 deploys none.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="YAML file of models and endpoints to deploy ($SERVELET_CONFIG). With it, `default` is "
        "deployed only if the file declares it or --model/--instances ask for it.")] = None,
    auth: Annotated[Optional[bool], typer.Option(
        "--auth", help="Require an API key or SigV4 credentials on every route ($SERVELET_AUTH; keys: `servelet keys "
        "create`).", show_default=False)] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Serve a non-loopback --host with auth off (anyone who reaches the port may use it).")] = False,
) -> None:
    """Run the gateway (every API family on one port) with the endpoint `default` deployed."""
    configure_logging()
    try:
        settings = load_gateway_settings(model=model, host=host, port=port, instances=instances, config=config, auth=auth)
    except SettingsError as exc:
        typer.echo(f"servelet: {exc}", err=True)
        raise typer.Exit(2) from None
    from .gateway.auth.binding import insecure_warning, is_loopback, open_binding_refusal

    if refusal := open_binding_refusal(settings.host, settings.auth, insecure):
        fail(refusal, 2)
    if not settings.auth and not is_loopback(settings.host):
        logging.getLogger("servelet.gateway").warning(insecure_warning(settings.host))
    if settings.config:
        from .config import ConfigError, load_config

        try:
            load_config(settings.config)  # every problem in the file, before anything starts
        except ConfigError as exc:
            typer.echo(f"servelet: {exc}", err=True)
            raise typer.Exit(2) from None
        if not settings.model_fields_set & {"model", "instances"}:
            settings.instances = 0
    from .gateway.server import run_gateway

    raise typer.Exit(run_gateway(settings))


@app.command("size")
def size_model(
    model_uri: Annotated[str, typer.Argument(help="The model: a GGUF file or a Hugging Face folder (any model URI).")],
    batch: Annotated[int, typer.Option(help="Sequences served at once.")] = 1,
    context: Annotated[int, typer.Option(help="Tokens each sequence holds (prompt + output).")] = 2048,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Memory for the weights and the KV cache of B × C tokens, and whether it fits this machine now."""
    from .artifacts import ArtifactError, resolve_model
    from .sizing import SizingError, rows, size

    try:
        sizing = size(model_uri, resolve_model(model_uri), batch, context)
    except (ArtifactError, SizingError) as exc:
        fail(str(exc), 2)
    if as_json:
        typer.echo(sizing.as_json())
        return
    table = Table(show_header=False, highlight=False)
    for label, value in rows(sizing):
        table.add_row(label, value)
    out.print(table)
    for note in sizing.notes:
        say(f"note: {note}")


# -- talking to a running gateway ---------------------------------------------------------------------------
Url = Annotated[str, typer.Option("--url", envvar="SERVELET_URL", help="The gateway's address.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait before giving up (the work goes on in the gateway).")]


def say(message: str) -> None:
    """A line of plain text: no markup, never wrapped (scripts grep it)."""
    out.print(message, markup=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"servelet: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def gateway(url: str) -> Iterator[Client]:
    """A client of the gateway at `url`; whatever the server refuses ends the command with its message."""
    try:
        with Client(url) as client:
            yield client
    except ServeletError as exc:
        fail(exc.message)


def when(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


def number(value: float) -> str:
    return f"{value:g}"


def instance_counts(described: dict) -> tuple[int, int]:
    variants = described.get("ProductionVariants", [])
    return sum(v.get("CurrentInstanceCount", 0) for v in variants), sum(v.get("DesiredInstanceCount", 0) for v in variants)


def capacity_words(variant: dict, counts: str) -> str:
    """A variant's capacity: its instance counts (in `counts`' words), or its ServerlessConfig, which has none."""
    serverless = variant.get("CurrentServerlessConfig")
    if serverless is None:
        return counts.format(current=variant.get("CurrentInstanceCount", 0), desired=variant.get("DesiredInstanceCount", 0))
    provisioned = serverless.get("ProvisionedConcurrency")
    return (f"serverless, {serverless['MemorySizeInMB']} MB, up to {serverless['MaxConcurrency']} requests at once"
            + (f", {provisioned} provisioned" if provisioned else ""))


def wait_in_service(client: Client, name: str, timeout: float) -> dict:
    """Poll DescribeEndpoint with a spinner until InService; a Failed endpoint ends the command with its reason."""
    start = time.monotonic()
    with err.status(f"{name}: starting") as status:
        while True:
            described = client.describe_endpoint(name)
            if described is None:
                fail(f"endpoint {name!r} disappeared while starting (deleted meanwhile?)")
            state = described["EndpointStatus"]
            if state == "InService":
                return described
            if state == "Failed":
                fail(f"endpoint {name!r} failed: {described.get('FailureReason') or 'no reason given'}\n"
                     f"  delete it with `servelet endpoints delete {name}`")
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                fail(f"endpoint {name!r} is still {state} after {timeout:g}s; it keeps starting in the gateway "
                     f"(follow it with `servelet endpoints describe {name}`)")
            ready, desired = instance_counts(described)
            status.update(f"{name}: {state}, {ready}/{desired} instances ready ({elapsed:.0f}s)")
            time.sleep(0.5)


# -- deploy ---------------------------------------------------------------------------------------------------
@app.command()
def deploy(
    model_uri: Annotated[str, typer.Argument(help="The model: package://, file://, s3://, http(s):// or a path.")],
    name: Annotated[str, typer.Option("--name", "-n", help="The endpoint's name (its model and config get it too).")],
    runtime: Annotated[str, typer.Option(help="The runtime that serves it (auto: told by the artifact).")] = "auto",
    instances: Annotated[Optional[int], typer.Option(help="Instances to start (default 1; none with --serverless).")] = None,
    serverless: Annotated[Optional[str], typer.Option(
        help="MEMORY:CONCURRENCY[:PROVISIONED]: a serverless variant (SageMaker's ServerlessConfig: MemorySizeInMB "
        "1024-6144 in steps of 1024, MaxConcurrency 1-200, ProvisionedConcurrency 1..MaxConcurrency).",
    )] = None,
    env: Annotated[Optional[list[str]], typer.Option("--env", "-e", help="KEY=VALUE for the instances (repeatable).")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the endpoint is InService.")] = True,
    timeout: Timeout = 600.0,
    url: Url = DEFAULT_URL,
) -> None:
    """Deploy a model as an endpoint: CreateModel, CreateEndpointConfig (variant AllTraffic), CreateEndpoint."""
    environment = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--env {item!r}: write KEY=VALUE", 2)
        environment[key] = value
    model_uri = local_model_uri(model_uri)
    capacity = serverless_config(serverless) if serverless else None
    with gateway(url) as client:
        if client.describe_endpoint(name) is not None:
            fail(f"endpoint {name!r} already exists: delete it first (`servelet endpoints delete {name}`) or pick another --name")
        variant = {"VariantName": "AllTraffic", "ModelName": name, "InitialVariantWeight": 1.0}
        if serverless:
            variant["ServerlessConfig"] = capacity
        if instances is not None or not serverless:  # with --serverless too, so that the gateway says why not
            variant["InitialInstanceCount"] = 1 if instances is None else instances
        create_all(client, name, [
            model_step(name, model_uri, runtime, environment),
            ("CreateEndpointConfig", {"EndpointConfigName": name, "ProductionVariants": [variant]},
             ("DeleteEndpointConfig", "EndpointConfigName")),
            ("CreateEndpoint", {"EndpointName": name, "EndpointConfigName": name}, None),
        ])
        if not wait:
            say(f"endpoint {name} is Creating; follow it with `servelet endpoints describe {name}`")
            return
        start = time.monotonic()
        described = wait_in_service(client, name, timeout)
        [variant] = described["ProductionVariants"]
        serving = capacity_words(variant, "{current} instance(s)")
        say(f"endpoint {name} is InService: {serving} of {model_uri} ({time.monotonic() - start:.0f}s)")


def local_model_uri(model_uri: str) -> str:
    """A local path as an absolute one (the gateway runs elsewhere in the file system); a URI as it is."""
    if "://" not in model_uri and Path(model_uri).exists():
        return str(Path(model_uri).resolve())
    return model_uri


Step = tuple[str, dict, Optional[tuple[str, str]]]  # operation, its body, and the Delete* (and key) that undoes it


def model_step(name: str, model_uri: str, runtime: str = "auto", environment: dict | None = None) -> Step:
    """CreateModel `name` of `model_uri`, as `deploy` makes a model for its endpoint."""
    container = {"ModelDataUrl": model_uri} | ({"Environment": environment} if environment else {})
    return "CreateModel", {"ModelName": name, "PrimaryContainer": container, "Runtime": runtime}, ("DeleteModel", "ModelName")


def create_all(client: Client, name: str, steps: list[Step]) -> None:
    """Run the Create* steps in order; where one is refused, delete what the earlier ones made (each named `name`)
    so that a corrected retry works, then end the command with the gateway's message."""
    done: list[tuple[str, str]] = []
    for operation, body, undo in steps:
        try:
            client.control(operation, **body)
        except ServeletError:
            for undo_operation, key in reversed(done):  # leave nothing half-made behind
                try:
                    client.control(undo_operation, **{key: name})
                except ServeletError:
                    pass
            raise
        if undo:
            done.append(undo)


def serverless_config(value: str) -> dict:
    """`--serverless 2048:10[:2]` as SageMaker's ServerlessConfig; the gateway checks the limits."""
    parts = value.split(":")
    if not 2 <= len(parts) <= 3 or not all(p.strip().isdigit() for p in parts):
        fail(f"--serverless {value!r}: write MEMORY:CONCURRENCY[:PROVISIONED] in whole numbers, e.g. 2048:10 or 2048:10:1", 2)
    keys = ("MemorySizeInMB", "MaxConcurrency", "ProvisionedConcurrency")
    return {key: int(part) for key, part in zip(keys, parts)}


# -- endpoints list | describe | delete -------------------------------------------------------------------------
@endpoints_app.command("list")
def list_endpoints(url: Url = DEFAULT_URL) -> None:
    """A table of the endpoints: status, variants with their weights and instances, creation time."""
    with gateway(url) as client:
        summaries = client.list_all("ListEndpoints", "Endpoints", SortBy="Name", SortOrder="Ascending")
        if not summaries:
            say("no endpoints (deploy one with `servelet deploy MODEL_URI --name NAME`)")
            return
        table = Table("Name", "Status", "Variants", "Created", highlight=False)
        for summary in summaries:
            described = client.describe_endpoint(summary["EndpointName"]) or summary
            variants = "\n".join(
                f"{v['VariantName']}: weight {number(v.get('CurrentWeight', 0))}, "
                f"{capacity_words(v, '{current}/{desired} instances')}"
                for v in described.get("ProductionVariants", [])
            )
            table.add_row(summary["EndpointName"], summary["EndpointStatus"], variants or "-", when(summary.get("CreationTime")))
        out.print(table)


@endpoints_app.command("describe")
def describe_endpoint(
    name: Annotated[str, typer.Argument(help="The endpoint.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print DescribeEndpoint's answer as it came.")] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """The endpoint's status, why it failed if it did, and each variant's model, weight and instances."""
    with gateway(url) as client:
        described = existing_endpoint(client, name)
        if as_json:
            typer.echo(json.dumps(described, indent=2))
            return
        models = variant_models(client, described["EndpointConfigName"])
        scaling = scaling_policies(client, name)
    fields = [
        ("Endpoint", described["EndpointName"]), ("ARN", described.get("EndpointArn", "-")),
        ("Status", described["EndpointStatus"]), ("Config", described["EndpointConfigName"]),
        ("Created", when(described.get("CreationTime"))), ("Modified", when(described.get("LastModifiedTime"))),
    ]
    if described.get("FailureReason"):
        fields.append(("Failure", described["FailureReason"]))
    for label, value in fields:
        say(f"{label + ':':<10}{value}")
    say("Variants:")
    shadows = described.get("ShadowProductionVariants", [])
    for v in described.get("ProductionVariants", []) + shadows:
        role = " (shadow: gets copies of the requests, answers none)" if v in shadows else ""
        say(f"  {v['VariantName']}{role}: model {models.get(v['VariantName'], '-')}")
        say(f"    weight {number(v.get('CurrentWeight', 0))} (desired {number(v.get('DesiredWeight', 0))}), "
            f"{capacity_words(v, 'instances {current} ready of {desired}')}")
        if v["VariantName"] in scaling:
            say(f"    autoscaling: {scaling[v['VariantName']]}")
        if v.get("LastInstanceStarts"):
            say("    last starts: " + ", ".join(
                f"{s['Kind']} {s['InitDurationInSeconds']:.3f} s ({when(s['StartTime'])})" for s in v["LastInstanceStarts"]
            ))
    events = described.get("ScalingEvents", [])
    if events:
        say("Scaling events:")
        for e in events:
            say(f"  {when(e['Time'])} {e['Variant']}: {e['From']} -> {e['To']} instances ({e['Reason']})"
                + ("" if e.get("Status", "Successful") == "Successful" else f" [{e['Status']}]"))


METRIC_WORDS = {
    "SageMakerVariantConcurrentRequestsPerModelHighResolution": "concurrent requests per instance",
    "SageMakerVariantInvocationsPerInstance": "invocations per instance per minute",
}


def scaling_policies(client: Client, endpoint: str) -> dict[str, str]:
    """Variant name -> its autoscaling bounds and policy, in words."""
    prefix = f"endpoint/{endpoint}/variant/"
    try:
        targets = client.autoscaling("DescribeScalableTargets")["ScalableTargets"]
        policies = client.autoscaling("DescribeScalingPolicies")["ScalingPolicies"]
    except ServeletError:
        return {}
    by_id = {p["ResourceId"]: p for p in policies}
    shown = {}
    for target in targets:
        if not target["ResourceId"].startswith(prefix):
            continue
        text = f"{target['MinCapacity']}..{target['MaxCapacity']} instances"
        policy = by_id.get(target["ResourceId"])
        if policy:
            tracking = policy["TargetTrackingScalingPolicyConfiguration"]
            metric = tracking["PredefinedMetricSpecification"]["PredefinedMetricType"]
            text += (f", target {number(tracking['TargetValue'])} {METRIC_WORDS.get(metric, metric)}, cooldowns "
                     f"out {tracking.get('ScaleOutCooldown', 300)} s / in {tracking.get('ScaleInCooldown', 300)} s "
                     f"(policy {policy['PolicyName']})")
        else:
            text += ", no policy"
        shown[target["ResourceId"].removeprefix(prefix)] = text
    return shown


def variant_models(client: Client, config_name: str) -> dict[str, str]:
    """Variant name -> "model (uri)", from the endpoint's config; empty where it is gone."""
    try:
        config = client.control("DescribeEndpointConfig", EndpointConfigName=config_name)
    except ServeletError:
        return {}
    shown = {}
    for variant in config.get("ProductionVariants", []) + config.get("ShadowProductionVariants", []):
        model = variant["ModelName"]
        try:
            uri = client.control("DescribeModel", ModelName=model).get("PrimaryContainer", {}).get("ModelDataUrl")
        except ServeletError:
            uri = None
        shown[variant["VariantName"]] = f"{model} ({uri})" if uri else model
    return shown


@endpoints_app.command("delete")
def delete_endpoint(
    name: Annotated[str, typer.Argument(help="The endpoint.")],
    wait: Annotated[bool, typer.Option(help="Wait until the endpoint is gone.")] = True,
    keep_resources: Annotated[bool, typer.Option(
        "--keep-resources", help="Keep the model and endpoint config named as the endpoint (deploy's).")] = False,
    timeout: Timeout = 120.0,
    url: Url = DEFAULT_URL,
) -> None:
    """Delete an endpoint, then the model and endpoint config `deploy` made for it when nothing else uses them."""
    with gateway(url) as client:
        described = existing_endpoint(client, name)
        client.control("DeleteEndpoint", EndpointName=name)
        gone = client.describe_endpoint(name) is None
        if wait and not gone:
            start = time.monotonic()
            with err.status(f"{name}: deleting"):
                while not gone and time.monotonic() - start < timeout:
                    time.sleep(0.5)
                    gone = client.describe_endpoint(name) is None
            if not gone:
                fail(f"endpoint {name!r} is still being deleted after {timeout:g}s")
        say(f"deleted endpoint {name}" if gone else f"endpoint {name} is being deleted")
        if keep_resources:
            return
        if not gone:
            say("kept its model and endpoint config: the endpoint still uses them (use --wait)")
            return
        for line in delete_deploy_resources(client, name, described["EndpointConfigName"]):
            say(line)


def delete_deploy_resources(client: Client, name: str, config_name: str) -> list[str]:
    """The config and model named as the endpoint (as `deploy` names them), each unless something else uses it."""
    if config_name != name:
        return []
    said = []
    others = [e["EndpointName"] for e in client.list_all("ListEndpoints", "Endpoints")]
    users = [e for e in others if (client.describe_endpoint(e) or {}).get("EndpointConfigName") == name]
    try:
        config = client.control("DescribeEndpointConfig", EndpointConfigName=name)
    except ServeletError:
        config = None
    if config is not None:
        if users:
            return [f"kept endpoint config {name}: endpoint(s) {', '.join(users)} use it"]
        client.control("DeleteEndpointConfig", EndpointConfigName=name)
        said.append(f"deleted endpoint config {name}")
    if not config or not any(v["ModelName"] == name for v in config.get("ProductionVariants", [])):
        return said
    configs = [c["EndpointConfigName"] for c in client.list_all("ListEndpointConfigs", "EndpointConfigs")]
    model_users = [
        c for c in configs
        if any(v["ModelName"] == name for v in client.control("DescribeEndpointConfig", EndpointConfigName=c)["ProductionVariants"])
    ]
    if model_users:
        said.append(f"kept model {name}: endpoint config(s) {', '.join(model_users)} use it")
    else:
        client.control("DeleteModel", ModelName=name)
        said.append(f"deleted model {name}")
    return said


# -- autoscale --------------------------------------------------------------------------------------------------
CLI_POLICY = "servelet-cli"


@app.command()
def autoscale(
    name: Annotated[str, typer.Argument(help="The endpoint.")],
    variant: Annotated[str, typer.Option("--variant", help="The production variant to scale.")] = "AllTraffic",
    min_instances: Annotated[Optional[int], typer.Option("--min", help="Fewest instances.")] = None,
    max_instances: Annotated[Optional[int], typer.Option("--max", help="Most instances.")] = None,
    target_concurrency: Annotated[Optional[float], typer.Option(
        help="Target concurrent requests per instance.")] = None,
    target_invocations_per_minute: Annotated[Optional[float], typer.Option(
        help="Target invocations per instance per minute.")] = None,
    scale_out_cooldown: Annotated[int, typer.Option(help="Seconds between two scale-outs.")] = 60,
    scale_in_cooldown: Annotated[int, typer.Option(help="Seconds after any scaling before a scale-in.")] = 300,
    off: Annotated[bool, typer.Option("--off", help="Stop autoscaling the variant (its instances stay as they are).")] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """Scale a variant with the load: target tracking between --min and --max instances (Application Auto Scaling)."""
    resource = f"endpoint/{name}/variant/{variant}"
    dimension = {"ResourceId": resource, "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}
    if off:
        with gateway(url) as client:
            try:
                client.autoscaling("DeregisterScalableTarget", **dimension)
            except ServeletError as exc:
                if exc.code != "ObjectNotFoundException":
                    raise
                fail(f"endpoint {name!r} variant {variant!r} is not autoscaled")
        say(f"autoscaling of endpoint {name} variant {variant} is off; its instances stay as they are")
        return
    if (target_concurrency is None) == (target_invocations_per_minute is None):
        fail("give one target: --target-concurrency X or --target-invocations-per-minute Y (or --off)", 2)
    if min_instances is None or max_instances is None:
        fail("give --min and --max instances", 2)
    if target_concurrency is not None:
        metric, value = "SageMakerVariantConcurrentRequestsPerModelHighResolution", target_concurrency
    else:
        metric, value = "SageMakerVariantInvocationsPerInstance", target_invocations_per_minute
    with gateway(url) as client:
        client.autoscaling("RegisterScalableTarget", **dimension, MinCapacity=min_instances, MaxCapacity=max_instances)
        existing = [p["PolicyName"] for p in client.autoscaling("DescribeScalingPolicies", ResourceId=resource)["ScalingPolicies"]]
        for policy in existing:  # the CLI's policy replaces whatever tracked this variant before
            if policy != CLI_POLICY:
                client.autoscaling("DeleteScalingPolicy", **dimension, PolicyName=policy)
        client.autoscaling("PutScalingPolicy", **dimension, PolicyName=CLI_POLICY, PolicyType="TargetTrackingScaling",
                           TargetTrackingScalingPolicyConfiguration={
                               "TargetValue": value, "PredefinedMetricSpecification": {"PredefinedMetricType": metric},
                               "ScaleOutCooldown": scale_out_cooldown, "ScaleInCooldown": scale_in_cooldown,
                           })
    say(f"endpoint {name} variant {variant} autoscales between {min_instances} and {max_instances} instances, "
        f"target {number(value)} {METRIC_WORDS[metric]}")


# -- usage ------------------------------------------------------------------------------------------------------
@app.command()
def usage(
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Only this endpoint.")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="From this UTC day on (YYYY-MM-DD).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per endpoint, variant and day.")] = False,
) -> None:
    """What serverless variants were billed: GB-seconds, requests, snapshot cache GB-seconds and restored GB, and
    their cost, per endpoint and UTC day (read from the store `servelet serve` writes, so no gateway needs to run;
    prices from SERVELET_PRICE_PER_*)."""
    from datetime import date

    from .control.store import Store
    from .control.usage import Rates
    from .settings import database_url

    try:
        first_day = date.fromisoformat(since) if since else None
    except ValueError:
        fail(f"--since {since!r} is not a day: write it YYYY-MM-DD", 2)
    try:
        settings = load_gateway_settings()
    except SettingsError as exc:
        fail(str(exc), 2)
    rates = Rates(settings.price_per_gb_second, settings.price_per_million_requests,
                  settings.price_per_cached_gb_second, settings.price_per_restored_gb)
    store = Store(database_url(settings))
    try:
        days = store.list_usage(endpoint, first_day)
    finally:
        store.close()
    if as_json:
        for day in days:
            print(json.dumps(day.model_dump(mode="json", by_alias=True) | {"Cost": rates.cost(day)}))
        return
    if not days:
        say("no usage billed yet (only serverless variants are billed)")
        return
    for name in dict.fromkeys(d.endpoint_name for d in days):
        table = Table("Day (UTC)", "Variant", "GB-seconds", "Requests", "Cached GB-s", "Restored GB", "Cost (USD)",
                      title=name, highlight=False)
        for day in (d for d in days if d.endpoint_name == name):
            table.add_row(day.day.isoformat(), day.variant_name, f"{day.gb_seconds:.3f}", str(day.requests),
                          f"{day.cache_gb_seconds:.3f}", f"{day.restored_gb:.3f}", f"{rates.cost(day):.8f}")
        out.print(table)


# -- invoke -----------------------------------------------------------------------------------------------------
ASYNC_PANEL = "Async (--async FILE)"


@app.command()
def invoke(
    name: Annotated[str, typer.Argument(help="The endpoint.")],
    body: Annotated[Optional[str], typer.Argument(
        help="JSON, or plain text (sent as {\"inputs\": TEXT}); - or nothing reads stdin.")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the body from this file.")] = None,
    content_type: Annotated[Optional[str], typer.Option(help="Send the body as is with this content type.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Set parameters.max_new_tokens.")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they come (asks the model to stream: \"stream\": true).")] = False,
    async_file: Annotated[Optional[Path], typer.Option(
        "--async", help="Invoke asynchronously (InvokeEndpointAsync) with this file, sent as it is (--content-type, "
        "default application/json): as the body up to 128,000 bytes, else uploaded to --input-location.",
        rich_help_panel=ASYNC_PANEL)] = None,
    input_location: Annotated[Optional[str], typer.Option(
        help="Upload the file here first (s3://BUCKET/KEY or file:///PATH) and send its location; needed over 128,000 bytes.",
        rich_help_panel=ASYNC_PANEL)] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Wait until the job ends, then print its output (exit 1 if it failed or expired).",
        rich_help_panel=ASYNC_PANEL)] = False,
    wait_timeout: Annotated[float, typer.Option(
        help="Seconds --wait waits before giving up (the job goes on).", rich_help_panel=ASYNC_PANEL)] = 600.0,
    inference_id: Annotated[Optional[str], typer.Option(
        help="The job's InferenceId (default: a new UUID; sending one again gets the same job).",
        rich_help_panel=ASYNC_PANEL)] = None,
    ttl: Annotated[Optional[int], typer.Option(
        help="Seconds the job may wait to start before it expires (60-21600, RequestTTLSeconds).",
        rich_help_panel=ASYNC_PANEL)] = None,
    timeout: Annotated[Optional[int], typer.Option(
        help="Seconds the model may take (1-3600, InvocationTimeoutSeconds).", rich_help_panel=ASYNC_PANEL)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the gateway's 202 answer as JSON (on stderr with --wait, whose stdout is the output).",
        rich_help_panel=ASYNC_PANEL)] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """Invoke an endpoint (InvokeEndpoint) and print its answer; with --async FILE, queue it (InvokeEndpointAsync)."""
    if async_file is not None:
        if body is not None or file is not None or stream or max_new_tokens is not None:
            fail("--async FILE sends the file as it is: give no BODY, --file, --stream or --max-new-tokens with it", 2)
        request = AsyncRequest(content_type or "application/json", inference_id, ttl, timeout)
        invoke_async(url, name, async_file, request, input_location, as_json, wait_timeout if wait else None)
        return
    async_only = {"--input-location": input_location is not None, "--wait": wait, "--inference-id": inference_id is not None,
                  "--ttl": ttl is not None, "--timeout": timeout is not None, "--json": as_json}
    if any(async_only.values()):
        fail(f"{', '.join(k for k, given in async_only.items() if given)}: only with --async FILE", 2)
    raw = read_body(body, file)
    if content_type and content_type.split(";")[0].strip() != "application/json":
        if max_new_tokens is not None or stream:
            fail("--max-new-tokens and --stream need a JSON body", 2)
        payload = raw
    else:
        request = lmi_request(raw, max_new_tokens)
        if stream and isinstance(request, dict):
            request.setdefault("stream", True)  # LMI streams token by token only when the body asks
        payload = json.dumps(request).encode()
        content_type = "application/json"
    with gateway(url) as client:
        if not stream:
            answer = client.invoke(name, payload, content_type)
            sys.stdout.buffer.write(answer.body if answer.body.endswith(b"\n") else answer.body + b"\n")
            return
        for part in client.invoke_stream(name, payload, content_type):
            sys.stdout.write(token_text(part))
            sys.stdout.flush()
        sys.stdout.write("\n")


# -- invoke --async ---------------------------------------------------------------------------------------------
ASYNC_BODY_BYTES = 128_000  # the most an InvokeEndpointAsync request carries as its body
JOB_ENDED = ("Completed", "Failed", "Expired")


@dataclass
class AsyncRequest:
    """How the job is asked for: InvokeEndpointAsync's headers."""

    content_type: str
    inference_id: str | None
    ttl_seconds: int | None
    invocation_timeout_seconds: int | None


def invoke_async(url: str, name: str, file: Path, request: AsyncRequest, input_location: str | None, as_json: bool,
                 wait_timeout: float | None) -> None:
    """Queue FILE for the endpoint: inline when small enough, else from where --input-location uploads it; then
    either say where the answer will be or (wait_timeout given) wait for it and print it."""
    size = file_size(file)
    if input_location is None and size > ASYNC_BODY_BYTES:
        fail(f"{file} has {size:,} bytes, more than the {ASYNC_BODY_BYTES:,} an async request may carry: "
             "give --input-location s3://…/KEY (or file:///…) to upload it there", 2)
    if input_location is not None:
        check_object_uri(input_location)
    with gateway(url) as client:
        if input_location is None:
            accepted = client.invoke_async(name, body=read_file(file), **asdict(request))
        else:
            require_async_endpoint(client, name)  # refused before the upload, not after it
            upload(file, input_location, request.content_type)
            accepted = client.invoke_async(name, input_location=input_location, **asdict(request))
        show_accepted(accepted, as_json, err if wait_timeout is not None else out)
        if wait_timeout is None:
            return
        ended = wait_for_job(client, accepted["InferenceId"], wait_timeout)
    print_job_result(ended)


def file_size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError as exc:
        fail(f"--async {file}: {exc.strerror or exc}", 2)


def read_file(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        fail(f"--async {file}: {exc.strerror or exc}", 2)


def check_object_uri(uri: str) -> None:
    """A URI the upload could never write is refused before anything is sent."""
    from . import objects

    try:
        objects.parse(uri)
    except objects.ObjectStoreError as exc:
        fail(f"--input-location {exc}", 2)


def require_async_endpoint(client: Client, name: str) -> None:
    """What the gateway would refuse after a long upload: no such endpoint, or one with no AsyncInferenceConfig."""
    described = existing_endpoint(client, name)
    config = client.control("DescribeEndpointConfig", EndpointConfigName=described["EndpointConfigName"])
    if not config.get("AsyncInferenceConfig"):
        fail(f"endpoint {name!r} is not asynchronous: its endpoint config has no AsyncInferenceConfig")


def upload(file: Path, uri: str, content_type: str) -> None:
    """Stream the file to `uri` a chunk at a time (an async input may be up to 1 GB); all of it or nothing lands."""
    import asyncio

    from botocore.exceptions import BotoCoreError, ClientError

    from . import objects

    async def chunks():
        with file.open("rb") as source:
            while chunk := source.read(objects.CHUNK_BYTES):
                yield chunk

    try:
        with err.status(f"uploading {file} to {uri}"):
            asyncio.run(objects.write_chunks(uri, chunks(), content_type))
    except OSError as exc:
        fail(f"--async {file}: {exc.strerror or exc}", 2)
    except (objects.ObjectStoreError, BotoCoreError, ClientError) as exc:
        fail(f"could not upload {file} to {uri}: {exc}")


def show_accepted(accepted: dict, as_json: bool, console: Console) -> None:
    """The 202's answer: the job's id and where its answer (or failure) will be written."""
    if as_json:
        console.print(json.dumps(accepted), markup=False, soft_wrap=True)
        return
    for key in ("InferenceId", "OutputLocation", "FailureLocation"):
        if accepted.get(key):
            console.print(f"{key + ':':<17}{accepted[key]}", markup=False, soft_wrap=True)


def wait_for_job(client: Client, inference_id: str, timeout: float) -> dict:
    """Poll the job's status, every 0.2 s at first, growing to every 2 s, until it ends; a job still running after
    `timeout` (or Ctrl-C) ends the command, not the job."""
    start, pause = time.monotonic(), 0.2
    follow = f"it goes on in the gateway (follow it with `servelet jobs show {inference_id}`)"
    try:
        with err.status(f"{inference_id}: Pending") as spinner:
            while (status := client.async_status(inference_id))["Status"] not in JOB_ENDED:
                elapsed = time.monotonic() - start
                if elapsed > timeout:
                    fail(f"async invocation {inference_id} is still {status['Status']} after {timeout:g}s; {follow}")
                spinner.update(f"{inference_id}: {status['Status']} ({elapsed:.0f}s)")
                time.sleep(min(pause, timeout - elapsed + 0.05))
                pause = min(pause * 1.5, 2.0)
    except KeyboardInterrupt:
        fail(f"stopped waiting for async invocation {inference_id}; {follow}", 130)
    return status


def print_job_result(status: dict) -> None:
    """A Completed job's output as it was written; a Failed or Expired one ends the command with its reason."""
    if status["Status"] != "Completed":
        details = status.get("FailureLocation") if status["Status"] == "Failed" else None
        where = f" (details at {details})" if details else ""
        fail(f"async invocation {status['InferenceId']} {status['Status']}: {status.get('FailureReason') or 'no reason given'}{where}")
    write_object(status["OutputLocation"])


def write_object(uri: str) -> None:
    """Copy the object at `uri` to stdout a chunk at a time, ending with a newline as `invoke` does."""
    import asyncio

    from botocore.exceptions import BotoCoreError, ClientError

    from . import objects

    async def copy() -> bytes:
        last = b""
        async for chunk in objects.read_chunks(uri):
            sys.stdout.buffer.write(chunk)
            last = chunk
        return last

    try:
        last = asyncio.run(copy())
    except (objects.ObjectStoreError, BotoCoreError, ClientError) as exc:
        fail(f"the job completed, but its output cannot be read: {exc}")
    if not last.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.buffer.flush()


def existing_endpoint(client: Client, name: str) -> dict:
    """DescribeEndpoint's answer, or the one-line error a user sees when there is no such endpoint."""
    described = client.describe_endpoint(name)
    if described is None:
        fail(f"no endpoint named {name!r} (see `servelet endpoints list`)")
    return described


def read_body(body: str | None, file: Path | None) -> bytes:
    if body is not None and file is not None:
        fail("give the body once: as an argument or with --file", 2)
    if file is not None:
        if str(file) == "-":
            return sys.stdin.buffer.read()
        try:
            return file.read_bytes()
        except OSError as exc:
            fail(f"--file {file}: {exc.strerror or exc}", 2)
    if body is not None and body != "-":
        return body.encode()
    if body is None and sys.stdin.isatty():
        fail("no body: give it as an argument, with --file PATH, or on stdin (-)", 2)
    return sys.stdin.buffer.read()


def lmi_request(raw: bytes, max_new_tokens: int | None) -> object:
    """JSON as written; anything else is a prompt: {"inputs": TEXT}, TEXT without the newline `echo` adds."""
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, (dict, list)):
        try:
            payload = {"inputs": raw.decode().removesuffix("\n")}
        except UnicodeDecodeError:
            fail("the body is neither JSON nor UTF-8 text; give --content-type to send it as is", 2)
    if max_new_tokens is not None:
        if not isinstance(payload, dict):
            fail("--max-new-tokens needs a JSON object body", 2)
        parameters = payload.setdefault("parameters", {})
        if not isinstance(parameters, dict):
            fail("--max-new-tokens: the body's `parameters` is not an object", 2)
        parameters["max_new_tokens"] = max_new_tokens
    return payload


def token_text(part: bytes) -> str:
    """A JSON line's token text (LMI's `{"token": {"text": ...}}`); other parts print as they came."""
    try:
        line = json.loads(part)
    except (ValueError, UnicodeDecodeError):
        return part.decode(errors="replace")
    if isinstance(line, dict) and isinstance(line.get("token"), dict):
        return str(line["token"].get("text", ""))
    return part.decode(errors="replace")


# -- new ---------------------------------------------------------------------------------------------------------
@new_app.command("handler")
def new_handler(name: Annotated[Path, typer.Argument(help="The folder to create; its name is the model's.")]) -> None:
    """Write a working SageMaker inference.py handler folder: code/inference.py, a model, a test and a README."""
    from .templates import TemplateError, write_template

    try:
        written = write_template("handler", name)
    except TemplateError as exc:
        fail(str(exc), 2)
    for path in written:
        say(f"wrote {path}")
    say(f"test it with `pytest {name / 'test_handler.py'}`, deploy it with `servelet deploy {name} --name {name.resolve().name}`")


# -- catalog | catalog add | catalog remove ------------------------------------------------------------------------
catalog_app = typer.Typer(help="Models invoked by id: the first invocation deploys them as a serverless endpoint.")
app.add_typer(catalog_app, name="catalog")


@contextmanager
def local_store() -> Iterator["Store"]:
    """The store `servelet serve` reads (same SERVELET_DATA_DIR / SERVELET_DATABASE_URL): the catalog and the jobs
    need no running gateway. What it refuses ends the command with its message."""
    from .control.store import Store
    from .errors import GatewayError
    from .settings import database_url

    try:
        store = Store(database_url(load_gateway_settings()))
    except SettingsError as exc:
        fail(str(exc), 2)
    try:
        yield store
    except GatewayError as exc:
        fail(exc.message, 2)
    finally:
        store.close()


@catalog_app.callback(invoke_without_command=True)
def catalog(ctx: typer.Context) -> None:
    """A table of the ids that can be invoked (OpenAI `model`, boto3 `EndpointName`, WebSocket `endpoint`)."""
    if ctx.invoked_subcommand is not None:
        return
    from .control.catalog import catalog_entries

    with local_store() as store:
        table = Table("Id", "Model", "Source", highlight=False)
        for entry in catalog_entries(store):
            table.add_row(entry.model_id, entry.model_data_url, "built in" if entry.built_in else "added")
        out.print(table)
    say("invoke an id as an endpoint name: its first use deploys it as a serverless endpoint")


@catalog_app.command("add")
def catalog_add(
    name: Annotated[str, typer.Argument(help="The id callers will invoke (an endpoint name).")],
    uri: Annotated[str, typer.Argument(help="The model URI: a path, file://, s3://, http(s)://, package://.")],
) -> None:
    """Register a model under an id; nothing is deployed until the id is first invoked."""
    from .control.catalog import add_to_catalog

    with local_store() as store:
        add_to_catalog(store, name, uri)
    say(f"added {name}: {uri} (its first invocation deploys it)")


@catalog_app.command("remove")
def catalog_remove(name: Annotated[str, typer.Argument(help="The id to forget.")]) -> None:
    """Forget an id you added; an endpoint it already deployed keeps running (`servelet endpoints delete`)."""
    from .control.catalog import remove_from_catalog

    with local_store() as store:
        remove_from_catalog(store, name)
    say(f"removed {name}")


# -- jobs | jobs show ------------------------------------------------------------------------------------------------
jobs_app = typer.Typer(help="Async invocations (`servelet invoke --async`, boto3's invoke_endpoint_async), read from the store.")
app.add_typer(jobs_app, name="jobs")
JOB_TIMES = ("CreationTime", "EndTime", "ExpirationTime")


@jobs_app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Only this endpoint's jobs.")] = None,
    status: Annotated[Optional[str], typer.Option(
        "--status", help="Only jobs in this state: Pending, InProgress, Completed, Failed or Expired.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="The newest N jobs.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job, as GET /async-invocations/{id} answers.")] = False,
) -> None:
    """A table of the async invocations, newest first: where each stands, its attempts, and where its output went
    or why it failed (read from the store `servelet serve` writes, so no gateway needs to run)."""
    if ctx.invoked_subcommand is not None:
        return
    from .control.async_queue import JobQueue
    from .gateway.api.sagemaker_async import describe

    wanted = job_status(status) if status is not None else None
    with local_store() as store:
        shown = [describe(job) for job in JobQueue(store).list(endpoint, wanted, limit)]
    if as_json:
        for job in shown:
            print(json.dumps(job))
        return
    if not shown:
        say("no async invocations" + (" like that" if endpoint or status else "")
            + " (queue one with `servelet invoke ENDPOINT --async FILE`)")
        return
    table = Table("InferenceId", "Endpoint", "Status", "Attempts", "Created", "Ended", "Output or failure", highlight=False)
    for job in shown:
        table.add_row(job["InferenceId"], job["EndpointName"], job["Status"], str(job["Attempts"]), when(job["CreationTime"]),
                      when(job.get("EndTime")), job.get("FailureReason") or job["OutputLocation"])
    out.print(table)


@jobs_app.command("show")
def show_job(
    inference_id: Annotated[str, typer.Argument(help="The job's InferenceId.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print its fields as JSON.")] = False,
) -> None:
    """One async invocation with all its fields: what it was sent, where it stands, where its output goes."""
    from .control.async_queue import JobQueue

    with local_store() as store:
        job = JobQueue(store).get(inference_id)
    if job is None:
        fail(f"no async invocation has InferenceId {inference_id!r} (see `servelet jobs`)")
    shown = job_fields(job)
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    for label, value in shown.items():
        say(f"{label + ':':<26}{when(value) if label in JOB_TIMES else value}")


def job_fields(job) -> dict:
    """What the status route shows, and what the request asked for besides (its TTL, timeout, content types)."""
    from .gateway.api.sagemaker_async import describe

    asked = {
        "ContentType": job.content_type, "Accept": job.accept, "CustomAttributes": job.custom_attributes,
        "InlineInputBytes": len(job.inline_body) if job.inline_body is not None else None,
        "ExpirationTime": job.expires, "InvocationTimeoutSeconds": job.invocation_timeout, "Notified": job.notified,
    }
    return describe(job) | {key: value for key, value in asked.items() if value is not None}


def job_status(value: str) -> str:
    """The job status `value` names, in any case; anything else ends the command with the valid ones."""
    from .control.async_queue import JobStatus

    statuses = {status.value.lower(): status.value for status in JobStatus}
    if value.lower() not in statuses:
        fail(f"--status {value!r} is not a job status: give one of {', '.join(statuses.values())}", 2)
    return statuses[value.lower()]


# -- transform [run] | transform list | describe | stop --------------------------------------------------------------
class DefaultRunGroup(TyperGroup):
    """Lets `servelet transform MODEL INPUT OUTPUT` mean `servelet transform run MODEL INPUT OUTPUT`: Click cannot
    give a group positional arguments besides its subcommands, so what names no subcommand (nor asks for help)
    goes to `run` (a model named `list`, `describe`, `stop` or `run` needs the `run`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


transform_app = typer.Typer(
    cls=DefaultRunGroup, no_args_is_help=True,
    help="Batch transform jobs (boto3's create_transform_job): `servelet transform MODEL INPUT OUTPUT` runs one.",
)
app.add_typer(transform_app, name="transform")
TRANSFORM_ENDED = ("Completed", "Failed", "Stopped")
FAILURES_SHOWN = 5
JOB_PANEL = "The job (CreateTransformJob)"


@transform_app.command("run")
def transform_run(
    model: Annotated[str, typer.Argument(help="A model's name (CreateModel, `servelet deploy`), or a model URI or path: "
                                              "then a model named as the job is made of it, as `deploy` makes one.")],
    input: Annotated[str, typer.Argument(help="The inputs (S3Uri): an s3:// or file:// prefix, or a path (a folder: "
                                              "the files below it); with --manifest, a manifest file.")],
    output: Annotated[str, typer.Argument(help="Where the outputs go (S3OutputPath): s3://, file:// or a path; "
                                               "one <input>.out per input, keeping its relative key.")],
    name: Annotated[Optional[str], typer.Option("--name", "-n", help="The job's name (default: MODEL-YYYYMMDD-HHMMSS, UTC).")] = None,
    content_type: Annotated[str, typer.Option(help="ContentType of the records.", rich_help_panel=JOB_PANEL)] = "application/jsonlines",
    split: Annotated[str, typer.Option(help="SplitType: Line (a record a line) or None (a record a file).", rich_help_panel=JOB_PANEL)] = "Line",
    compression: Annotated[str, typer.Option(help="CompressionType of the inputs: None or Gzip.", rich_help_panel=JOB_PANEL)] = "None",
    strategy: Annotated[str, typer.Option(help="BatchStrategy: MultiRecord or SingleRecord.", rich_help_panel=JOB_PANEL)] = "MultiRecord",
    max_payload_mb: Annotated[Optional[int], typer.Option(help="MaxPayloadInMB, 1-100 (default 6).", rich_help_panel=JOB_PANEL)] = None,
    concurrency: Annotated[Optional[int], typer.Option(
        help="MaxConcurrentTransforms: requests at once per instance (× --max-payload-mb ≤ 100).", rich_help_panel=JOB_PANEL)] = None,
    instances: Annotated[Optional[int], typer.Option(help="InstanceCount: the job's own instances, 1-10 (default 1).", rich_help_panel=JOB_PANEL)] = None,
    assemble_with: Annotated[str, typer.Option(help="AssembleWith: Line (an answer a line) or None.", rich_help_panel=JOB_PANEL)] = "Line",
    accept: Annotated[Optional[str], typer.Option(help="Accept: the answers' content type.", rich_help_panel=JOB_PANEL)] = None,
    input_filter: Annotated[Optional[str], typer.Option(help="DataProcessing InputFilter (JSONPath).", rich_help_panel=JOB_PANEL)] = None,
    output_filter: Annotated[Optional[str], typer.Option(help="DataProcessing OutputFilter (JSONPath).", rich_help_panel=JOB_PANEL)] = None,
    join_input: Annotated[bool, typer.Option(help="DataProcessing JoinSource Input: each answer joined to its record.", rich_help_panel=JOB_PANEL)] = False,
    manifest: Annotated[bool, typer.Option(help="INPUT is a manifest file (S3DataType ManifestFile).", rich_help_panel=JOB_PANEL)] = False,
    timeout: Annotated[Optional[int], typer.Option(
        help="Seconds the model may take per request, 1-3600 (InvocationsTimeoutInSeconds, default 600).", rich_help_panel=JOB_PANEL)] = None,
    retries: Annotated[Optional[int], typer.Option(
        help="Retries of a failed request, 0-3 (InvocationsMaxRetries, default 3).", rich_help_panel=JOB_PANEL)] = None,
    wait: Annotated[bool, typer.Option(
        help="Show the job's progress until it ends; Ctrl-C stops the waiting, not the job (stop it with "
             "`servelet transform stop NAME`).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print DescribeTransformJob's answer (with --no-wait: once created).")] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """Run a batch transform job over INPUT's records and write the answers under OUTPUT, showing its progress; exit
    status 0 when it completes, 1 when it fails or is stopped."""
    name = name or job_name_for(model)
    settings = {
        "BatchStrategy": strategy, "MaxPayloadInMB": max_payload_mb, "MaxConcurrentTransforms": concurrency,
        "ModelClientConfig": given(InvocationsTimeoutInSeconds=timeout, InvocationsMaxRetries=retries) or None,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "ManifestFile" if manifest else "S3Prefix",
                                            "S3Uri": local_uri(input, folder=not manifest)}},
            "ContentType": content_type, "SplitType": split, "CompressionType": compression,
        },
        "TransformOutput": given(S3OutputPath=local_uri(output), AssembleWith=assemble_with, Accept=accept),
        "TransformResources": given(InstanceType="ml.m5.large", InstanceCount=instances),
        "DataProcessing": given(InputFilter=input_filter, OutputFilter=output_filter,
                                JoinSource="Input" if join_input else None) or None,
    }
    with gateway(url) as client:
        steps = job_model_steps(client, model, name)
        job = {"TransformJobName": name, "ModelName": name if steps else model} | given(**settings)
        create_all(client, name, [*steps, ("CreateTransformJob", job, None)])
        if not wait:
            if as_json:
                typer.echo(json.dumps(client.describe_transform_job(name), indent=2))
            else:
                say(f"transform job {name} is InProgress; follow it with `servelet transform describe {name}`, "
                    f"stop it with `servelet transform stop {name}`")
            return
        described = wait_for_transform(client, name)
    show_transform(described, as_json)
    if described["TransformJobStatus"] != "Completed":
        reason = described.get("FailureReason")
        fail(f"transform job {name} {described['TransformJobStatus']}" + (f": {reason}" if reason else ""))


def given(**fields) -> dict:
    """The fields set: the gateway's defaults (SageMaker's) stand for the others."""
    return {key: value for key, value in fields.items() if value is not None}


def job_name_for(model: str) -> str:
    """`<model>-<UTC timestamp>` as a valid SageMaker name: a URI's last part, without its file suffix, stands
    for the model; letters, digits and single hyphens only, 63 characters at most."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    last = re.split(r"[#?]", model)[0].rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"(\.tar\.gz|\.tgz|\.gguf|\.zip)$", "", last)
    base = re.sub(r"[^a-zA-Z0-9]+", "-", stem)[: 62 - len(stamp)].strip("-")
    return f"{base or 'transform'}-{stamp}"


def local_uri(value: str, folder: bool = False) -> str:
    """A path as a file:// URI of its absolute path (the gateway runs elsewhere in the file system); with `folder`,
    an existing directory means the files below it (a trailing slash: the prefix's directory is itself). s3://
    and file:// pass as given: SageMaker's prefix rules are the gateway's."""
    if "://" in value:
        return value
    path = Path(value).expanduser().resolve()
    slash = value.endswith("/") or (folder and path.is_dir())
    return f"file://{path}{'/' if slash and str(path) != '/' else ''}"


def job_model_steps(client: Client, model: str, name: str) -> list[Step]:
    """Nothing to make for a model in the store; a URI or path gets a model named as the job (deleted again
    if the job is refused)."""
    from .control.resources import NAME_PATTERN

    looks_like_name = re.fullmatch(NAME_PATTERN, model) is not None
    if looks_like_name and client.describe_model(model) is not None:
        return []
    if looks_like_name and not Path(model).exists():
        fail(f"no model named {model!r}: give a model URI (package://, file://, s3://, http(s)://, a path) or the "
             "name of a model in the store (CreateModel, `servelet deploy`)")
    return [model_step(name, local_model_uri(model))]


def wait_for_transform(client: Client, name: str) -> dict:
    """Poll DescribeTransformJob (its raw JSON, for servelet's Progress) every 0.2 s, growing to every 1 s, with a
    progress bar over the job's files, until the job ends; Ctrl-C ends the waiting, not the job (it is resumable
    and may be long: stopping it is asked for by name)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
               TimeElapsedColumn())
    pause = 0.2
    try:
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:  # the summary follows
            task = bar.add_task(name, total=None, counts="")
            while True:
                described = client.describe_transform_job(name)
                progress = described.get("Progress", {})
                bar.update(task, completed=progress.get("FilesDone", 0), total=progress.get("FilesTotal") or None,
                           counts=progress_words(described))
                if described["TransformJobStatus"] in TRANSFORM_ENDED:
                    return described
                time.sleep(pause)
                pause = min(pause * 1.5, 1.0)
    except KeyboardInterrupt:
        fail(f"stopped waiting for transform job {name}; it goes on in the gateway (follow it with "
             f"`servelet transform describe {name}`, stop it with `servelet transform stop {name}`)", 130)


def progress_words(described: dict) -> str:
    """Where a job stands, in one line: its status, records done and failed, files done of total."""
    progress = described.get("Progress", {})
    files = f"{progress.get('FilesDone', 0)}/{progress.get('FilesTotal') or '?'} files"
    return (f"{described['TransformJobStatus']}: {progress.get('RecordsDone', 0)} records done, "
            f"{progress.get('RecordsFailed', 0)} failed, {files}")


def show_transform(described: dict, as_json: bool) -> None:
    """DescribeTransformJob's answer as JSON, or in words: status, progress, the first failures, where the outputs are."""
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    name, output = described["TransformJobName"], described["TransformOutput"]["S3OutputPath"]
    source = described["TransformInput"]["DataSource"]["S3DataSource"]
    fields = [
        ("Job", name), ("Status", progress_words(described)), ("Model", described["ModelName"]),
        ("Input", f"{source['S3Uri']} ({source['S3DataType']})"),
        ("Outputs", f"{output} (one <input>.out per input)"),
        ("Created", when(described.get("CreationTime"))), ("Ended", when(described.get("TransformEndTime"))),
    ]
    if described["TransformJobStatus"] in ("Stopping", "Stopped"):
        fields.append(("Parts", f"{output.rstrip('/')}/.servelet-parts/{name}/ (kept: what was done)"))
    if described.get("FailureReason"):
        fields.append(("Failure", described["FailureReason"]))
    for label, value in fields:
        say(f"{label + ':':<9}{value}")
    failures = described.get("Progress", {}).get("RecordFailures", [])
    for failure in failures[:FAILURES_SHOWN]:
        say(f"  failed: file {failure['File']}, record {failure['Record']}: {failure['Reason']}")
    if len(failures) > FAILURES_SHOWN:
        say(f"  ... {len(failures) - FAILURES_SHOWN} more (`servelet transform describe {name} --json`)")


@transform_app.command("list")
def transform_list(
    status: Annotated[Optional[str], typer.Option(
        "--status", help="Only jobs in this state: InProgress, Completed, Failed, Stopping or Stopped.")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """A table of the transform jobs, newest first: status, progress, creation and end times, why one failed."""
    with gateway(url) as client:
        summaries = client.list_all("ListTransformJobs", "TransformJobSummaries", SortBy="CreationTime",
                                    SortOrder="Descending", **given(StatusEquals=status))
        if not summaries:
            say("no transform jobs" + (" like that" if status else "") + " (run one with `servelet transform MODEL INPUT OUTPUT`)")
            return
        table = Table(Column("Name", overflow="fold"), "Status", "Progress", "Created", "Ended", "Failure", highlight=False)
        for summary in summaries:
            described = client.describe_transform_job(summary["TransformJobName"])
            table.add_row(summary["TransformJobName"], summary["TransformJobStatus"],
                          progress_words(described).partition(": ")[2], when(summary.get("CreationTime")),
                          when(summary.get("TransformEndTime")), summary.get("FailureReason") or "-")
    out.print(table)


@transform_app.command("describe")
def transform_describe(
    name: Annotated[str, typer.Argument(help="The transform job.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print DescribeTransformJob's answer as it came (with Progress).")] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """A transform job: where it stands, its records done and failed (the first failures' reasons), its outputs."""
    with gateway(url) as client:
        show_transform(client.describe_transform_job(name), as_json)


@transform_app.command("stop")
def transform_stop(
    name: Annotated[str, typer.Argument(help="The transform job.")],
    wait: Annotated[bool, typer.Option(help="Wait until it is Stopped.")] = True,
    timeout: Timeout = 60.0,
    url: Url = DEFAULT_URL,
) -> None:
    """Stop a job InProgress (StopTransformJob): it stops within seconds, keeping the parts it wrote."""
    with gateway(url) as client:
        client.control("StopTransformJob", TransformJobName=name)
        status, start = "Stopping", time.monotonic()
        with err.status(f"{name}: stopping"):
            while wait and status not in TRANSFORM_ENDED and time.monotonic() - start < timeout:
                time.sleep(0.2)
                status = client.describe_transform_job(name)["TransformJobStatus"]
    if wait and status not in TRANSFORM_ENDED:
        fail(f"transform job {name!r} is still {status} after {timeout:g}s")
    say(f"transform job {name} is {status}" + ("" if wait else f"; follow it with `servelet transform describe {name}`"))


if __name__ == "__main__":
    app()


# -- keys create | keys list | keys revoke ---------------------------------------------------------------------------
keys_app = typer.Typer(help="API keys and SigV4 credentials for a gateway run with --auth (read from the store).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@contextmanager
def local_keys():
    """The keys in the store `servelet serve` reads, its SigV4 secrets under the same data folder's key file."""
    from .control.api_keys import ApiKeys, KeyRefused
    from .control.secret_box import SecretBox, SecretBoxError

    with local_store() as store:
        try:
            yield ApiKeys(store, SecretBox(load_gateway_settings().data_dir))
        except (KeyRefused, SecretBoxError) as exc:
            fail(str(exc), 2)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    scope: Annotated[list[str], typer.Option(
        "--scope", help="What it may do (repeat): admin, metrics, invoke:*, invoke:endpoint/NAME.")],
    aws: Annotated[bool, typer.Option("--aws", help="SigV4 credentials for boto3 (an access key id and secret).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the secret as JSON.")] = False,
) -> None:
    """Make a key; its secret is printed now and never again (the store keeps only a hash, or for --aws an
    encrypted secret)."""
    with local_keys() as keys:
        made = keys.create(name, scope, aws)
    if as_json:
        typer.echo(json.dumps(made.secrets))
        return
    for label, value in made.secrets.items():
        say(f"{label}: {value}")
    say(f"scopes: {' '.join(made.record.scopes)}")
    say("keep it now: it is not shown again (`servelet keys revoke` and create another if it is lost)")


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="One JSON object per key.")] = False) -> None:
    """The keys: name, kind, access key id, scopes, creation time (never a secret)."""
    with local_keys() as keys:
        records = keys.list()
    if as_json:
        for r in records:
            print(json.dumps({"name": r.name, "kind": r.kind, "access_key_id": r.access_key_id, "scopes": r.scopes,
                              "created": r.creation_time.isoformat()}))
        return
    if not records:
        say("no keys (make one with `servelet keys create NAME --scope SCOPE`)")
        return
    table = Table("Name", "Kind", "Access key id", "Scopes", "Created", highlight=False)
    for r in records:
        table.add_row(r.name, r.kind, r.access_key_id or "", " ".join(r.scopes), r.creation_time.strftime("%Y-%m-%d %H:%M"))
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Delete a key: a running gateway refuses it within seconds."""
    with local_keys() as keys:
        if not keys.revoke(name):
            fail(f"no key is named {name!r} (see `servelet keys list`)")
    say(f"revoked {name}")
