"""SageMaker's tag operations (AddTags, ListTags, DeleteTags) and the `Tags` member of the Create operations.

They join sagemaker_control's registry, as the transform operations do. A Create operation's `Tags` are taken off
its body and checked before it runs (bad tags create nothing), then stored under the ARN it answers. The rules are
control/tags.py's; every refusal is a ValidationException, as the service model lists no other error for these.
"""

from __future__ import annotations

import asyncio

from pydantic import Field, create_model

from ...control.plane import ControlPlane
from ...control.resources import Resource
from ...control.tags import (
    MAX_TAGS_PER_RESOURCE, TAGGED_KINDS, ArnInvalid, Tag, TagKey, TooManyTags, by_key, is_local, resource_of,
)
from ...errors import ResourceMissing
from .sagemaker_transform import create_transform_job
from .sagemaker_control import (
    OPERATIONS, Operation, document_operations, invalid, make_token, operation, read_token, request_input,
)

# Each Create operation that takes Tags, and the member of its answer naming what it made.
CREATED_ARN = {
    "CreateModel": "ModelArn", "CreateEndpointConfig": "EndpointConfigArn", "CreateEndpoint": "EndpointArn",
    "CreateTransformJob": "TransformJobArn",
}


class TagsInput(Resource):
    tags: list[Tag] = Field(max_length=MAX_TAGS_PER_RESOURCE)


class AddTagsInput(TagsInput):
    resource_arn: str


class ListTagsInput(Resource):
    resource_arn: str
    next_token: str | None = None
    max_results: int = Field(
        MAX_TAGS_PER_RESOURCE, ge=1,
        description="SageMaker's minimum is 50, as many as a resource may have; servelet takes smaller pages too.",
    )


class DeleteTagsInput(Resource):
    resource_arn: str
    tag_keys: list[TagKey] = Field(min_length=1, max_length=MAX_TAGS_PER_RESOURCE)


def wire(tags: dict[str, str]) -> list[dict]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


async def tagged_resource(plane: ControlPlane, resource_arn: str) -> str:
    """The ARN, as servelet writes it, of the resource `resource_arn` names; refused if it names none here."""
    try:
        kind, name = resource_of(resource_arn)
    except ArnInvalid as exc:
        raise invalid(str(exc)) from None
    found = await asyncio.to_thread(plane.store.resource_arn, kind, name) if is_local(resource_arn) else None
    if found is None:
        raise ResourceMissing(f'Could not find {TAGGED_KINDS[kind]} "{resource_arn}".')
    return found


async def keep(plane: ControlPlane, resource: str, tags: dict[str, str]) -> None:
    try:
        await asyncio.to_thread(plane.store.add_tags, resource, tags, MAX_TAGS_PER_RESOURCE)
    except TooManyTags as exc:
        raise invalid(str(exc)) from None


@operation("AddTags", AddTagsInput)
async def add_tags(plane: ControlPlane, body: dict) -> dict:
    """Adding a key the resource has replaces its value."""
    args = request_input(AddTagsInput, body)
    tags = by_key(args.tags)
    await keep(plane, await tagged_resource(plane, args.resource_arn), tags)
    return {"Tags": wire(tags)}


@operation("ListTags", ListTagsInput)
async def list_tags(plane: ControlPlane, body: dict) -> dict:
    args = request_input(ListTagsInput, body)
    resource = await tagged_resource(plane, args.resource_arn)
    tags = list((await asyncio.to_thread(plane.store.list_tags, resource)).items())
    start = read_token(args.next_token)
    end = start + args.max_results
    return {"Tags": wire(dict(tags[start:end]))} | ({"NextToken": make_token(end)} if end < len(tags) else {})


@operation("DeleteTags", DeleteTagsInput)
async def delete_tags(plane: ControlPlane, body: dict) -> dict:
    args = request_input(DeleteTagsInput, body)
    resource = await tagged_resource(plane, args.resource_arn)
    await asyncio.to_thread(plane.store.delete_tags, resource, args.tag_keys)
    return {}


def take_tags(name: str, arn_member: str) -> None:
    """Let the registered Create operation `name` take `Tags`: checked before it runs, kept once it has answered."""
    creates = OPERATIONS[name]

    async def run(plane: ControlPlane, body: dict) -> dict:
        tags = by_key(request_input(TagsInput, {"Tags": body.pop("Tags")}).tags) if "Tags" in body else {}
        answer = await creates.run(plane, body)
        await keep(plane, answer[arn_member], tags)
        return answer

    documented = create_model(  # the operation's input with Tags, for /openapi.json
        f"{creates.input.__name__}WithTags", __base__=creates.input,
        tags=(list[Tag] | None, Field(None, max_length=MAX_TAGS_PER_RESOURCE)),
    )
    OPERATIONS[name] = Operation(name, run, documented, creates.raises)


assert OPERATIONS["CreateTransformJob"].run is create_transform_job  # registered (by the import above) before wrapped
for _create, _arn_member in CREATED_ARN.items():
    take_tags(_create, _arn_member)
document_operations()
