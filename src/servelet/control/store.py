"""Where the control plane's resources live: models, endpoint configs and endpoints, through SQLAlchemy.

A SQLite file in servelet's data folder by default, so that `servelet serve` and a CLI process share it;
any SQLAlchemy URL otherwise (`postgresql+psycopg://...`). Each resource is kept as its pydantic model's
JSON, beside the few columns we query by, so a new resource field needs no migration. servelet has no migration
tool: a column added to a table later (the usage table's cache and restore figures) is added to an existing
database when the store opens it (`_add_missing_columns`).
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import (
    JSON, Column, Date, DateTime, Float, Integer, MetaData, String, Table, create_engine, event, func, insert, inspect,
    select, text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.pool import StaticPool

from .resources import (
    CatalogEntry, EndpointConfigSpec, EndpointRecord, EndpointStatus, ModelSpec, ScalableTarget, TransformJobSpec,
    TransformJobStatus, UsageDay, arn, now,
)
from .tags import TooManyTags

DATABASE_FILE = "servelet.db"
# How long a writer waits for another process's write lock on a SQLite file before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
SQLITE_SYNCHRONOUS = {"NORMAL": "NORMAL", "FULL": "FULL"}  # the settings' choices, and what SQLite is told

metadata = MetaData()


def _table(name: str, *extra: Column) -> Table:
    return Table(
        name,
        metadata,
        Column("name", String(63), primary_key=True),
        Column("creation_time", DateTime(timezone=True), nullable=False, index=True),
        *extra,
        Column("spec", JSON, nullable=False),
    )


models = _table("models")
endpoint_configs = _table("endpoint_configs")
endpoints = _table(
    "endpoints",
    Column("status", String(16), nullable=False, index=True),
    Column("last_modified_time", DateTime(timezone=True), nullable=False),
)
# The model catalog: ids a caller may invoke before any endpoint serves them (the user's; built-ins live in code).
catalog = _table("catalog")
# Batch transform jobs: the request and the runner's state and progress, queried by status.
transform_jobs = _table("transform_jobs", Column("status", String(16), nullable=False, index=True))
# Autoscaling: one row per variant registered (its ResourceId `endpoint/E/variant/V`), with its policy and events.
scaling_targets = Table(
    "scaling_targets",
    metadata,
    Column("name", String(300), primary_key=True),
    Column("endpoint", String(63), nullable=False, index=True),
    Column("creation_time", DateTime(timezone=True), nullable=False),
    Column("spec", JSON, nullable=False),
)
# The cost meter: one row per endpoint, variant and UTC day, so the table grows by days, not by requests.
usage = Table(
    "usage",
    metadata,
    Column("endpoint", String(63), primary_key=True),
    Column("variant", String(63), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("gb_seconds", Float, nullable=False),
    Column("requests", Integer, nullable=False),
    # Added with snapshot starts: databases made before them get these columns when the store opens them.
    Column("cache_gb_seconds", Float, nullable=False, server_default="0"),
    Column("restored_gb", Float, nullable=False, server_default="0"),
)
# Tags on SageMaker resources (control/tags.py), by the resource's ARN; a resource's tags go with it (`_delete`).
tags = Table(
    "tags",
    metadata,
    Column("resource", String(256), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", String(256), nullable=False),
)
# The tables of the resources that take tags, by the kind their ARNs name.
TAGGED_TABLES = {"model": models, "endpoint-config": endpoint_configs, "endpoint": endpoints, "transform-job": transform_jobs}
# What a usage row adds up, named as UsageDay's fields.
USAGE_FIGURES = ("gb_seconds", "requests", "cache_gb_seconds", "restored_gb")

Spec = TypeVar("Spec", bound=BaseModel)


class AlreadyExists(Exception):
    """A create for a name the store already holds; `kind` is the resource kind (model, endpoint, ...)."""

    def __init__(self, kind: str, name: str):
        super().__init__(f"{kind} {name!r} already exists")
        self.kind = kind
        self.name = name


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: store UTC everywhere so that ordering by creation time holds on both backends.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


class Store:
    """The resources of one servelet installation; every method is one short transaction."""

    def __init__(self, url: str, sqlite_synchronous: str = "NORMAL"):
        """`sqlite_synchronous`: SQLite's `synchronous` in WAL mode. NORMAL: a commit is safe from any crash of
        servelet's processes (kill -9 included) but a power loss may take the last ones, and commits wait for no
        disk flush; FULL: every commit waits for one (power-loss safe; about 40 ms a commit on a VM's disk)."""
        self.url = url
        self.engine = _engine(url, sqlite_synchronous)
        # A commit that waits for no disk and no network: a local SQLite file that does not flush per commit.
        self.commits_wait_for_no_disk = self.engine.dialect.name == "sqlite" and sqlite_synchronous.upper() != "FULL"
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine, usage)

    @staticmethod
    def default_url(data_dir: Path) -> str:
        return f"sqlite:///{Path(data_dir).expanduser().resolve() / DATABASE_FILE}"

    def close(self) -> None:
        self.engine.dispose()

    # Models

    def add_model(self, spec: ModelSpec) -> None:
        self._add(models, "model", spec.model_name, spec)

    def get_model(self, name: str) -> ModelSpec | None:
        return self._get(models, ModelSpec, name)

    def list_models(self, name_contains: str | None = None) -> list[ModelSpec]:
        return self._list(models, ModelSpec, name_contains)

    def delete_model(self, name: str) -> bool:
        return self._delete(models, name)

    # Endpoint configs

    def add_endpoint_config(self, spec: EndpointConfigSpec) -> None:
        self._add(endpoint_configs, "endpoint config", spec.endpoint_config_name, spec)

    def get_endpoint_config(self, name: str) -> EndpointConfigSpec | None:
        return self._get(endpoint_configs, EndpointConfigSpec, name)

    def list_endpoint_configs(self, name_contains: str | None = None) -> list[EndpointConfigSpec]:
        return self._list(endpoint_configs, EndpointConfigSpec, name_contains)

    def delete_endpoint_config(self, name: str) -> bool:
        return self._delete(endpoint_configs, name)

    # Endpoints

    def add_endpoint(self, record: EndpointRecord) -> None:
        self._add(endpoints, "endpoint", record.endpoint_name, record, **_endpoint_columns(record))

    def get_endpoint(self, name: str) -> EndpointRecord | None:
        return self._get(endpoints, EndpointRecord, name)

    def list_endpoints(
        self, name_contains: str | None = None, status: EndpointStatus | str | None = None
    ) -> list[EndpointRecord]:
        where = [] if status is None else [endpoints.c.status == EndpointStatus(status).value]
        return self._list(endpoints, EndpointRecord, name_contains, *where)

    def save_endpoint(self, record: EndpointRecord) -> EndpointRecord:
        """Insert or replace the endpoint; stamps `record.last_modified_time` (in place) and returns it."""
        record.last_modified_time = now()
        row = {"name": record.endpoint_name, "spec": record.model_dump(mode="json"), **_endpoint_columns(record)}
        # One statement, not read-then-write: two SQLite writers never deadlock upgrading their locks.
        statement = upsert(self.engine).values(row)
        statement = statement.on_conflict_do_update(
            index_elements=[endpoints.c.name],
            set_={key: statement.excluded[key] for key in row if key != "name"},
        )
        with self.engine.begin() as connection:
            connection.execute(statement)
        return record

    def delete_endpoint(self, name: str) -> bool:
        return self._delete(endpoints, name)

    # Batch transform jobs

    def add_transform_job(self, job: TransformJobSpec) -> None:
        self._add(transform_jobs, "transform job", job.transform_job_name, job, status=_status(job))

    def get_transform_job(self, name: str) -> TransformJobSpec | None:
        return self._get(transform_jobs, TransformJobSpec, name)

    def list_transform_jobs(
        self, name_contains: str | None = None, status: TransformJobStatus | str | None = None
    ) -> list[TransformJobSpec]:
        where = [] if status is None else [transform_jobs.c.status == TransformJobStatus(status).value]
        return self._list(transform_jobs, TransformJobSpec, name_contains, *where)

    def save_transform_job(self, job: TransformJobSpec) -> TransformJobSpec:
        """Insert or replace the job (the runner saves its progress so); stamps `job.last_modified_time` in place."""
        job.last_modified_time = now()
        row = {
            "name": job.transform_job_name, "creation_time": _utc(job.creation_time), "status": _status(job),
            "spec": job.model_dump(mode="json"),
        }
        statement = upsert(self.engine, transform_jobs).values(row)
        statement = statement.on_conflict_do_update(
            index_elements=[transform_jobs.c.name], set_={"status": statement.excluded.status, "spec": statement.excluded.spec}
        )
        with self.engine.begin() as connection:
            connection.execute(statement)
        return job

    # The model catalog

    def add_catalog_entry(self, entry: CatalogEntry) -> None:
        self._add(catalog, "catalog entry", entry.model_id, entry)

    def get_catalog_entry(self, model_id: str) -> CatalogEntry | None:
        return self._get(catalog, CatalogEntry, model_id)

    def list_catalog(self) -> list[CatalogEntry]:
        return self._list(catalog, CatalogEntry, None)

    def delete_catalog_entry(self, model_id: str) -> bool:
        return self._delete(catalog, model_id)

    # Autoscaling targets

    def save_scaling_target(self, target: ScalableTarget) -> None:
        row = {
            "name": target.resource_id, "endpoint": target.endpoint_name,
            "creation_time": _utc(target.creation_time), "spec": target.model_dump(mode="json"),
        }
        statement = upsert(self.engine, scaling_targets).values(row)
        statement = statement.on_conflict_do_update(
            index_elements=[scaling_targets.c.name], set_={"spec": statement.excluded.spec}
        )
        with self.engine.begin() as connection:
            connection.execute(statement)

    def get_scaling_target(self, resource_id: str) -> ScalableTarget | None:
        return self._get(scaling_targets, ScalableTarget, resource_id)

    def list_scaling_targets(self, endpoint: str | None = None) -> list[ScalableTarget]:
        where = [] if endpoint is None else [scaling_targets.c.endpoint == endpoint]
        return self._list(scaling_targets, ScalableTarget, None, *where)

    def delete_scaling_target(self, resource_id: str) -> bool:
        return self._delete(scaling_targets, resource_id)

    def delete_scaling_targets(self, endpoint: str) -> int:
        """Every target of the endpoint (it is being deleted)."""
        with self.engine.begin() as connection:
            return connection.execute(scaling_targets.delete().where(scaling_targets.c.endpoint == endpoint)).rowcount

    # Tags

    def resource_arn(self, kind: str, name: str) -> str | None:
        """The ARN of the resource of `kind` named `name` in any case (ARNs carry names in lower case); None if none."""
        table = TAGGED_TABLES[kind]
        with self.engine.connect() as connection:
            found = connection.execute(select(table.c.name).where(table.c.name == name)).scalar_one_or_none()
            if found is None:
                lowered = select(table.c.name).where(func.lower(table.c.name) == name.lower()).limit(1)
                found = connection.execute(lowered).scalar_one_or_none()
        return None if found is None else arn(kind, found)

    def add_tags(self, resource: str, added: dict[str, str], most: int) -> None:
        """Add or replace tags in one transaction; TooManyTags (and nothing changed) past `most` in all. Written
        first, then counted: a SQLite writer that read first could deadlock upgrading its lock."""
        if not added:
            return
        statement = upsert(self.engine, tags)
        statement = statement.on_conflict_do_update(
            index_elements=[tags.c.resource, tags.c.key], set_={"value": statement.excluded.value}
        )
        with self.engine.begin() as connection:
            connection.execute(statement, [{"resource": resource, "key": k, "value": v} for k, v in added.items()])
            count = connection.execute(select(func.count()).where(tags.c.resource == resource)).scalar_one()
            if count > most:
                raise TooManyTags(resource, count)  # rolls the transaction back

    def list_tags(self, resource: str) -> dict[str, str]:
        """The resource's tags, by key in order."""
        query = select(tags.c.key, tags.c.value).where(tags.c.resource == resource).order_by(tags.c.key)
        with self.engine.connect() as connection:
            return {row.key: row.value for row in connection.execute(query)}

    def delete_tags(self, resource: str, keys: list[str]) -> None:
        """Remove these keys' tags; a key the resource has no tag for is no error."""
        with self.engine.begin() as connection:
            connection.execute(tags.delete().where(tags.c.resource == resource, tags.c.key.in_(keys)))

    # Usage (the cost meter)

    def add_usage(self, days: list[UsageDay]) -> None:
        """Add each day's figures to what its row holds already, in one transaction."""
        if not days:
            return
        statement = upsert(self.engine, usage)
        statement = statement.on_conflict_do_update(
            index_elements=[usage.c.endpoint, usage.c.variant, usage.c.day],
            set_={figure: usage.c[figure] + statement.excluded[figure] for figure in USAGE_FIGURES},
        )
        rows = [
            {"endpoint": d.endpoint_name, "variant": d.variant_name, "day": d.day,
             **{figure: getattr(d, figure) for figure in USAGE_FIGURES}}
            for d in days
        ]
        with self.engine.begin() as connection:
            connection.execute(statement, rows)

    def list_usage(self, endpoint: str | None = None, since: date | None = None) -> list[UsageDay]:
        """Rows by endpoint, day and variant; `since` includes its own day."""
        query = select(usage).order_by(usage.c.endpoint, usage.c.day, usage.c.variant)
        if endpoint is not None:
            query = query.where(usage.c.endpoint == endpoint)
        if since is not None:
            query = query.where(usage.c.day >= since)
        with self.engine.connect() as connection:
            return [
                UsageDay(endpoint_name=r.endpoint, variant_name=r.variant, day=r.day,
                         **{figure: r._mapping[figure] for figure in USAGE_FIGURES})
                for r in connection.execute(query)
            ]

    # The same four operations for every table

    def _add(self, table: Table, kind: str, name: str, spec: BaseModel, **columns: Any) -> None:
        row = {"name": name, "creation_time": _utc(spec.creation_time), "spec": spec.model_dump(mode="json"), **columns}
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(table).values(row))
        except IntegrityError:
            raise AlreadyExists(kind, name) from None

    def _get(self, table: Table, spec_type: type[Spec], name: str) -> Spec | None:
        with self.engine.connect() as connection:
            spec = connection.execute(select(table.c.spec).where(table.c.name == name)).scalar_one_or_none()
        return None if spec is None else spec_type.model_validate(spec)

    def _list(self, table: Table, spec_type: type[Spec], name_contains: str | None, *where) -> list[Spec]:
        query = select(table.c.spec).where(*where).order_by(table.c.creation_time, table.c.name)
        if name_contains:
            # SageMaker's NameContains ignores case.
            query = query.where(func.lower(table.c.name).contains(name_contains.lower(), autoescape=True))
        with self.engine.connect() as connection:
            return [spec_type.model_validate(spec) for spec in connection.execute(query).scalars()]

    def _delete(self, table: Table, name: str) -> bool:
        """The row, and the resource's tags in the same transaction."""
        kind = next((kind for kind, tagged in TAGGED_TABLES.items() if tagged is table), None)
        with self.engine.begin() as connection:
            deleted = connection.execute(table.delete().where(table.c.name == name)).rowcount > 0
            if kind is not None:
                connection.execute(tags.delete().where(tags.c.resource == arn(kind, name)))
            return deleted


