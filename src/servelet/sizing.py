"""`servelet size`: will this model, at this batch and context, fit in this machine's memory?

The arithmetic users otherwise do by hand: weights (the files' size) plus the KV cache, which holds for every
token 2 (K and V) × layers × KV heads × head dim × bytes per element.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .control.resources import EndpointConfigSpec, ModelSpec

# llama.cpp keeps its KV cache in f16 unless told otherwise (--cache-type-k/v).
LLAMACPP_KV_BYTES = 2
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
# transformers loads a config without a dtype in float32.
DEFAULT_HF_DTYPE = "float32"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class SizingError(ValueError):
    """The artifact does not say what sizing needs; the message names what is missing."""


@dataclass
class ModelShape:
    """What the KV arithmetic needs from a model, and where it was read."""

    source: str  # "gguf" or "huggingface"
    name: str
    layers: int
    kv_heads: int
    key_dim: int
    value_dim: int
    kv_dtype: str
    kv_bytes_per_element: int
    weights_bytes: int
    context_length: int | None = None
    sliding_window: int | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * (self.key_dim + self.value_dim) * self.kv_bytes_per_element


@dataclass
class Sizing:
    """The answer: every figure and the arithmetic that led to it."""

    model: str
    shape: ModelShape
    batch: int
    context: int
    kv_bytes_per_token: int
    kv_tokens: int
    kv_bytes: int
    total_bytes: int
    available_bytes: int | None
    fits: bool | None
    formula: str
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def model_shape(path: Path) -> ModelShape:
    """Read the shape from a GGUF header or a Hugging Face folder's config.json."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return huggingface_shape(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return gguf_shape(ggufs[0])
        raise SizingError(f"{path}: neither a Hugging Face folder (no config.json) nor a folder with one .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SizingError(f"{path}: not a GGUF file nor a Hugging Face folder")
    return gguf_shape(path)


def gguf_shape(path: Path) -> ModelShape:
    from .engine.llama import gguf_metadata, log as llama_log  # llama.cpp reads the header in C

    llama_log.setLevel(logging.ERROR)  # its warnings about the vocabulary say nothing about the model's size
    try:
        fields = gguf_metadata(path)
    except RuntimeError as exc:
        raise SizingError(str(exc)) from None

    def value(key: str, required: bool = True):
        found = fields.get(key)
        if found is None:
            if required:
                raise SizingError(f"{path.name}: the GGUF header has no {key}")
            return None
        try:
            return json.loads(found)  # numbers, and per-layer arrays written "[1, 1, ...]"
        except ValueError:
            return found

    arch = value("general.architecture")
    heads = value(f"{arch}.attention.head_count")
    kv_heads = value(f"{arch}.attention.head_count_kv", required=False)
    kv_heads = heads if kv_heads is None else kv_heads
    layers = value(f"{arch}.block_count")
    if isinstance(kv_heads, list):  # per-layer counts (some architectures vary them): the average layer
        kv_heads = sum(kv_heads) / len(kv_heads)
    head_dim = value(f"{arch}.attention.key_length", required=False) or value(f"{arch}.embedding_length") // _first(heads)
    value_dim = value(f"{arch}.attention.value_length", required=False) or head_dim
    return ModelShape(
        source="gguf",
        name=fields.get("general.name") or path.stem,
        layers=layers,
        kv_heads=kv_heads,
        key_dim=head_dim,
        value_dim=value_dim,
        kv_dtype="f16 (llama.cpp's default KV cache)",
        kv_bytes_per_element=LLAMACPP_KV_BYTES,
        weights_bytes=path.stat().st_size,
        context_length=value(f"{arch}.context_length", required=False),
        sliding_window=value(f"{arch}.attention.sliding_window", required=False),
    )


def _first(heads):
    return heads[0] if isinstance(heads, list) else heads


def huggingface_shape(folder: Path) -> ModelShape:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise SizingError(f"{config_path}: not valid JSON ({exc})") from None
    text = (config.get("text_config") or config) if isinstance(config, dict) else None  # multimodal configs nest it
    if not isinstance(text, dict):
        raise SizingError(f"{config_path}: not a model config (a JSON object)")
    needed = ("num_hidden_layers", "num_attention_heads") + (() if text.get("head_dim") else ("hidden_size",))
    missing = [k for k in needed if not (isinstance(text.get(k), int) and text[k] > 0)]
    if missing:
        raise SizingError(f"{config_path}: no positive {' and no positive '.join(missing)}, so the KV cache cannot be sized")
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    dtype = str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or config.get("dtype") or DEFAULT_HF_DTYPE)
    dtype = dtype.removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise SizingError(f"{folder / 'config.json'}: dtype {dtype!r} is not one sizing knows ({', '.join(DTYPE_BYTES)})")
    weights = sum(f.stat().st_size for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern))
    if not weights:
        raise SizingError(f"{folder}: no weights (*.safetensors or *.bin files)")
    return ModelShape(
        source="huggingface",
        name=config.get("_name_or_path") or folder.name,
        layers=text["num_hidden_layers"],
        kv_heads=text.get("num_key_value_heads") or heads,
        key_dim=head_dim,
        value_dim=head_dim,
        kv_dtype=dtype,
        kv_bytes_per_element=DTYPE_BYTES[dtype],
        weights_bytes=weights,
        context_length=text.get("max_position_embeddings"),
        sliding_window=text.get("sliding_window"),
    )


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo: what the kernel can hand out without swapping (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def size(model: str, path: Path, batch: int, context: int, available: int | None = None) -> Sizing:
    """Weights + KV cache for `batch` sequences of `context` tokens, against the memory available now."""
    if batch < 1 or context < 1:
        raise SizingError("--batch and --context must be at least 1")
    shape = model_shape(path)
    per_token = shape.kv_bytes_per_token
    tokens = batch * context
    kv = int(per_token * tokens)
    total = shape.weights_bytes + kv
    available = available_memory() if available is None else available
    notes = [
        "not counted: activations, the runtime's own buffers and the process (often a few hundred MiB)",
        "not counted: llama.cpp models' prefix cache, SERVELET_PREFIX_CACHE tokens more (16,384 unless set)",
    ]
    if shape.context_length and context > shape.context_length:
        notes.append(f"--context {context} exceeds the model's training context of {shape.context_length} tokens")
    if shape.sliding_window:
        notes.append(
            f"the model uses sliding-window attention (window {shape.sliding_window} tokens) on some layers: "
            "runtimes that keep smaller caches for those layers (llama.cpp does) need less KV memory than this "
            "upper bound, which counts every layer at full length"
        )
    return Sizing(
        model=model,
        shape=shape,
        batch=batch,
        context=context,
        kv_bytes_per_token=int(per_token),
        kv_tokens=tokens,
        kv_bytes=kv,
        total_bytes=total,
        available_bytes=available,
        fits=None if available is None else total <= available,
        formula=kv_formula(shape),
        notes=notes,
    )


def kv_formula(shape: ModelShape) -> str:
    heads = f"{shape.kv_heads:g} KV heads"
    if shape.key_dim == shape.value_dim:
        dims = f"2 × {shape.layers} layers × {heads} × {shape.key_dim} head dim"
    else:
        dims = f"{shape.layers} layers × {heads} × ({shape.key_dim} K dim + {shape.value_dim} V dim)"
    return f"{dims} × {shape.kv_bytes_per_element} bytes = {shape.kv_bytes_per_token:,.0f} bytes"


def human(n: float | None) -> str:
    """Bytes in binary units, as free(1) and the GGUF tools print them."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:,.2f} TiB"


def rows(s: Sizing) -> list[tuple[str, str]]:
    """The table `servelet size` prints: each figure beside how it was reached."""
    shape = s.shape
    verdict = "unknown (no /proc/meminfo)" if s.fits is None else ("yes" if s.fits else "NO")
    return [
        ("model", f"{shape.name} ({shape.source})"),
        ("weights", f"{human(shape.weights_bytes)} (file size{'s' if shape.source == 'huggingface' else ''})"),
        ("KV cache dtype", shape.kv_dtype),
        ("KV cache per token", f"{human(s.kv_bytes_per_token)} = {s.formula}"),
        ("KV cache, batch × context", f"{human(s.kv_bytes)} = {s.kv_bytes_per_token:,} bytes × {s.batch} × {s.context} tokens"),
        ("weights + KV cache", f"{human(s.total_bytes)}"),
        ("available now", f"{human(s.available_bytes)} (MemAvailable in /proc/meminfo)"),
        ("fits", verdict + ("" if s.fits is None else f" ({human(s.total_bytes)} {'≤' if s.fits else '>'} {human(s.available_bytes)})")),
    ]


# -- serverless variants --------------------------------------------------------------------------------------
# Lambda's ratio: memory buys CPU, one vCPU per 1,769 MB.
MB_PER_VCPU = 1769
# Model URIs sized at create time: local ones; a remote artifact is not fetched just to be sized.
LOCAL_SCHEMES = ("package", "file", "")
SIZE_TIMEOUT_S = 60.0


def serverless_threads(memory_mb: int, cores: int) -> int:
    """Threads for a serverless instance of `memory_mb`, as Lambda gives CPU: memory / 1,769 MB, 1 to `cores`."""
    return max(1, min(cores, memory_mb // MB_PER_VCPU))


def serverless_memory_problem(model: str, uri: str | None, environment: dict[str, str], memory_mb: int) -> str | None:
    """Why `model` cannot fit in a serverless variant of `memory_mb`, with the sizing figures; None if it fits
    or cannot be sized here (a remote URI, an unreadable artifact: the instance reports those when it starts)."""
    sized = _sized(uri, environment)
    if sized is None:
        return None
    figures, what = sized
    mb = 1024 * 1024
    total, weights, kv = figures["total_bytes"] / mb, figures["shape"]["weights_bytes"] / mb, figures["kv_bytes"] / mb
    if total <= memory_mb:
        return None
    return (
        f"model {model} needs about {total:,.0f} MB (weights {weights:,.0f} MB + KV cache {kv:,.0f} MB for {what}) "
        f"but ServerlessConfig.MemorySizeInMB is {memory_mb}: choose a larger MemorySizeInMB, or give the model "
        "a smaller SERVELET_MAX_BATCH_SIZE (OPTION_MAX_ROLLING_BATCH_SIZE) or SERVELET_MAX_MODEL_LEN (OPTION_MAX_MODEL_LEN) "
        "in its Environment"
    )


def serverless_memory_for(uri: str, environment: dict[str, str], cores: int) -> int:
    """The MemorySizeInMB to deploy `uri` serverless with when nobody chose one (invoke by id): the smallest step
    that holds its weights and KV cache and buys up to two vCPUs of the machine's `cores` (one thread decodes
    slowly; more would take the cores every other instance shares). The largest step when it cannot be sized."""
    from .control.resources import SERVERLESS_MEMORY_SIZES as STEPS

    sized = _sized(uri, environment)
    if sized is None:
        return STEPS[-1]
    needed = max(sized[0]["total_bytes"] / (1024 * 1024), MB_PER_VCPU * min(cores, 2))
    return next((step for step in STEPS if step >= needed), STEPS[-1])


def _sized(uri: str | None, environment: dict[str, str]) -> tuple[dict, str] | None:
    """`python -m servelet.sizing`'s figures for `uri` at the batch and context its instances would run with, and
    those in words; None when it cannot be sized here. A subprocess, as `servelet size`, so the gateway never
    loads llama.cpp."""
    import os
    import subprocess
    import sys
    from urllib.parse import urlparse

    from pydantic import ValidationError

    from .settings import InstanceSettings

    scheme = urlparse(uri or "").scheme.lower()
    if not uri or (scheme not in LOCAL_SCHEMES and len(scheme) > 1):  # one letter: a Windows drive
        return None
    try:
        settings = InstanceSettings(**environment)  # the batch and context its instances will run with
    except ValidationError:
        return None  # the instance refuses those settings itself, naming them
    if settings.kv_cache_tokens is not None:
        batch, context, what = 1, settings.kv_cache_tokens, f"a shared pool of {settings.kv_cache_tokens} tokens"
    else:
        batch, context = settings.max_batch_size, settings.max_model_len
        what = f"{batch} sequences × {context} tokens"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "servelet.sizing", uri, str(batch), str(context)],
            capture_output=True, text=True, timeout=SIZE_TIMEOUT_S, env=os.environ | environment,
        )
        figures = json.loads(done.stdout) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError):
        figures = None
    return None if figures is None else (figures, what)


def serverless_memory_problems(config: EndpointConfigSpec, models: Mapping[str, ModelSpec]) -> list[tuple[int, str]]:
    """(variant index, why) for each serverless variant of `config` whose model (among `models`) cannot fit."""
    problems = []
    for index, variant in enumerate(config.production_variants):
        model = models.get(variant.model_name)
        if variant.serverless_config is None or model is None:
            continue
        memory = variant.serverless_config.memory_size_in_mb
        problem = serverless_memory_problem(model.model_name, model.uri, model.instance_environment(), memory)
        if problem:
            problems.append((index, problem))
    return problems


if __name__ == "__main__":  # python -m servelet.sizing URI BATCH CONTEXT: the figures as JSON (serverless_memory_problem)
    import sys

    from .artifacts import resolve_model

    uri, batch, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(size(uri, resolve_model(uri), batch, context).as_json())
