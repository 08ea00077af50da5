"""Who a request is: an API key (`Authorization: Bearer KEY` or `x-api-key: KEY`) or a SigV4 signature.

A browser cannot add a header to a page it opens, so the read-only pages (`/docs`, `/openapi.json`) also take the
key as HTTP Basic's password (the browser asks for it after a 401 with `WWW-Authenticate: Basic`). Nowhere else:
a browser sends Basic credentials by itself once given, so on any other route a web page could use them.

Lookups are cached for a few seconds so that most requests cost no store query; a lookup the cache lacks runs in a
thread, so a slow store (PostgreSQL across a network) never stalls the event loop, which carries every stream. A key
revoked with `servelet keys revoke` (another process, writing the store) is refused within `CACHE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from typing import TypeVar

from starlette.datastructures import Headers

from ...control.api_keys import ApiKeys
from ...control.scopes import Grant
from ...control.secret_box import SecretBoxError
from ...errors import Unavailable
from . import sigv4
from .errors import NoCredentials, Unauthenticated

CACHE_SECONDS = 5.0
CACHE_ENTRIES = 10_000  # past it the cache starts afresh: unknown keys sent by a stranger cannot grow it for ever
T = TypeVar("T")


def api_key_in(headers: Headers) -> str | None:
    """The API key the request carries, if it carries one (a SigV4 Authorization header is not one)."""
    if key := headers.get("x-api-key"):
        return key.strip()
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def basic_password_in(headers: Headers) -> str | None:
    """The password of an `Authorization: Basic` header (the user name is not looked at), if it has one."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        password = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2].strip()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password or None


def carries_credentials(headers: Headers) -> bool:
    return api_key_in(headers) is not None or sigv4.is_sigv4(headers.get("authorization"))


class Authenticator:
    def __init__(self, keys: ApiKeys, clock: Callable[[], float] = time.monotonic):
        self.keys = keys
        self.clock = clock
        self._cache: dict[tuple[str, str], tuple[float, object]] = {}

    async def by_key(self, key: str) -> Grant:
        grant = await self._cached(("key", key), lambda: self.keys.grant_for_key(key))
        if grant is None:
            raise Unauthenticated("the API key is not valid (unknown or revoked)")
        return grant

    async def by_signature(self, method: str, url: str, headers: Headers, body: bytes) -> Grant:
        signed = sigv4.parse_authorization(headers["authorization"])
        try:
            found = await self._cached(("aws", signed.access_key_id), lambda: self.keys.sigv4_credentials(signed.access_key_id))
        except SecretBoxError as exc:  # the data folder's key file is not the store's: no SigV4 key can be checked
            raise Unavailable(f"SigV4 credentials cannot be checked: {exc}") from None
        if found is None:
            raise Unauthenticated("The security token included in the request is invalid.")  # AWS's words
        grant, secret = found
        sigv4.verify(signed, secret, method, url, headers, body)
        return grant

    async def grant(self, method: str, url: str, headers: Headers, body: bytes | None, basic: bool = False) -> Grant:
        """The request's grant; `body` is needed (read whole) only for a SigV4 request; `basic`: a read-only page,
        which takes the key as HTTP Basic's password too."""
        if sigv4.is_sigv4(headers.get("authorization")):
            return await self.by_signature(method, url, headers, body or b"")
        key = api_key_in(headers) or (basic_password_in(headers) if basic else None)
        if key is None:
            raise NoCredentials(
                "this gateway requires a key: send `Authorization: Bearer KEY` or `x-api-key: KEY`, or SigV4 "
                "credentials (make one with `servelet keys create NAME --scope SCOPE`; the servelet CLI sends "
                "$SERVELET_API_KEY)"
            )
        return await self.by_key(key)

    async def _cached(self, name: tuple[str, str], look_up: Callable[[], T]) -> T:
        now = self.clock()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]  # type: ignore[return-value]
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        value = await asyncio.to_thread(look_up)
        if len(self._cache) >= CACHE_ENTRIES:  # again: other lookups may have filled it while this one ran
            self._cache.clear()
        self._cache[name] = (now, value)
        return value
