"""The async-inference queue on real databases (an SQLite file, and PostgreSQL): leases, endings, resends, and the
group commits that batch them."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event
from postgres import new_database

from servelet.control.async_queue import Ending, GroupCommit, Job, JobQueue, JobStatus
from servelet.control.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return Store.default_url(tmp_path)
    return new_database(request.getfixturevalue("postgres"))[1]


@pytest.fixture
def queue(database_url):
    store = Store(database_url)
    jobs = JobQueue(store)
    yield jobs
    jobs.close()
    store.close()


def job(inference_id: str, created: float, endpoint: str = "e", body: bytes = b"{}") -> Job:
    return Job(inference_id=inference_id, endpoint=endpoint, status=JobStatus.PENDING.value, created=created,
               expires=created + 3600, invocation_timeout=900, output_location=f"file:///tmp/{inference_id}.out",
               inline_body=body)


def test_a_resent_job_gets_the_stored_one_back_and_new_ones_are_added(queue):
    first = queue.enqueue_many([job("a", 1.0, body=b"first")])[0]
    assert first.inline_body == b"first"
    stored = queue.enqueue_many([job("b", 2.0), job("a", 3.0, body=b"again"), job("c", 4.0)])
    assert [j.inference_id for j in stored] == ["b", "a", "c"]
    assert stored[1].inline_body == b"first" and stored[1].created == 1.0  # the first one, untouched
    assert {j.inference_id for j in queue.list()} == {"a", "b", "c"}


def test_leases_take_the_oldest_pending_jobs_of_the_endpoint_once(queue):
    queue.enqueue_many([job("new", 3.0), job("old", 1.0), job("mid", 2.0), job("other", 0.5, endpoint="f")])
    taken = queue.lease("e", "w1", 2, lease_seconds=30)
    assert [j.inference_id for j in taken] == ["old", "mid"]
    assert all(j.status == JobStatus.IN_PROGRESS.value and j.lease_owner == "w1" and j.attempts == 1 for j in taken)
    assert [j.inference_id for j in queue.lease("e", "w2", 5, lease_seconds=30)] == ["new"]
    assert queue.lease("e", "w3", 5, lease_seconds=30) == []
    assert queue.backlog("e") == 3


def test_a_lease_that_ran_out_is_taken_again_and_only_its_new_holder_ends_it(queue):
    queue.enqueue_many([job("a", 1.0)])
    assert [j.inference_id for j in queue.lease("e", "dead", 1, lease_seconds=0.01)] == ["a"]
    time.sleep(0.05)
    retaken = queue.lease("e", "alive", 1, lease_seconds=30)
    assert [(j.inference_id, j.attempts) for j in retaken] == [("a", 2)]
    assert queue.finish_many("dead", [Ending("a", JobStatus.COMPLETED)]) == [False]
    assert queue.finish_many("alive", [Ending("a", JobStatus.COMPLETED)]) == [True]
    assert queue.get("a").status == JobStatus.COMPLETED.value


def test_endings_of_several_kinds_in_one_call(queue):
    queue.enqueue_many([job(i, float(n)) for n, i in enumerate("abcd")])
    queue.lease("e", "w", 3, lease_seconds=30)  # a, b, c; d stays pending
    ended = queue.finish_many("w", [
        Ending("a", JobStatus.COMPLETED, notify=False), Ending("b", JobStatus.FAILED, "broke"),
        Ending("c", JobStatus.COMPLETED), Ending("d", JobStatus.COMPLETED),
    ])
    assert ended == [True, True, True, False]
    a, b, c, d = (queue.get(i) for i in "abcd")
    assert (a.status, a.notified) == (JobStatus.COMPLETED.value, True)
    assert (b.status, b.failure_reason, b.notified) == (JobStatus.FAILED.value, "broke", False)
    assert (c.status, c.notified) == (JobStatus.COMPLETED.value, False)
    assert d.status == JobStatus.PENDING.value
    assert {j.inference_id for j in queue.unnotified()} == {"b", "c"}


def test_a_released_job_is_pending_again_without_the_attempt(queue):
    queue.enqueue_many([job("a", 1.0)])
    queue.lease("e", "w", 1, lease_seconds=30)
    queue.release("w", "a")
    again = queue.get("a")
    assert (again.status, again.attempts, again.lease_owner) == (JobStatus.PENDING.value, 0, None)


def test_calls_made_together_share_a_commit_and_each_gets_its_own_result(queue):
    batches: list[int] = []

    def enqueue_many(new: list[Job]) -> list[Job]:
        batches.append(len(new))
        return queue.enqueue_many(new)

    async def accept_many() -> list[Job]:
        commits = GroupCommit(queue, enqueue_many)
        return await asyncio.gather(*(commits(job(f"j{n}", float(n))) for n in range(50)))

    stored = asyncio.run(accept_many())
    assert [j.inference_id for j in stored] == [f"j{n}" for n in range(50)]
    assert sum(batches) == 50 and len(batches) < 50  # the first alone, the rest gathered behind it
    assert queue.backlog("e") == 50


def test_a_failed_commit_reaches_every_caller_of_its_batch(queue):
    async def accept_two() -> list:
        commits = GroupCommit(queue, lambda items: 1 / 0)
        return await asyncio.gather(commits(job("a", 1.0)), commits(job("b", 2.0)), return_exceptions=True)

    assert [type(r) for r in asyncio.run(accept_two())] == [ZeroDivisionError, ZeroDivisionError]


def test_gateways_sharing_the_database_lease_each_job_once(database_url):
    """Four gateways' queues (each its own store and connections) lease from one database at the same time."""
    stores = [Store(database_url) for _ in range(4)]
    queues = [JobQueue(store) for store in stores]
    try:
        queues[0].enqueue_many([job(f"j{n}", float(n)) for n in range(200)])

        def lease_all(index: int) -> list[str]:
            taken = []
            while batch := queues[index].lease("e", f"gateway-{index}", 7, lease_seconds=30):
                taken += [j.inference_id for j in batch]
            return taken

        with ThreadPoolExecutor(4) as pool:
            taken = [i for leased in pool.map(lease_all, range(4)) for i in leased]
        assert sorted(taken) == sorted(f"j{n}" for n in range(200))  # every job, none twice
    finally:
        for queue, store in zip(queues, stores):
            queue.close()
            store.close()


