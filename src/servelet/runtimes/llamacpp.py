"""GGUF models on llama.cpp, through servelet's continuous-batching engine."""

from __future__ import annotations

from pathlib import Path

from ..settings import InstanceSettings, SettingsError
from .lmi import TextGenerationRuntime


class LlamaCppRuntime(TextGenerationRuntime):
    name = "llamacpp"

    def __init__(self, path: Path, settings: InstanceSettings, prepared_model=None):
        """`prepared_model`: the model and context `prepare` opened in a snapshot template, this instance's by fork."""
        refuse_options_llamacpp_cannot_apply(settings)
        from ..engine import Engine  # loads llama.cpp: only in an instance that serves a GGUF

        super().__init__(Engine(prepared_model or path, settings.engine_config()))
        self.settings = settings
        if prepared_model is not None:
            return  # a snapshot start: its build passed its self-test at install, and the first token is what counts
        try:
            self.engine.warm_up()  # a build that crashes here does so before ready: the deployment fails, not a request
        except Exception:
            self.engine.close()
            raise

    def facts(self) -> dict:
        model = self.engine.model
        return super().facts() | {
            "name": model.name,
            "context_length": self.engine.max_model_len,
            "max_batch_size": self.settings.max_batch_size,
            "max_tokens_per_request": self.settings.max_tokens_per_request,
            "chat_template": model.chat_template,
            "bos_token": model.bos_text,
            "eos_token": model.eos_text,
        }


def refuse_options_llamacpp_cannot_apply(settings: InstanceSettings) -> None:
    """LMI options that mean something to other backends but not to llama.cpp on CPU: refused, naming each."""
    problems = []
    if settings.rolling_batch not in ("auto", "llamacpp"):
        problems.append(f"OPTION_ROLLING_BATCH: '{settings.rolling_batch}' cannot serve a GGUF file (accepted: auto, llamacpp)")
    if settings.dtype != "auto":
        problems.append(f"OPTION_DTYPE: '{settings.dtype}' cannot apply: a GGUF file carries its own (quantized) weight types (accepted: auto)")
    if settings.tensor_parallel_degree not in ("1", "max"):
        problems.append(
            f"TENSOR_PARALLEL_DEGREE: '{settings.tensor_parallel_degree}' cannot apply: llama.cpp on CPU runs the model on one device (accepted: 1, max)"
        )
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))


def prepare(path: Path, settings: InstanceSettings):
    """For a snapshot template: the model loaded with its context open (None on an AMX build: see Engine.prepare)."""
    refuse_options_llamacpp_cannot_apply(settings)
    from ..engine import Engine

    return Engine.prepare(path, settings.engine_config())


def load(path: Path, settings: InstanceSettings, prepared_model=None) -> LlamaCppRuntime:
    return LlamaCppRuntime(path, settings, prepared_model)
