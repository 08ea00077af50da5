"""Per-request generation parameters, validated once at the edge (LMI / TGI spelling)."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from ..prompt_spans import Span, check_spans
from .errors import ContextOverflow, InvalidRequest

MAX_STOP_SEQUENCES = 16
DEFAULT_MAX_NEW_TOKENS = 256  # when a request does not say: what fits in the context, at most this
TOKENS_SETTING = "SERVELET_MAX_TOKENS_PER_REQUEST"
CONTEXT_SETTING = "SERVELET_MAX_MODEL_LEN"


class GenerationParams(BaseModel):
    """What a caller may ask of one generation; unknown names are refused, not ignored, and so are NaN and
    infinities (JSON has neither, but Python's json writes them), named as such rather than as out of range."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    max_new_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most; defaults to what fits, capped at 256."
    )
    temperature: float | None = Field(None, ge=0.0, le=100.0, description="0 means greedy.")
    top_k: int | None = Field(None, ge=0, description="0 disables top-k.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    # OpenAI's and vLLM's additive penalties (llama.cpp applies them over the prompt and the output so far).
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Lowers a token's logit by this per use.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Lowers a used token's logit by this once.")
    do_sample: bool = False
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: list[str] = Field(
        default_factory=list,
        max_length=MAX_STOP_SEQUENCES,
        validation_alias=AliasChoices("stop", "stop_sequences"),
    )
    include_stop_str_in_output: bool = Field(
        False, description="Keep the stop sequence that ended the text in it, as TGI does (vLLM's name)."
    )
    details: bool = Field(False, description="Return finish reason, token counts and per-token log-probs.")
    ignore_eos: bool = Field(False, validation_alias=AliasChoices("ignore_eos", "ignore_eos_token"))
    literal_spans: list[Span] = Field(
        default_factory=list, description="[start, end) character ranges of the prompt that are plain text: markup "
        "like <start_of_turn> in them is not parsed as special tokens (servelet's gateway sets them for chat messages "
        "and QA questions and contexts).",
    )
    answer_span: Span | None = Field(
        None, description="[start, end) character range of the prompt (a QA context) the answer must be copied from: "
        "each generated token continues a run of that range's own tokens, or ends the answer (end of text, end of "
        "turn, a line break); log-probs are then among the allowed tokens. Greedy decoding only.",
    )
    skip_special_tokens: bool = Field(
        True, description="Leave special tokens (control tokens, markers like <start_of_image>) out of the text, as "
        "vLLM does; false shows them.",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("literal_spans")
    @classmethod
    def _ordered_spans(cls, value: list[Span]) -> list[Span]:
        return check_spans(value)

    @field_validator("answer_span")
    @classmethod
    def _a_span(cls, value: Span | None) -> Span | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError(f"answer_span: [{value[0]}, {value[1]}) is empty or negative")
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop sequences must not be empty strings")
        return value

    @property
    def sampling(self) -> bool:
        """TGI's rule: sample when asked to, or when any warper changes the distribution; temperature 0 is greedy."""
        if self.temperature == 0:
            return False
        warped = (
            (self.temperature is not None and self.temperature != 1.0)
            or bool(self.top_k)
            or (self.top_p is not None and self.top_p < 1.0)
        )
        return self.do_sample or warped

    @property
    def penalised(self) -> bool:
        repetition = self.repetition_penalty is not None and self.repetition_penalty != 1.0
        return repetition or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def allowed_new_tokens(n_prompt: int, params: GenerationParams, max_model_len: int, limit: int | None = None) -> int:
    """The tokens a request may generate after its `n_prompt` prompt tokens; refuses one that asks for more than
    `limit` (SERVELET_MAX_TOKENS_PER_REQUEST) or cannot fit in the context (SERVELET_MAX_MODEL_LEN)."""
    if limit is not None and params.max_new_tokens is not None and params.max_new_tokens > limit:
        raise InvalidRequest(
            f"max_new_tokens is {params.max_new_tokens}, over the limit of {limit} tokens per request "
            f"({TOKENS_SETTING})"
        )
    room = max_model_len - n_prompt
    if params.max_new_tokens is None:
        if room < 1:
            raise ContextOverflow(
                f"the input has {n_prompt} tokens, which leaves no room to generate within the "
                f"context length of {max_model_len} tokens ({CONTEXT_SETTING})"
            )
        return min(DEFAULT_MAX_NEW_TOKENS, room, limit or room)
    if params.max_new_tokens > room:
        raise ContextOverflow(
            f"the input has {n_prompt} tokens and max_new_tokens is {params.max_new_tokens}: together "
            f"{n_prompt + params.max_new_tokens} exceed the context length of {max_model_len} tokens ({CONTEXT_SETTING})"
        )
    return params.max_new_tokens