def test_the_queue_s_frequent_queries_do_not_read_the_ended_jobs(tmp_path):
    """Ended jobs are kept (their status is asked for) and pile up: a lease, an ending, a backlog count and an expiry
    pass must cost the same with 100 or 10,000 of them (counted in SQLite VM instructions, not timed)."""
    store = Store(Store.default_url(tmp_path))
    queue = JobQueue(store)
    instructions = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def count_instructions(connection, *_):
        connection.connection.driver_connection.set_progress_handler(lambda: instructions.append(1), 100)

    def cost_with_ended(ended: int) -> int:
        queue.enqueue_many([job(f"{ended}-{i}", float(i)) for i in range(ended)])
        leased = queue.lease("e", "w", ended, lease_seconds=30)
        queue.finish_many("w", [Ending(j.inference_id, JobStatus.COMPLETED, notify=False) for j in leased])
        queue.enqueue_many([job(f"{ended}-waiting-{i}", 1e9 + i) for i in range(32)])
        instructions.clear()
        queue.finish_many("w", [Ending(j.inference_id, JobStatus.COMPLETED, notify=False)
                                for j in queue.lease("e", "w", 32, lease_seconds=30)])
        queue.backlog("e")
        queue.expire()
        queue.unnotified()
        return len(instructions)

    few, many = cost_with_ended(100), cost_with_ended(10_000)
    queue.close()
    store.close()
    assert many < 2 * few, f"{few} hundred instructions with 100 ended jobs, {many} with 10,100"
