"""What an API key may do: its scopes, as `servelet keys create --scope` writes them.

`admin` reaches every route (the control APIs, /metrics, every endpoint); `metrics` reaches /metrics;
`invoke:*` invokes every endpoint; `invoke:endpoint/NAME` invokes the endpoint NAME only. An invoke scope never
reaches the control APIs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ADMIN = "admin"
METRICS = "metrics"
INVOKE_ANY = "invoke:*"
INVOKE_ENDPOINT = "invoke:endpoint/"
ENDPOINT_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
SCOPES_HELP = f"{ADMIN}, {METRICS}, {INVOKE_ANY} or {INVOKE_ENDPOINT}NAME"


class ScopeError(ValueError):
    """A scope servelet does not know; the message lists those it does."""


def check_scope(scope: str) -> str:
    if scope in (ADMIN, METRICS, INVOKE_ANY):
        return scope
    if scope.startswith(INVOKE_ENDPOINT) and ENDPOINT_NAME.match(scope.removeprefix(INVOKE_ENDPOINT)):
        return scope
    raise ScopeError(f"unknown scope {scope!r}: use {SCOPES_HELP}")


@dataclass(frozen=True)
class Grant:
    """Who a request is (the key's name) and what its scopes let it do."""

    name: str
    scopes: frozenset[str]

    @property
    def admin(self) -> bool:
        return ADMIN in self.scopes

    def may_read_metrics(self) -> bool:
        return self.admin or METRICS in self.scopes

    def may_invoke(self, endpoint: str | None) -> bool:
        """`endpoint` None: one the request has not named in a way the gateway can read; only `invoke:*` covers it."""
        if self.admin or INVOKE_ANY in self.scopes:
            return True
        return endpoint is not None and INVOKE_ENDPOINT + endpoint in self.scopes

    def may_invoke_some(self) -> bool:
        return self.admin or any(s == INVOKE_ANY or s.startswith(INVOKE_ENDPOINT) for s in self.scopes)

    def may_invoke_all(self) -> bool:
        return self.may_invoke(None)


# Auth off: every request may do everything (the gateway is on loopback, or the user said --insecure).
EVERYONE = Grant("anyone", frozenset({ADMIN}))
