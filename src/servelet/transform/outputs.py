"""Where a transform job's answers go and how they are put together (SageMaker's TransformOutput)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import objects
from . import choices
from .inputs import InputObject

LINE_END = b"\n"


def output_uri(output_path: str, input_object: InputObject) -> str:
    """`<S3OutputPath>/<name>.out`, keeping the input's relative key (`a/b.jsonl` -> `out/a/b.jsonl.out`) as
    SageMaker does, so inputs with the same file name in different folders do not overwrite each other's output."""
    return objects.join(output_path, f"{input_object.name}.out")


@dataclass(frozen=True)
class Assembler:
    """AssembleWith: `None` writes the responses as they come; `Line` ends each with a newline unless it already
    ends with one, so a one-line answer is one output line and a MultiRecord answer of one line per record keeps
    its lines (an empty answer still makes its line, keeping outputs aligned with inputs)."""

    assemble_with: str = "None"

    def __post_init__(self) -> None:
        object.__setattr__(self, "assemble_with", choices.assemble_with(self.assemble_with))

    def assemble(self, response: bytes) -> bytes:
        if self.assemble_with == "Line" and not response.endswith(LINE_END):
            return response + LINE_END
        return response
