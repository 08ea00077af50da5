"""Extractive question answering: the answer is the span of the context the model scores highest.

`{"inputs": {"question", "context"}}` (or the two fields at the top level) answers `{"score", "start", "end",
"answer"}` with `answer == context[start:end]`, the shape of the gateway's `/question`; a list of pairs answers a
list. This is what transformers 4.x's question-answering pipeline did (transformers 5 removed it): long contexts
are read in overlapping windows, spans are scored with transformers' own `select_starts_ends`, and a span is
widened to whole words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import AutoModelForQuestionAnswering
from transformers.pipelines.document_question_answering import select_starts_ends

from ...settings import InstanceSettings, SettingsError
from ..base import InvocationError
from .folder import load_model, load_tokenizer
from .json_task import JsonTaskRuntime, TaskRequest

DEFAULT_MAX_SEQ_LEN = 384  # tokens per window, as the pipeline had it
DEFAULT_MAX_STRIDE = 128  # tokens two windows share


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class QuestionContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str
    context: str

    @field_validator("question", "context")
    @classmethod
    def _filled(cls, value: str | None) -> str | None:
        return _not_blank(value)


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(1, ge=1, le=100, description="Answers to return; above 1, a list best first.")
    max_answer_len: int = Field(15, ge=1, description="Longest answer, in tokens.")
    max_seq_len: int | None = Field(None, ge=16, description="Tokens per window (question + context).")
    doc_stride: int | None = Field(None, ge=0, description="Tokens two windows of a long context share.")
    handle_impossible_answer: bool = Field(False, description="Also offer the empty answer (the context has none).")
    align_to_words: bool = Field(True, description="Widen a span that starts or ends inside a word to the whole word.")


class QuestionRequest(TaskRequest):
    inputs: QuestionContext | list[QuestionContext] | None = None
    question: str | None = None
    context: str | None = None
    parameters: Parameters = Field(default_factory=Parameters)

    @field_validator("question", "context")
    @classmethod
    def _filled(cls, value: str | None) -> str | None:
        return _not_blank(value)

    @field_validator("inputs", mode="before")
    @classmethod
    def _pairs(cls, value):
        if value is not None and not isinstance(value, (dict, list)):
            raise ValueError('must be {"question": ..., "context": ...} or a list of them')
        return value

    @model_validator(mode="after")
    def _one_way(self):
        top_level = [n for n in ("question", "context") if getattr(self, n) is not None]
        if self.inputs is not None and top_level:
            raise ValueError(f"send the pair in inputs or at the top level, not both ({', '.join(top_level)} beside inputs)")
        if self.inputs is None and len(top_level) < 2:
            missing = " and ".join(n for n in ("question", "context") if n not in top_level)
            raise ValueError(f'{missing}: required; send {{"inputs": {{"question": ..., "context": ...}}}}')
        if self.inputs == []:
            raise ValueError("inputs: must not be an empty list")
        return self

    def pairs(self) -> list[QuestionContext]:
        if self.inputs is None:
            return [QuestionContext(question=self.question, context=self.context)]
        return self.inputs if isinstance(self.inputs, list) else [self.inputs]


class QuestionAnsweringRuntime(JsonTaskRuntime):
    task = "question-answering"
    request_type = QuestionRequest

    def __init__(self, path: Path, settings: InstanceSettings):
        super().__init__(path, settings)
        self.tokenizer = load_tokenizer(path)
        if not self.tokenizer.is_fast:
            raise SettingsError(f"{path.name}: question answering needs a fast tokenizer (tokenizer.json) for character offsets")
        self.model = load_model(AutoModelForQuestionAnswering, path, settings)
        trained = getattr(self.model.config, "max_position_embeddings", None)
        self.longest_window = min(n for n in (self.tokenizer.model_max_length, trained) if n)  # what the model reads
        self.max_seq_len = min(self.longest_window, DEFAULT_MAX_SEQ_LEN)

    def answer(self, request: QuestionRequest):
        answers = [self.answer_pair(pair, request.parameters) for pair in request.pairs()]
        return answers if isinstance(request.inputs, list) else answers[0]

    def answer_pair(self, pair: QuestionContext, p: Parameters) -> dict | list[dict]:
        windows = self.windows(pair, p)
        with torch.inference_mode():
            out = self.model(**{k: windows[k] for k in self.tokenizer.model_input_names if k in windows})
        starts_logits, ends_logits = out.start_logits.float().numpy(), out.end_logits.float().numpy()
        attention = windows["attention_mask"].numpy()
        answers, null_score = [], 1e6
        for i in range(len(starts_logits)):
            # Only context tokens (and [CLS], the "no answer" position) may hold the answer.
            p_mask = np.array([[0 if s == 1 else 1 for s in windows.sequence_ids(i)]])
            p_mask[0, windows["input_ids"][i].numpy() == self.tokenizer.cls_token_id] = 0
            starts, ends, scores, null_score = select_starts_ends(
                starts_logits[i : i + 1], ends_logits[i : i + 1], p_mask, attention[i : i + 1], null_score,
                p.top_k, p.handle_impossible_answer, p.max_answer_len,
            )
            for s, e, score in zip(starts, ends, scores):
                begin, end = self.characters(windows, i, int(s), int(e), p.align_to_words)
                answers.append({"score": float(score), "start": begin, "end": end, "answer": pair.context[begin:end]})
        if p.handle_impossible_answer:
            answers.append({"score": float(null_score), "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[: p.top_k]
        return answers[0] if p.top_k == 1 and answers else answers

    def windows(self, pair: QuestionContext, p: Parameters):
        """The question with each overlapping window of the context, as one padded batch."""
        if p.max_seq_len and p.max_seq_len > self.longest_window:
            raise InvocationError(422, f"parameters.max_seq_len: this model reads at most {self.longest_window} tokens at once")
        max_seq_len = p.max_seq_len or self.max_seq_len
        stride = p.doc_stride if p.doc_stride is not None else min(max_seq_len // 2, DEFAULT_MAX_STRIDE)
        try:
            return self.tokenizer(
                pair.question, pair.context, truncation="only_second", max_length=max_seq_len, stride=stride,
                return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt",
            )
        except Exception as exc:  # the tokenizer's own words: the question leaves no room, or the stride is too long
            raise InvocationError(
                422, f"the question and context do not fit windows of {max_seq_len} tokens with a stride of {stride}: {exc}"
            ) from None

    @staticmethod
    def characters(windows, i: int, start: int, end: int, align_to_words: bool) -> tuple[int, int]:
        """Character offsets in the context of tokens `start`..`end` of window `i` (widened to whole words)."""
        if align_to_words:
            first, last = windows.token_to_word(i, start), windows.token_to_word(i, end)
            if first is not None and last is not None:
                begin, end = windows.word_to_chars(i, first, sequence_index=1), windows.word_to_chars(i, last, sequence_index=1)
                return begin.start, end.end
        offsets = windows["offset_mapping"][i]
        return int(offsets[start][0]), int(offsets[end][1])
