"""Embeddings (feature-extraction): one vector per text, as sentence-transformers computes it.

`{"inputs": str | [str]}` answers `{"embeddings": [[float, ...], ...], "token_counts": [int, ...], "dimensions":
int}`: one vector per input (a single string still gets a list of one), and the tokens each input used, which
the OpenAI route reports as usage. A sentence-transformers folder is read the way that library reads it: the
encoder, then the pooling its `modules.json` names (`1_Pooling/config.json`), then L2 normalisation when a
Normalize module is listed, with its `max_seq_length` and lower-casing. A bare encoder gets mean pooling, as
sentence-transformers gives it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModel

from ...settings import InstanceSettings, SettingsError
from .folder import load_model, load_tokenizer
from .json_task import JsonTaskRuntime, TaskRequest, Texts

BATCH_SIZE = 32  # texts per forward pass: bounds the memory a long list of inputs takes
ST = "sentence_transformers.models."
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")  # sentence-transformers' order


class NoParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingRequest(TaskRequest):
    inputs: Texts
    parameters: NoParameters = Field(default_factory=NoParameters)


@dataclass(frozen=True)
class Pipeline:
    """How token states become one vector: pooling modes (concatenated), normalisation, input limits."""

    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = False
    max_seq_length: int | None = None
    lower_case: bool = False

    @classmethod
    def of(cls, path: Path) -> "Pipeline":
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            return cls()
        modules = json.loads(modules_file.read_text())
        kinds = [m["type"].removeprefix(ST) for m in modules]
        unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if unsupported:
            raise SettingsError(
                f"{path.name}: modules.json lists {', '.join(unsupported)}, which servelet cannot apply "
                "(it applies Transformer, Pooling, Normalize)"
            )
        modes: tuple[str, ...] = ("mean_tokens",)
        for module in modules:
            if module["type"].removeprefix(ST) == "Pooling":
                config = json.loads((path / module["path"] / "config.json").read_text())
                asked = [k.removeprefix("pooling_mode_") for k, on in config.items() if k.startswith("pooling_mode_") and on]
                if not asked or any(m not in POOLING_MODES for m in asked):
                    raise SettingsError(
                        f"{path.name}: pooling {', '.join(asked) or 'by no mode'} is not supported "
                        f"(supported: {', '.join(POOLING_MODES)})"
                    )
                modes = tuple(m for m in POOLING_MODES if m in asked)
        settings_file = path / "sentence_bert_config.json"
        st_settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        return cls(modes, "Normalize" in kinds, st_settings.get("max_seq_length"), bool(st_settings.get("do_lower_case")))

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.unsqueeze(-1).to(states.dtype)
        counts = mask.sum(1).clamp(min=1e-9)
        parts = []
        for mode in self.modes:
            if mode == "cls_token":
                parts.append(states[:, 0])
            elif mode == "max_tokens":
                parts.append(states.masked_fill(mask == 0, -1e9).max(1).values)
            elif mode == "mean_tokens":
                parts.append((states * mask).sum(1) / counts)
            else:  # mean_sqrt_len_tokens
                parts.append((states * mask).sum(1) / counts.sqrt())
        vectors = torch.cat(parts, dim=1)
        return torch.nn.functional.normalize(vectors, p=2, dim=1) if self.normalize else vectors


class EmbeddingRuntime(JsonTaskRuntime):
    task = "feature-extraction"
    request_type = EmbeddingRequest

    def __init__(self, path: Path, settings: InstanceSettings):
        super().__init__(path, settings)
        self.pipeline = Pipeline.of(path)
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(AutoModel, path, settings)
        trained = getattr(self.model.config, "max_position_embeddings", None)
        self.max_seq_length = min(n for n in (self.pipeline.max_seq_length, self.tokenizer.model_max_length, trained) if n)

    def answer(self, request: EmbeddingRequest) -> dict:
        texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
        vectors, counts = self.embed(texts)
        return {"embeddings": vectors, "token_counts": counts, "dimensions": len(vectors[0])}

    def answer_many(self, requests: list[EmbeddingRequest]) -> list[dict]:
        """Every line's texts in shared forward passes (BATCH_SIZE texts each), then each line's answer."""
        texts = [[r.inputs] if isinstance(r.inputs, str) else r.inputs for r in requests]
        vectors, counts = self.embed([text for group in texts for text in group])
        answers, at = [], 0
        for group in texts:
            answers.append({"embeddings": vectors[at : at + len(group)], "token_counts": counts[at : at + len(group)],
                            "dimensions": len(vectors[0])})
            at += len(group)
        return answers

    def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """Pooled vectors and token counts, BATCH_SIZE texts per forward pass."""
        if self.pipeline.lower_case:
            texts = [t.lower() for t in texts]
        vectors, counts = [], []
        for at in range(0, len(texts), BATCH_SIZE):
            batch = self.tokenizer(
                texts[at : at + BATCH_SIZE], padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
            )
            with torch.inference_mode():
                states = self.model(**{k: batch[k] for k in self.tokenizer.model_input_names if k in batch}).last_hidden_state
                vectors += self.pipeline.pool(states, batch["attention_mask"]).float().tolist()
            counts += batch["attention_mask"].sum(1).tolist()
        return vectors, counts

    def facts(self) -> dict:
        return super().facts() | {"max_input_tokens": self.max_seq_length}
