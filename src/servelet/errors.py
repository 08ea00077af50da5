"""Errors a request can meet anywhere on its way (gateway, router, instance), independent of wire format."""

from __future__ import annotations

import json


class GatewayError(Exception):
    """A request that cannot be served: `status` is the HTTP status, `kind` a stable machine-readable name."""

    status = 500
    kind = "internal_error"
    retry_after: int | None = None  # seconds, sent as Retry-After

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(GatewayError):
    status, kind = 400, "validation"


class NotFound(GatewayError):
    status, kind = 404, "not_found"


class MethodNotAllowed(GatewayError):
    status, kind = 405, "method_not_allowed"


class UpgradeRequired(GatewayError):
    """A plain HTTP request to a WebSocket route."""

    status, kind = 426, "upgrade_required"


class PayloadTooLarge(GatewayError):
    status, kind = 413, "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status, kind = 415, "unsupported_media_type"


class Unprocessable(GatewayError):
    status, kind = 422, "validation"


class Overloaded(GatewayError):
    status, kind = 429, "overloaded"
    retry_after = 1  # a full queue (an instance's, the engine's) has room again within moments


class Throttled(Overloaded):
    """Over a serverless variant's MaxConcurrency: refused at once, never queued; the client retries after a second."""

    retry_after = 1


class ModelNotReady(Overloaded):
    """A serverless variant's instance did not start within the request's bound (SageMaker's ModelNotReadyException)."""

    kind = "model_not_ready"
    retry_after = 5


class Unavailable(GatewayError):
    status, kind = 503, "unavailable"


class NoReadyInstance(Unavailable):
    """No instance of the endpoint is ready now: its model loads, or one that died is being replaced (a restarted
    gateway's, for seconds). Retry-After tells clients it is backpressure to wait out, not a failure."""

    retry_after = 1


class ModelFailed(GatewayError):
    """The instance answered an error of its own (SageMaker's ModelError carries its status and message)."""

    status, kind = 424, "model_error"

    def __init__(self, message: str, original_status: int):
        super().__init__(message)
        self.original_status = original_status


class ModelTimedOut(ModelFailed):
    """The instance did not answer within the invocation timeout: SageMaker's ModelError with original status 0
    (what SageMaker itself sends), 504 on the other families."""

    status = 504

    def __init__(self, message: str):
        super().__init__(message, 0)


def from_instance(status: int, body: bytes) -> GatewayError:
    """Turn an instance's error answer (`{"code", "error_type", "error"}`) into the gateway's own error."""
    try:
        message = json.loads(body).get("error") or body.decode(errors="replace")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace") or f"the instance answered {status}"
    by_status: dict[int, type[GatewayError]] = {
        400: BadRequest, 404: NotFound, 413: PayloadTooLarge, 415: UnsupportedMediaType, 422: Unprocessable,
        429: Overloaded, 503: Unavailable,
    }
    if status in by_status:
        return by_status[status](message)
    return ModelFailed(message, status)


# -- control plane: resource definitions and their lifecycle (SageMaker answers these as ValidationException) ----
class ResourceInvalid(GatewayError):
    """A definition that cannot work, e.g. a variant naming a model that does not exist."""

    status, kind = 400, "resource_invalid"


class ResourceMissing(GatewayError):
    status, kind = 400, "resource_missing"


class ResourceExists(GatewayError):
    status, kind = 400, "resource_exists"


class ResourceInUse(GatewayError):
    """A model or endpoint config that an endpoint still uses."""

    status, kind = 400, "resource_in_use"


# Refusals that say "not now" rather than "never": work that gets one waits and tries again.
NOT_NOW = (ModelNotReady, Overloaded, Unavailable)
