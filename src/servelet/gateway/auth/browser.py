"""What keeps a web page the user visits from using a gateway on their machine.

- DNS rebinding: a page on `evil.example` whose name is made to resolve to 127.0.0.1 reaches the gateway with
  `Host: evil.example`; on loopback only the bound names (and `allowed_hosts`) are accepted.
- Cross-site requests: a page may post to any address without asking (a "simple" request: a form, or fetch with
  a form or text/plain body). JSON-only routes refuse those content types; the SageMaker runtime routes carry
  whatever the model takes, so they refuse only the two form encodings (a model that takes text/plain is
  reachable by such a page with auth off: turn auth on). A request whose `Origin` is neither its own host nor a
  configured CORS origin is refused on every route, WebSockets included (browsers send `Origin` there too).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers

from ...errors import BadRequest, GatewayError, UnsupportedMediaType
from ...settings import GatewaySettings
from .binding import LOOPBACK_NAMES, is_loopback
from .errors import Forbidden
from .rules import Need

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
SIMPLE_TYPES = (*FORM_TYPES, "text/plain")


class BrowserChecks:
    def __init__(self, settings: GatewaySettings):
        self.hosts = {h.lower().strip("[]") for h in (*LOOPBACK_NAMES, settings.host, *settings.allowed_hosts)}
        # Host is checked where the names are known: on loopback, or once the user lists the names served.
        self.check_host = is_loopback(settings.host) or bool(settings.allowed_hosts)
        self.cors_origins = {o.rstrip("/").lower() for o in settings.cors_origins}

    def refusal(self, method: str, headers: Headers, need: Need) -> GatewayError | None:
        host = headers.get("host")
        if self.check_host and host is not None and _hostname(host) not in self.hosts:
            return BadRequest(
                f"Host {host!r} is not a name this gateway serves (add it to SERVELET_ALLOWED_HOSTS if it is yours)"
            )
        origin = headers.get("origin")
        if origin is not None and not self._same_or_allowed(origin, host):
            return Forbidden(f"requests from the web origin {origin!r} are not allowed (SERVELET_CORS_ORIGINS)")
        if method in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            refused = SIMPLE_TYPES if need.json_only else FORM_TYPES
            if media in refused:
                return UnsupportedMediaType(
                    f"content type {media} is refused here (a web page can send it without asking); send "
                    + ("application/json" if need.json_only else "the model's content type")
                )
        return None

    def _same_or_allowed(self, origin: str, host: str | None) -> bool:
        if origin.rstrip("/").lower() in self.cors_origins:
            return True
        return host is not None and urlsplit(origin).netloc.lower() == host.lower()


def _hostname(host: str) -> str:
    """`Host` without its port: `127.0.0.1:8080` → 127.0.0.1, `[::1]:8080` → ::1."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host