def _endpoint_columns(record: EndpointRecord) -> dict[str, Any]:
    return {
        "creation_time": _utc(record.creation_time),
        "status": EndpointStatus(record.endpoint_status).value,
        "last_modified_time": _utc(record.last_modified_time),
    }


def _status(job: TransformJobSpec) -> str:
    return TransformJobStatus(job.transform_job_status).value


def _add_missing_columns(engine: Engine, table: Table) -> None:
    """Add the table's columns an existing database lacks (`create_all` makes missing tables, never missing
    columns), each with its server default so that the rows already there read as zero. Another process opening
    the same database at once may add one first: what counts is that it is there afterwards."""
    for column in _missing_columns(engine, table):
        preparer = engine.dialect.identifier_preparer
        try:
            with engine.begin() as connection:
                connection.execute(text(
                    f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {preparer.format_column(column)} "
                    f"{column.type.compile(engine.dialect)} NOT NULL DEFAULT {column.server_default.arg}"
                ))
        except DBAPIError:
            if column.name in {c.name for c in _missing_columns(engine, table)}:
                raise


def _missing_columns(engine: Engine, table: Table) -> list[Column]:
    present = {c["name"] for c in inspect(engine).get_columns(table.name)}
    return [c for c in table.columns if c.name not in present]


def upsert(engine: Engine, table: Table = endpoints):
    """INSERT ... ON CONFLICT for the engine's dialect (both SQLite and PostgreSQL have it)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        raise ValueError(f"servelet's store supports SQLite and PostgreSQL, not {engine.dialect.name}")
    return dialect_insert(table)


def _engine(url: str, sqlite_synchronous: str = "NORMAL") -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pool_pre_ping: a PostgreSQL restart must not leave the gateway holding dead connections.
        return create_engine(url, pool_pre_ping=True)
    if parsed.database in (None, "", ":memory:"):
        # One shared connection, or each thread would see its own empty in-memory database.
        return create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _share_the_file(dbapi_connection, _record):
        # WAL lets the gateway read while a CLI process writes; the busy timeout makes writers wait, not fail.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS[sqlite_synchronous]}")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    return engine
