"""The fleet's bookkeeping that needs no process: instance sockets fit the kernel's path limit."""

from __future__ import annotations

from servelet.control.endpoints import MAX_SOCKET_PATH_BYTES, Fleet


def test_long_endpoint_and_variant_names_still_get_a_unix_socket_path_that_fits(tmp_path):
    fleet = Fleet(tmp_path)
    name, variant = "e" * 63, "v" * 63  # SageMaker's longest names
    first = fleet._instance(name, variant, "package://x", {})
    second = fleet._instance(name, variant, "package://x", {})
    assert len(bytes(first.socket_path)) <= MAX_SOCKET_PATH_BYTES
    assert first.socket_path != second.socket_path
    assert first.name == f"{name}/{variant}/0"


def test_short_names_keep_readable_socket_names(tmp_path):
    fleet = Fleet(tmp_path)
    assert fleet._instance("default", "AllTraffic", "package://x", {}).socket_path.name == "default-AllTraffic-0.sock"
