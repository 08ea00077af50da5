"""Text classification through transformers' own pipeline, so answers are exactly what it gives.

`{"inputs": str | [str], "parameters": {"top_k", "function_to_apply"}}` answers as the pipeline does: a string
gets `[{"label", "score"}]` (its best label, or its `top_k` best), a list gets one entry per text. Labels come
from the model's `id2label`. Texts longer than the model takes are truncated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForSequenceClassification, pipeline

from ...settings import InstanceSettings
from .folder import load_model, load_tokenizer
from .json_task import JsonTaskRuntime, TaskRequest, Texts


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(None, ge=1, description="Labels per text, best first; unset: the best one.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="How logits become scores; unset: the model's problem type decides."
    )


class ClassificationRequest(TaskRequest):
    inputs: Texts
    parameters: Parameters = Field(default_factory=Parameters)


class ClassificationRuntime(JsonTaskRuntime):
    task = "text-classification"
    request_type = ClassificationRequest

    def __init__(self, path: Path, settings: InstanceSettings):
        super().__init__(path, settings)
        model = load_model(AutoModelForSequenceClassification, path, settings)
        tokenizer = load_tokenizer(path)
        self.pipeline = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
        # A tokenizer saved without model_max_length would not truncate at all: the model's positions bound it too.
        trained = getattr(model.config, "max_position_embeddings", None)
        self.max_length = min(n for n in (tokenizer.model_max_length, trained) if n)

    def answer(self, request: ClassificationRequest):
        parameters = request.parameters.model_dump(exclude_none=True)
        return self.pipeline(request.inputs, truncation=True, max_length=self.max_length, **parameters)

    def facts(self) -> dict:
        return super().facts() | {"labels": list(self.pipeline.model.config.id2label.values())}
