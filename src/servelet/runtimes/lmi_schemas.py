"""The LMI request body of `POST /invocations`, and how its validation errors read."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..engine import GenerationParams


class InvocationRequest(BaseModel):
    """`{"inputs": str | [str], "parameters": {...}, "stream": bool}`, as LMI containers take it."""

    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str] = Field(..., description="A prompt, or a list of prompts answered as a list.")
    parameters: GenerationParams = Field(default_factory=GenerationParams)
    stream: bool = Field(False, description="Answer JSON lines, one per token, as they are generated.")

    @field_validator("inputs")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if value == "" or value == []:
            raise ValueError("inputs must not be empty")
        if isinstance(value, list) and any(v == "" for v in value):
            raise ValueError("inputs must not contain empty strings")
        return value


ACCEPTED_PARAMETERS = ", ".join(sorted(GenerationParams.model_fields))


def describe(exc: ValidationError) -> str:
    """One line per problem, naming the field the way the client wrote it."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if not isinstance(p, str) or not p.startswith("function-"))
        if err["type"] == "extra_forbidden":
            if where.startswith("parameters."):
                lines.append(f"{where}: unknown parameter (accepted: {ACCEPTED_PARAMETERS})")
            else:
                lines.append(f"{where}: unknown field (accepted: inputs, parameters, stream)")
        elif err["type"] == "missing":
            lines.append(f"{where}: required")
        else:
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)
