"""The async-inference queue: each accepted `InvokeEndpointAsync` is a row in the store, so a crash loses none.

A job is `Pending` until a worker leases it (`InProgress`, with a lease it renews while it works), then `Completed`,
`Failed` or `Expired` (its TTL passed before it started). A job whose lease ran out (its worker died with the
gateway) is leased again. Only the worker holding a job's lease may end it, so it ends once; its output object's
name is fixed by its InferenceId and written atomically, so a job run twice still leaves one output. A job that
ended waits for its notification (a webhook) to be delivered, or given up, before it is `notified`.

Every method is one short transaction. The gateway makes its writes through `JobQueue.write`, one at a time: SQLite
takes one writer at a time, and a second one waits in its busy handler, which sleeps 1, 2, 5, 10 ms and more
between tries. On SQLite that flushes no disk per commit (WAL, synchronous=NORMAL: a commit is a few hundred
microseconds) a write runs on the event loop itself: handing it to a thread cost more than the write, in the hop
and in the wait for the interpreter lock behind a busy loop (docs/benchmarks.md: 659 -> 1,013 jobs accepted a second).
On PostgreSQL, or SQLite flushing each commit, writes go to one thread of the queue's.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

from sqlalchemy import (
    Boolean, Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text, bindparam, false, func, select,
    update,
)
from sqlalchemy.engine import Engine

from .store import Store, upsert

metadata = MetaData()
Item = TypeVar("Item")
Result = TypeVar("Result")


class JobStatus(str, enum.Enum):
    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    FAILED = "Failed"
    EXPIRED = "Expired"


ENDED = (JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.EXPIRED.value)
NOT_ENDED = (JobStatus.PENDING.value, JobStatus.IN_PROGRESS.value)

jobs = Table(
    "async_jobs",
    metadata,
    Column("inference_id", String(64), primary_key=True),
    Column("endpoint", String(63), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created", Float, nullable=False, index=True),  # epoch seconds, as every time here
    Column("expires", Float, nullable=False),  # created + RequestTTLSeconds: not started by then, it expires
    Column("invocation_timeout", Integer, nullable=False),
    Column("input_location", Text),
    Column("inline_body", LargeBinary),  # a body sent with the request instead of an input location (≤ 128,000 B)
    Column("content_type", String(256)),
    Column("accept", String(256)),
    Column("custom_attributes", String(1024)),
    Column("output_location", Text, nullable=False),
    Column("failure_location", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64)),
    Column("lease_until", Float),
    Column("ended", Float),
    Column("failure_reason", Text),
    Column("notified", Boolean, nullable=False, default=False),
)
# The queries the queue runs all the time each read an index range of the rows they want, never the ended jobs, which
# are kept (their status is asked for) and outnumber the rest: without these, a lease and a backlog count read every
# job the endpoint ever had (27 ms a lease and its ending at 30,000 jobs, on the event loop: bench/queue_queries.py).
QUEUE_INDEXES = (
    Index("ix_async_jobs_queue", jobs.c.endpoint, jobs.c.status, jobs.c.created),  # lease, backlog, list by endpoint
    Index("ix_async_jobs_due", jobs.c.status, jobs.c.expires),  # expiry, list by status
    Index("ix_async_jobs_unnotified", jobs.c.notified, jobs.c.status),  # notifications still owed
)


class Statements:
    """The queue's frequent statements, built once: in a cProfile of leases, building the SQLAlchemy expressions took
    longer than SQLite took to run them, and a prebuilt statement also hits the compiled-statement cache at once."""

    def __init__(self, engine: Engine):
        endpoint_is = jobs.c.endpoint == bindparam("of_endpoint")
        pending = endpoint_is & (jobs.c.status == JobStatus.PENDING.value)
        lapsed = endpoint_is & (jobs.c.status == JobStatus.IN_PROGRESS.value) & (jobs.c.lease_until < bindparam("now"))
        # One query per kind: each reads its own range of ix_async_jobs_queue (an OR of both would read them all).
        self.oldest = [select(jobs.c.inference_id, jobs.c.created).where(kind).order_by(jobs.c.created)
                       .limit(bindparam("count")) for kind in (pending, lapsed)]
        if engine.dialect.name == "postgresql":  # gateways sharing the database take different jobs
            self.oldest = [query.with_for_update(skip_locked=True) for query in self.oldest]
        chosen = jobs.c.inference_id.in_(bindparam("ids", expanding=True))
        self.claim = update(jobs).where(chosen, pending | lapsed).values(
            status=JobStatus.IN_PROGRESS.value, lease_owner=bindparam("owner"), lease_until=bindparam("until"),
            attempts=jobs.c.attempts + 1,
        ).returning(*jobs.c)
        self.finish = update(jobs).where(
            jobs.c.inference_id.in_(bindparam("ids", expanding=True)), jobs.c.lease_owner == bindparam("owner"),
            jobs.c.status == JobStatus.IN_PROGRESS.value,
        ).values(
            status=bindparam("ended_as"), ended=bindparam("now"), failure_reason=bindparam("reason"), lease_until=None,
            notified=bindparam("told"),
        ).returning(jobs.c.inference_id)
        self.enqueue = (upsert(engine, jobs).on_conflict_do_nothing(index_elements=[jobs.c.inference_id])
                        .returning(jobs.c.inference_id))


@dataclass
class Job:
    inference_id: str
    endpoint: str
    status: str
    created: float
    expires: float
    invocation_timeout: int
    output_location: str
    input_location: str | None = None
    inline_body: bytes | None = None
    content_type: str | None = None
    accept: str | None = None
    custom_attributes: str | None = None
    failure_location: str | None = None
    attempts: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None
    ended: float | None = None
    failure_reason: str | None = None
    notified: bool = False

    @classmethod
    def from_row(cls, row) -> Job:
        return cls(**row._mapping)  # the table's columns are the fields

    def row(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Ending:
    """How a job ended, for `JobQueue.finish_many`."""

    inference_id: str
    status: JobStatus
    failure_reason: str | None = None
    notify: bool = True


def new_inference_id() -> str:
    return str(uuid.uuid4())


class JobQueue:
    """The jobs table of the store's database."""

    def __init__(self, store: Store):
        self.engine: Engine = store.engine
        metadata.create_all(self.engine)
        for index in QUEUE_INDEXES:  # create_all makes missing tables only: a database from before gets them here
            index.create(self.engine, checkfirst=True)
        self._statements = Statements(self.engine)
        on_loop = store.commits_wait_for_no_disk
        self._writer = None if on_loop else ThreadPoolExecutor(1, thread_name_prefix="servelet-queue")

    async def write(self, method: Callable[..., Result], *args) -> Result:
        """Run one of the writing methods: here, or on the queue's writing thread where a commit waits for a disk
        or a network."""
        if self._writer is None:
            return method(*args)
        return await asyncio.get_running_loop().run_in_executor(self._writer, method, *args)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=False)

    def enqueue(self, job: Job) -> Job:
        return self.enqueue_many([job])[0]

    def enqueue_many(self, new: list[Job]) -> list[Job]:
        """Add the jobs in one transaction; where a job of the same InferenceId is there already, that one is kept
        and returned instead (a client that resends its request after a lost answer gets the same job, not a
        second one)."""
        statement = self._statements.enqueue
        by_id = {job.inference_id: job for job in new}
        with self.engine.begin() as connection:
            added = set(connection.execute(statement, [job.row() for job in by_id.values()]).scalars())
            resent = [i for i in by_id if i not in added]
            if resent:
                by_id |= {row.inference_id: Job.from_row(row)
                          for row in connection.execute(select(jobs).where(jobs.c.inference_id.in_(resent)))}
        return [by_id[job.inference_id] for job in new]

    def get(self, inference_id: str) -> Job | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(jobs).where(jobs.c.inference_id == inference_id)).first()
        return None if row is None else Job.from_row(row)

    def list(self, endpoint: str | None = None, status: str | None = None, limit: int = 100) -> list[Job]:
        query = select(jobs).order_by(jobs.c.created.desc()).limit(limit)
        if endpoint is not None:
            query = query.where(jobs.c.endpoint == endpoint)
        if status is not None:
            query = query.where(jobs.c.status == JobStatus(status).value)
        with self.engine.connect() as connection:
            return [Job.from_row(row) for row in connection.execute(query)]

    def backlog(self, endpoint: str) -> int:
        """Jobs waiting or running: what an async endpoint scales on (ApproximateBacklogSize)."""
        with self.engine.connect() as connection:
            return connection.execute(
                select(func.count()).select_from(jobs).where(jobs.c.endpoint == endpoint, jobs.c.status.in_(NOT_ENDED))
            ).scalar_one()

    def lease(self, endpoint: str, owner: str, count: int, lease_seconds: float) -> list[Job]:
        """Up to `count` of the endpoint's jobs, oldest first: pending ones, and running ones whose worker's lease
        ran out. Each taken job counts an attempt."""
        if count <= 0:
            return []
        now, statements = time.time(), self._statements
        with self.engine.begin() as connection:
            # Select, then update: PostgreSQL may run an UPDATE's LIMIT subquery more than once, taking more than count.
            found = [row for query in statements.oldest
                     for row in connection.execute(query, {"of_endpoint": endpoint, "now": now, "count": count})]
            ids = [row.inference_id for row in sorted(found, key=lambda row: row.created)[:count]]
            if not ids:
                return []
            taken = [Job.from_row(row) for row in connection.execute(statements.claim, {
                "ids": ids, "of_endpoint": endpoint, "now": now, "owner": owner, "until": now + lease_seconds,
            })]
        return sorted(taken, key=lambda job: job.created)

    def renew(self, owner: str, inference_ids: list[str], lease_seconds: float) -> None:
        """The worker's heartbeat: its leases last `lease_seconds` more."""
        if not inference_ids:
            return
        with self.engine.begin() as connection:
            connection.execute(
                update(jobs).where(jobs.c.inference_id.in_(inference_ids), jobs.c.lease_owner == owner,
                                   jobs.c.status == JobStatus.IN_PROGRESS.value)
                .values(lease_until=time.time() + lease_seconds)
            )

    def release(self, owner: str, inference_id: str) -> None:
        """Give a leased job back untouched (the gateway is closing): pending again, the attempt not counted."""
        with self.engine.begin() as connection:
            connection.execute(
                update(jobs).where(jobs.c.inference_id == inference_id, jobs.c.lease_owner == owner,
                                   jobs.c.status == JobStatus.IN_PROGRESS.value)
                .values(status=JobStatus.PENDING.value, lease_owner=None, lease_until=None, attempts=jobs.c.attempts - 1)
            )

    def finish(
        self, owner: str, inference_id: str, status: JobStatus, failure_reason: str | None = None, notify: bool = True,
    ) -> bool:
        """End a job this worker holds; False when it no longer holds it (its lease ran out and another took it).
        `notify=False`: nobody is to be told (the endpoint has no webhook for it), so it is notified already."""
        return self.finish_many(owner, [Ending(inference_id, status, failure_reason, notify)])[0]

    def finish_many(self, owner: str, endings: list[Ending]) -> list[bool]:
        """`finish` for many jobs, in one transaction: one statement per kind of ending."""
        now = time.time()
        kinds: dict[tuple, list[str]] = {}
        for ending in endings:
            kinds.setdefault((ending.status, ending.failure_reason, ending.notify), []).append(ending.inference_id)
        ended: set[str] = set()
        with self.engine.begin() as connection:
            for (status, failure_reason, notify), ids in kinds.items():
                ended.update(connection.execute(self._statements.finish, {
                    "ids": ids, "owner": owner, "ended_as": status.value, "now": now, "reason": failure_reason,
                    "told": not notify,
                }).scalars())
        return [ending.inference_id in ended for ending in endings]

    def expire(self) -> list[Job]:
        """Pending jobs past their TTL: expired, and returned for their failure notice."""
        now = time.time()
        late = (jobs.c.status == JobStatus.PENDING.value) & (jobs.c.expires < now)
        with self.engine.begin() as connection:
            ids = connection.execute(select(jobs.c.inference_id).where(late)).scalars().all()
            if not ids:
                return []
            connection.execute(update(jobs).where(late, jobs.c.inference_id.in_(ids)).values(
                status=JobStatus.EXPIRED.value, ended=now,
                failure_reason="the job was not started before its RequestTTLSeconds passed",
            ))
            rows = connection.execute(select(jobs).where(jobs.c.inference_id.in_(ids))).all()
        return [Job.from_row(row) for row in rows]

    def unnotified(self, limit: int = 100) -> list[Job]:
        """Ended jobs whose notification is still to be delivered (after a crash too)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(jobs).where(jobs.c.notified == false(), jobs.c.status.in_(ENDED)).order_by(jobs.c.ended).limit(limit)
            ).all()
        return [Job.from_row(row) for row in rows]

    def mark_notified(self, inference_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(jobs).where(jobs.c.inference_id == inference_id).values(notified=True))


class GroupCommit(Generic[Item, Result]):
    """Calls made at the same moment go to the store in one transaction: `commit` takes a list of items and
    returns one result per item, in a thread. Each caller waits for the commit that holds its item (so a 202
    still means "stored"), and while one commit runs the next callers gather for the following one. A caller
    alone waits for nobody. Used for accepting jobs and for ending them, the way the queue writes (`_run`)."""

    def __init__(self, queue: JobQueue, commit: Callable[[list[Item]], list[Result]]):
        self.queue = queue
        self.commit = commit
        self._pending: list[tuple[Item, asyncio.Future]] = []
        self._committer: asyncio.Task | None = None  # referenced, or the loop may collect it mid-commit

    async def __call__(self, item: Item) -> Result:
        done = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit())
        return await done

    async def _commit(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every caller of the batch hears of it
                    for _, waiting in batch:
                        if not waiting.done():
                            waiting.set_exception(exc)
                    continue
                for (_, waiting), result in zip(batch, results):
                    if not waiting.done():
                        waiting.set_result(result)
        finally:
            self._committer = None

    async def _run(self, items: list[Item]) -> list[Result]:
        return await self.queue.write(self.commit, items)
