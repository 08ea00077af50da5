"""The control-plane store keeps models, endpoint configs and endpoints across restarts, on SQLite and PostgreSQL.

Every store test runs twice: on a real SQLite file, and on a real PostgreSQL server started privately for this
session (from the Debian `postgresql` package that `.ci/run` installs).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from postgres import PostgresCluster, new_database
from servelet.control.resources import (
    ContainerSpec,
    EndpointConfigSpec,
    EndpointRecord,
    EndpointStatus,
    ModelSpec,
    ProductionVariant,
    ServerlessConfig,
    VariantState,
)
from servelet.control.store import AlreadyExists, Store
from servelet.settings import GatewaySettings, database_url

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh, empty database: a SQLite file in tmp_path, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'servelet.db'}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name, url = new_database(cluster)
    yield url
    cluster.admin(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def store(url):
    store = Store(url)
    yield store
    store.close()


# What users deploy


def a_model(name="gemma", **changes) -> ModelSpec:
    spec = ModelSpec(
        model_name=name,
        primary_container=ContainerSpec(
            image="763104351884.dkr.ecr.us-east-1.amazonaws.com/djl-inference:0.29.0-lmi11.0.0-cu124",
            model_data_url="s3://bucket/models/gemma.tar.gz",
            environment={"OPTION_MAX_MODEL_LEN": "1024", "OPTION_ROLLING_BATCH": "auto", "NOTE": "ünïcode ✓"},
            mode="SingleModel",
        ),
        execution_role_arn="arn:aws:iam::000000000000:role/servelet",
        creation_time=T0,
    )
    return spec.model_copy(update=changes)


def a_config(name="gemma-config", **changes) -> EndpointConfigSpec:
    spec = EndpointConfigSpec(
        endpoint_config_name=name,
        production_variants=[
            ProductionVariant(
                variant_name="blue", model_name="gemma", initial_instance_count=2, initial_variant_weight=0.9,
                instance_type="ml.g5.xlarge",
            ),
            ProductionVariant(
                variant_name="green", model_name="gemma-v2", initial_instance_count=0, initial_variant_weight=0.1,
                serverless_config=ServerlessConfig(
                    memory_size_in_mb=4096, max_concurrency=5, provisioned_concurrency=2
                ),
            ),
        ],
        async_inference_config={
            "OutputConfig": {"S3OutputPath": "s3://bucket/out/"},
            "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 4},
        },
        creation_time=T0,
    )
    return spec.model_copy(update=changes)


def an_endpoint(name="gemma-endpoint", **changes) -> EndpointRecord:
    record = EndpointRecord(
        endpoint_name=name,
        endpoint_config_name="gemma-config",
        endpoint_status=EndpointStatus.CREATING,
        production_variants=[
            VariantState(
                variant_name="blue", current_weight=0.9, desired_weight=0.9, current_instance_count=0, desired_instance_count=2
            ),
            VariantState(variant_name="green", current_weight=0.1, desired_weight=0.1, desired_instance_count=0),
        ],
        creation_time=T0,
        last_modified_time=T0,
    )
    return record.model_copy(update=changes)


# Round trips


def test_a_model_comes_back_with_every_field(store):
    spec = a_model()
    store.add_model(spec)
    assert store.get_model("gemma") == spec
    assert store.get_model("gemma").primary_container.environment["NOTE"] == "ünïcode ✓"
    assert store.get_model("missing") is None


def test_an_endpoint_config_comes_back_with_its_variants(store):
    spec = a_config()
    store.add_endpoint_config(spec)
    back = store.get_endpoint_config("gemma-config")
    assert back == spec
    assert back.production_variants[1].serverless_config.provisioned_concurrency == 2
    assert back.async_inference_config["ClientConfig"]["MaxConcurrentInvocationsPerInstance"] == 4
    assert store.get_endpoint_config("missing") is None


def test_an_endpoint_comes_back_with_its_status_and_variants(store):
    record = an_endpoint(failure_reason=None)
    store.add_endpoint(record)
    assert store.get_endpoint("gemma-endpoint") == record
    assert store.get_endpoint("missing") is None


def test_creation_times_keep_their_instant_whatever_the_zone(store):
    paris = timezone(timedelta(hours=1))
    spec = a_model(creation_time=datetime(2025, 6, 1, 12, 0, tzinfo=paris))
    store.add_model(spec)
    assert store.get_model("gemma").creation_time == datetime(2025, 6, 1, 11, 0, tzinfo=timezone.utc)


# Names


@pytest.mark.parametrize("kind", ["model", "endpoint_config", "endpoint"])
def test_a_second_create_with_the_same_name_is_refused_and_keeps_the_first(store, kind):
    first, second = {
        "model": (a_model(), a_model(runtime="llamacpp", execution_role_arn=None)),
        "endpoint_config": (a_config(), a_config(async_inference_config=None)),
        "endpoint": (an_endpoint(), an_endpoint(endpoint_config_name="other")),
    }[kind]
    add, get = getattr(store, f"add_{kind}"), getattr(store, f"get_{kind}")
    add(first)
    with pytest.raises(AlreadyExists) as refused:
        add(second)
    assert refused.value.kind == kind.replace("_", " ")
    assert get(refused.value.name) == first


@pytest.mark.parametrize("kind", ["model", "endpoint_config", "endpoint"])
def test_delete_says_whether_there_was_something_to_delete(store, kind):
    resource = {"model": a_model(), "endpoint_config": a_config(), "endpoint": an_endpoint()}[kind]
    name = {"model": "gemma", "endpoint_config": "gemma-config", "endpoint": "gemma-endpoint"}[kind]
    getattr(store, f"add_{kind}")(resource)
    assert getattr(store, f"delete_{kind}")(name) is True
    assert getattr(store, f"get_{kind}")(name) is None
    assert getattr(store, f"delete_{kind}")(name) is False
    getattr(store, f"add_{kind}")(resource)  # the name is free again
    assert getattr(store, f"get_{kind}")(name) == resource


# Lists


def test_lists_come_in_creation_order(store):
    # Added out of order, and one time given in another zone: 12:30+02:00 is 10:30 UTC, before 11:00 UTC.
    times = {
        "c": T0 + timedelta(hours=3),
        "a": T0 + timedelta(hours=2),
        "b": (T0 + timedelta(hours=1, minutes=30)).astimezone(timezone(timedelta(hours=2))),
        "d": T0 + timedelta(hours=1),
    }
    for name, moment in times.items():
        store.add_model(a_model(name, creation_time=moment))
        store.add_endpoint_config(a_config(f"{name}-config", creation_time=moment))
        store.add_endpoint(an_endpoint(f"{name}-endpoint", creation_time=moment))
    assert [m.model_name for m in store.list_models()] == ["d", "b", "a", "c"]
    assert [c.endpoint_config_name for c in store.list_endpoint_configs()] == [f"{n}-config" for n in "dbac"]
    assert [e.endpoint_name for e in store.list_endpoints()] == [f"{n}-endpoint" for n in "dbac"]


def test_lists_filter_by_name_and_status(store):
    for i, name in enumerate(["Prod-Gemma", "staging-gemma", "prod-llama"]):
        store.add_model(a_model(name, creation_time=T0 + timedelta(seconds=i)))
        status = EndpointStatus.IN_SERVICE if name.lower().startswith("prod") else EndpointStatus.FAILED
        store.add_endpoint(an_endpoint(name, endpoint_status=status, creation_time=T0 + timedelta(seconds=i)))
    assert [m.model_name for m in store.list_models(name_contains="PROD")] == ["Prod-Gemma", "prod-llama"]
    assert [m.model_name for m in store.list_models(name_contains="%")] == []  # a filter, not a LIKE pattern
    assert [e.endpoint_name for e in store.list_endpoints(status="InService")] == ["Prod-Gemma", "prod-llama"]
    failed_gemmas = store.list_endpoints(name_contains="gemma", status=EndpointStatus.FAILED)
    assert [e.endpoint_name for e in failed_gemmas] == ["staging-gemma"]
    assert store.list_endpoint_configs() == []


# Endpoints change


def test_save_endpoint_records_status_variants_and_the_time_of_the_change(store):
    record = an_endpoint()
    store.add_endpoint(record)
    record.endpoint_status = EndpointStatus.IN_SERVICE
    record.production_variants[0].current_instance_count = 2
    record.production_variants[1] = VariantState(
        variant_name="green", current_weight=0.0, desired_weight=0.0, current_instance_count=1, desired_instance_count=1
    )
    saved = store.save_endpoint(record)

    assert saved is record and record.last_modified_time > T0
    back = store.get_endpoint("gemma-endpoint")
    assert back == record
    assert back.endpoint_status is EndpointStatus.IN_SERVICE
    assert back.creation_time == T0
    assert [v.current_instance_count for v in back.production_variants] == [2, 1]
    assert store.list_endpoints(status="InService") == [record]
    assert store.list_endpoints(status="Creating") == []

    record.endpoint_status = EndpointStatus.FAILED
    record.failure_reason = "instance blue-0 exited with status 1"
    store.save_endpoint(record)
    assert store.get_endpoint("gemma-endpoint").failure_reason == "instance blue-0 exited with status 1"
    assert len(store.list_endpoints()) == 1


def test_save_endpoint_creates_an_endpoint_it_does_not_know(store):
    record = store.save_endpoint(an_endpoint("new-endpoint", endpoint_status=EndpointStatus.UPDATING))
    assert store.get_endpoint("new-endpoint") == record


# Restarts and sharing


def test_everything_survives_a_restart(url):
    first = Store(url)
    first.add_model(a_model())
    first.add_endpoint_config(a_config())
    first.save_endpoint(an_endpoint(endpoint_status=EndpointStatus.IN_SERVICE))
    first.close()

    again = Store(url)  # creating tables again must leave the data alone
    try:
        assert again.get_model("gemma") == a_model()
        assert again.get_endpoint_config("gemma-config") == a_config()
        assert again.get_endpoint("gemma-endpoint").endpoint_status is EndpointStatus.IN_SERVICE
    finally:
        again.close()


def test_two_stores_on_one_sqlite_file_see_each_others_writes(tmp_path):
    url = Store.default_url(tmp_path)
    gateway, cli = Store(url), Store(url)
    try:
        cli.add_model(a_model())
        assert gateway.get_model("gemma") == a_model()
        gateway.save_endpoint(an_endpoint(endpoint_status=EndpointStatus.IN_SERVICE))
        assert cli.get_endpoint("gemma-endpoint").endpoint_status is EndpointStatus.IN_SERVICE
        assert cli.delete_model("gemma") and gateway.get_model("gemma") is None
        with gateway.engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        gateway.close()
        cli.close()


def test_another_process_writes_while_the_gateway_holds_the_file(tmp_path):
    url = Store.default_url(tmp_path)
    gateway = Store(url)
    try:
        gateway.add_model(a_model("from-gateway"))
        writer = (
            "import sys; from servelet.control.store import Store; from servelet.control.resources import ModelSpec\n"
            "store = Store(sys.argv[1])\n"
            "assert store.get_model('from-gateway') is not None\n"
            "store.add_model(ModelSpec(model_name='from-cli'))\n"
            "store.close()\n"
        )
        subprocess.run([sys.executable, "-c", writer, url], check=True, timeout=60)
        assert [m.model_name for m in gateway.list_models()] == ["from-gateway", "from-cli"]
    finally:
        gateway.close()


def test_concurrent_writers_on_one_sqlite_file_wait_for_each_other(tmp_path):
    url = Store.default_url(tmp_path)
    stores = [Store(url), Store(url)]
    failures = []

    def write(store: Store, prefix: str):
        try:
            for i in range(40):
                store.add_model(a_model(f"{prefix}-{i}"))
                store.save_endpoint(an_endpoint(f"{prefix}-endpoint", endpoint_status=EndpointStatus.UPDATING))
        except Exception as exc:  # noqa: BLE001 - the test reports whatever a writer met
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(s, p)) for s, p in zip(stores, ["a", "b"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert failures == []
        assert len(stores[0].list_models()) == 80
        assert len(stores[1].list_endpoints()) == 2
    finally:
        for s in stores:
            s.close()


# Where the store lives


def test_the_default_store_is_a_sqlite_file_in_the_data_folder(tmp_path, monkeypatch):
    data_dir = tmp_path / "not" / "yet" / "there"
    monkeypatch.setenv("SERVELET_DATA_DIR", str(data_dir))
    monkeypatch.delenv("SERVELET_DATABASE_URL", raising=False)
    settings = GatewaySettings()
    assert settings.data_dir == data_dir
    url = database_url(settings)
    assert url == Store.default_url(data_dir) == f"sqlite:///{data_dir / 'servelet.db'}"

    store = Store(url)  # the folder is created on first use
    store.add_model(a_model())
    store.close()
    assert (data_dir / "servelet.db").is_file()


def test_the_data_folder_defaults_to_the_users_data_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SERVELET_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert GatewaySettings().data_dir == tmp_path / ".local" / "share" / "servelet"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert GatewaySettings().data_dir == tmp_path / "data" / "servelet"
    monkeypatch.setenv("SERVELET_DATA_DIR", "~/servelet-state")
    assert GatewaySettings().data_dir == tmp_path / "servelet-state"


def test_a_database_url_replaces_the_sqlite_file(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVELET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SERVELET_DATABASE_URL", "postgresql+psycopg://servelet@db.internal/servelet")
    assert database_url(GatewaySettings()) == "postgresql+psycopg://servelet@db.internal/servelet"


def test_postgresql_through_the_environment(postgres, monkeypatch):
    """What a user does: set SERVELET_DATABASE_URL, and the store is on their PostgreSQL server."""
    postgres.admin("CREATE DATABASE servelet_env")
    try:
        monkeypatch.setenv("SERVELET_DATABASE_URL", postgres.url("servelet_env"))
        store = Store(database_url(GatewaySettings()))
        store.add_model(a_model())
        assert store.engine.dialect.name == "postgresql"
        assert store.get_model("gemma") == a_model()
        store.close()
    finally:
        postgres.admin("DROP DATABASE servelet_env WITH (FORCE)")
