"""The fleet's bookkeeping that needs no process: instance sockets fit the kernel's path limit; more instance
threads than cores are pointed out."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

from servelet.control.endpoints import MAX_SOCKET_PATH_BYTES, Deployment, Endpoint, Fleet, Variant


def test_long_endpoint_and_variant_names_still_get_a_unix_socket_path_that_fits(tmp_path):
    fleet = Fleet(tmp_path)
    name, variant = "e" * 63, "v" * 63  # SageMaker's longest names
    first = fleet._instance(name, Variant(variant, "package://x", 1.0))
    second = fleet._instance(name, Variant(variant, "package://x", 1.0))
    assert len(bytes(first.socket_path)) <= MAX_SOCKET_PATH_BYTES
    assert first.socket_path != second.socket_path
    assert first.name == f"{name}/{variant}/0"


def test_short_names_keep_readable_socket_names(tmp_path):
    fleet = Fleet(tmp_path)
    assert fleet._instance("default", Variant("AllTraffic", "package://x", 1.0)).socket_path.name == "default-AllTraffic-0.sock"


def running_endpoint(fleet: Fleet, threads: int, instances: int) -> None:
    """An endpoint whose instances look started (a live process stand-in), each with `threads` threads."""
    variant = Variant("AllTraffic", "package://x", 1.0, env={"SERVELET_THREADS": str(threads)})
    variant.instances = [fleet._instance("e", variant) for _ in range(instances)]
    for instance in variant.instances:
        instance.process = SimpleNamespace(returncode=None)
    fleet.endpoints["e"] = Endpoint("e", Deployment([variant], "e"))


def test_more_instance_threads_than_cores_are_pointed_out(tmp_path, caplog):
    cores = os.cpu_count() or 1
    fleet = Fleet(tmp_path)
    with caplog.at_level(logging.WARNING, "servelet.control"):
        running_endpoint(fleet, threads=1, instances=cores)
        fleet._warn_if_cores_oversubscribed()
        assert "threads on" not in caplog.text  # one thread per core: fine
        running_endpoint(fleet, threads=cores, instances=2)
        fleet._warn_if_cores_oversubscribed()
    assert f"2 instances run {2 * cores} threads on {cores} cores" in caplog.text and "SERVELET_THREADS" in caplog.text


def test_instances_that_do_not_set_their_threads_split_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVELET_THREADS", raising=False)
    cores = os.cpu_count() or 1
    fleet = Fleet(tmp_path)
    pair = [fleet._instance("e", Variant("AllTraffic", "package://x", 1.0)) for _ in range(2)]
    fleet._share_cores(pair)
    assert [i.env["SERVELET_THREADS"] for i in pair] == [str(max(1, cores // 2))] * 2
    # A model that sets its threads keeps them; one more instance gets what the running ones leave (at least 1).
    running_endpoint(fleet, threads=cores, instances=1)
    pinned = fleet._instance("e", Variant("v", "package://x", 1.0, env={"SERVELET_THREADS": "3"}))
    new = fleet._instance("e", Variant("v", "package://x", 1.0))
    fleet._share_cores([pinned, new])
    assert pinned.env["SERVELET_THREADS"] == "3" and new.env["SERVELET_THREADS"] == "1"


def test_a_request_goes_to_the_ready_instance_answering_the_fewest():
    """LEAST_OUTSTANDING_REQUESTS (the default): after a kill, the replacement takes the new requests instead of
    sitting idle beside a survivor that holds every stream; ties go in turn."""
    instances = [SimpleNamespace(name=f"i{n}", ready=True) for n in range(3)]
    variant = Variant("v", "m", instances=instances)
    variant.in_flight.update({"i0": 5, "i1": 2, "i2": 0})
    assert variant.pick_instance().name == "i2"
    variant.in_flight.update({"i2": 3})  # i0 5, i1 2, i2 3
    assert variant.pick_instance().name == "i1"
    variant.in_flight.clear()
    assert {variant.pick_instance().name for _ in range(3)} == {"i0", "i1", "i2"}
    instances[1].ready = False
    assert variant.pick_instance().name != "i1"


def test_random_routing_uses_every_ready_instance_whatever_their_load():
    instances = [SimpleNamespace(name=f"i{n}", ready=True) for n in range(2)]
    variant = Variant("v", "m", instances=instances, routing="RANDOM")
    variant.in_flight.update({"i0": 100})
    assert {variant.pick_instance().name for _ in range(200)} == {"i0", "i1"}
