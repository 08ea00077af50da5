"""Where the gateway may listen without auth: loopback only, unless the user says --insecure."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def open_binding_refusal(host: str, auth: bool, insecure: bool) -> str | None:
    """Why `servelet serve` must not start, or None: a non-loopback address with auth off and no --insecure."""
    if auth or insecure or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host} with auth off: anyone who can reach it could invoke and manage every "
        "endpoint. Turn auth on with --auth (SERVELET_AUTH=true) and make a key with `servelet keys create`, "
        "or pass --insecure to serve it open anyway"
    )


def insecure_warning(host: str) -> str:
    return (
        f"--insecure: listening on {host} with auth OFF; anyone who can reach this port can invoke and manage "
        "every endpoint (turn auth on with --auth)"
    )
