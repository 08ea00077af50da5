"""Tags on SageMaker resources: SageMaker's rules for them, and which resource an ARN names.

Tags are kept in the store by the resource's ARN (`arn()`, the one Describe answers) and go when the resource goes,
so a new resource of the same name starts without them. The rules are botocore's `Tag` and `TagList` (at most 50 a
resource; a key of 1 to 128 characters, a value of up to 256, both of letters, digits, spaces and `_.:/=+-@`; keys
starting with `aws:` are AWS's own): each breach is refused naming the tag and the rule.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated

from pydantic import AfterValidator

from .resources import Resource, arn

MAX_TAGS_PER_RESOURCE = 50
KEY_CHARACTERS = (1, 128)
MAX_VALUE_CHARACTERS = 256
RESERVED_PREFIX = "aws:"
# SageMaker's `[\p{L}\p{Z}\p{N}_.:/=+\-@]`: letters, separators and numbers in any script, and these.
OTHER_ALLOWED = frozenset("_.:/=+-@")
CHARACTER_RULE = "only letters, digits, spaces and _ . : / = + - @"
# The resources servelet tags, by the kind their ARNs name, and what SageMaker calls them in messages.
TAGGED_KINDS = {
    "model": "model", "endpoint-config": "endpoint configuration", "endpoint": "endpoint", "transform-job": "transform job",
}
ARN_PREFIX = arn("", "").removesuffix("/")  # this installation's `arn:aws:sagemaker:REGION:ACCOUNT:`
ARN_SHAPE = re.compile(r"^arn:aws[a-z-]*:sagemaker:[a-z0-9-]*:[0-9]{12}:.+$")
MAX_ARN_CHARACTERS = 256


def _allowed(text: str) -> bool:
    return all(c in OTHER_ALLOWED or unicodedata.category(c)[0] in "LZN" for c in text)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:200] + "...")


def check_key(key: str) -> str:
    low, high = KEY_CHARACTERS
    if not low <= len(key) <= high:
        raise ValueError(f"tag key {_shown(key)} has {len(key)} characters: {low} to {high}")
    if key.lower().startswith(RESERVED_PREFIX):
        raise ValueError(f"tag key {_shown(key)}: keys starting with {RESERVED_PREFIX!r} are reserved for AWS")
    if not _allowed(key):
        raise ValueError(f"tag key {_shown(key)}: {CHARACTER_RULE}")
    return key


def check_value(value: str) -> str:
    if len(value) > MAX_VALUE_CHARACTERS:
        raise ValueError(f"tag value {_shown(value)} has {len(value)} characters: at most {MAX_VALUE_CHARACTERS}")
    if not _allowed(value):
        raise ValueError(f"tag value {_shown(value)}: {CHARACTER_RULE}")
    return value


TagKey = Annotated[str, AfterValidator(check_key)]
TagValue = Annotated[str, AfterValidator(check_value)]


class Tag(Resource):
    """One tag as SageMaker takes it: a Key and a Value (which may be empty)."""

    key: TagKey
    value: TagValue


def by_key(tags: list[Tag]) -> dict[str, str]:
    """Tags by key; a key sent twice keeps its last value, as a second AddTags would."""
    return {tag.key: tag.value for tag in tags}


class TooManyTags(ValueError):
    def __init__(self, resource: str, count: int):
        super().__init__(
            f"{resource} would have {count} tags: at most {MAX_TAGS_PER_RESOURCE} per resource (delete some first)"
        )


class ArnInvalid(ValueError):
    """A ResourceArn that is not a SageMaker ARN of a kind servelet tags (rather than one naming nothing here)."""


def resource_of(resource_arn: str) -> tuple[str, str]:
    """The (kind, name) a ResourceArn names; ArnInvalid says what is wrong with one servelet could never tag."""
    if len(resource_arn) > MAX_ARN_CHARACTERS or not ARN_SHAPE.match(resource_arn):
        raise ArnInvalid(
            f"ResourceArn {_shown(resource_arn)} is not a SageMaker ARN of at most {MAX_ARN_CHARACTERS} characters "
            f"(such as {ARN_PREFIX}endpoint/NAME, as Describe operations answer it)"
        )
    kind, _, name = resource_arn.split(":", 5)[5].partition("/")
    if kind not in TAGGED_KINDS:
        raise ArnInvalid(
            f"ResourceArn {_shown(resource_arn)}: servelet tags {', '.join(TAGGED_KINDS)} resources "
            f"({ARN_PREFIX}KIND/NAME), not {kind!r}"
        )
    if not name:
        raise ArnInvalid(f"ResourceArn {_shown(resource_arn)} names no {TAGGED_KINDS[kind]}: {ARN_PREFIX}{kind}/NAME")
    return kind, name


def is_local(resource_arn: str) -> bool:
    """Whether the ARN is of this installation's region and account (resources of others are never here)."""
    return resource_arn.startswith(ARN_PREFIX)
