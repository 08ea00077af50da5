"""Choosing the next token and spelling it out, one token at a time."""

from __future__ import annotations

import random

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from ...engine.params import GenerationParams

DETOKENIZE_CONTEXT = 5  # tokens decoded before a new one, so that its leading space survives decoding


class Sampler:
    """The next token: penalties, then (when sampling) temperature, top-k, top-p, as transformers' generate."""

    def __init__(self, params: GenerationParams):
        self.params = params
        self.processors = LogitsProcessorList()
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.sampling:
            if params.temperature is not None and params.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p is not None and params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(params.top_p))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self, logits: torch.Tensor, history: list[int]) -> tuple[int, float]:
        """The token, and its log-probability under the model's own distribution."""
        scores = logits[None]
        seen = torch.tensor([history])
        if self.params.frequency_penalty or self.params.presence_penalty:
            counts = torch.bincount(seen[0], minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
            used = (counts > 0).to(scores.dtype)
            scores = scores - self.params.frequency_penalty * counts - self.params.presence_penalty * used
        scores = self.processors(seen, scores)
        if self.params.sampling:
            token = int(torch.multinomial(torch.softmax(scores[0], -1), 1, generator=self.generator))
        else:
            token = int(scores[0].argmax())
        return token, float(torch.log_softmax(logits, -1)[token])


class Detokenizer:
    """The text each new token adds. Decoding a token alone can drop its leading space (SentencePiece) or split a
    character, so each token is decoded with the few before it, and text ending in a partial character waits."""

    def __init__(self, tokenizer, prompt: list[int], skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids = list(prompt[-DETOKENIZE_CONTEXT:])
        self.prefix = self.read = len(self.ids)

    def add(self, token: int, final: bool) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=self.skip_special)
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=self.skip_special)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]
