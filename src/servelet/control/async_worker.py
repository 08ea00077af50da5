"""Async inference, the worker: runs the queue's jobs on their endpoint's instances, writes each answer to its
output location (or the error to its failure location), and tells the endpoint's webhooks.

One `AsyncWorker` per gateway, leasing jobs under an owner id of its own. Each pass (every `interval`, and at once
when a job is accepted) it expires jobs past their TTL, leases twice as many of each async endpoint's jobs as its
ready instances take (`MaxConcurrentInvocationsPerInstance` each: the invocation slots; the other half waits here
for a slot), renews its leases (the heartbeat: a gateway killed mid-job leaves leases that run out, and the next
gateway's worker takes those jobs again) and delivers pending notifications. A job retried after its output was
already written (the worker died between writing and recording it) is completed without running the model again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import httpx

from .. import objects
from ..errors import NOT_NOW, GatewayError, ModelFailed
from .async_queue import Ending, GroupCommit, Job, JobQueue, JobStatus
from .invocation import Invocation
from .loop import ControlLoop
from .resources import AsyncInferenceConfig, EndpointStatus
from .router import Router
from .store import Store

log = logging.getLogger("servelet.async")

LEASE_SECONDS = 30.0  # the default: renewed every pass, a lease outlives its worker by at most this
NOTIFY_ATTEMPTS = 5
SLOW_WORK_EVERY_S = 0.5
MIN_PASS_GAP_S = 0.01  # a burst of accepted jobs wakes the worker once per gap, not once per job
# Jobs leased per invocation slot: the extra ones wait in the worker for a slot, so a slot that frees goes to the
# next job at once rather than after a pass and a lease transaction.
LEASED_PER_SLOT = 2
NOTIFY_TIMEOUT_S = 10.0
# Answers up to this size, to file:// locations, are written together (GroupWrite); a larger one on its own.
GROUPED_WRITE_BYTES = 1 << 20


class AsyncWorker(ControlLoop):
    """Runs async jobs; `configs()` gives the async endpoints in service and their AsyncInferenceConfig."""

    doing = "running async inference jobs"

    def __init__(
        self, queue: JobQueue, router: Router, configs: Callable[[], dict[str, AsyncInferenceConfig]],
        max_input_bytes: int, lease_seconds: float = LEASE_SECONDS, interval: float = 0.5,
    ):
        self.queue = queue
        self.lease_seconds = lease_seconds
        self.router = router
        self.configs = configs
        self.max_input_bytes = max_input_bytes
        self.interval = interval
        self.owner = f"gateway-{uuid.uuid4()}"
        self._enqueue = GroupCommit(queue, queue.enqueue_many)
        self._finish_many = GroupCommit(queue, lambda endings: queue.finish_many(self.owner, endings))
        self._write_files = GroupWrite()
        self.known: dict[str, AsyncInferenceConfig] = {}  # the async endpoints at the last pass
        self._slow_work_at = self._renewed_at = 0.0
        self.running: dict[str, asyncio.Task] = {}  # by InferenceId
        self._running_for: dict[str, str] = {}  # InferenceId -> endpoint
        self._slots: dict[str, Slots] = {}  # by endpoint: its invocations in flight
        self._notifying: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A job was accepted: run a pass now rather than at the next interval."""
        self._wake.set()

    async def accept(self, job: Job) -> Job:
        """Store a new job (with the others accepted at the same moment) and wake the worker for it."""
        stored = await self._enqueue(job)
        self.wake()
        return stored

    async def config_of(self, endpoint: str) -> AsyncInferenceConfig | None:
        """The endpoint's AsyncInferenceConfig as of the last pass; read now for an endpoint the pass has not seen."""
        if endpoint not in self.known:
            self.known = await asyncio.to_thread(self.configs)
        return self.known.get(endpoint)

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await asyncio.sleep(MIN_PASS_GAP_S)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad pass must not end the loop
                log.exception("%s failed; trying again in %g s", self.doing, self.interval)

    async def tick(self) -> None:
        """Lease what the instances have room for; the rest (expiry, configs, heartbeat, notifications) at most
        once per SLOW_WORK_EVERY_S, so that a burst of accepted jobs costs a lease transaction per pass and no more."""
        now = time.monotonic()
        slow_work = now - self._slow_work_at >= SLOW_WORK_EVERY_S
        if slow_work:
            self._slow_work_at = now
            await self.queue.write(self.queue.expire)
            self.known = await asyncio.to_thread(self.configs)
        for endpoint, config in self.known.items():
            await self._lease(endpoint, config)
        if now - self._renewed_at >= self.lease_seconds / 4:  # the heartbeat: well before a lease runs out
            self._renewed_at = now
            await self.queue.write(self.queue.renew, self.owner, list(self.running), self.lease_seconds)
        if slow_work:
            await self._notify(self.known)

    async def _lease(self, endpoint: str, config: AsyncInferenceConfig) -> None:
        # With no ready instance, one instance's worth still goes: invoking a variant at zero starts its instance.
        capacity = max(self._ready_instances(endpoint), 1) * config.concurrency_per_instance
        await self._slots.setdefault(endpoint, Slots(capacity)).resize(capacity)
        room = LEASED_PER_SLOT * capacity - sum(1 for e in self._running_for.values() if e == endpoint)
        if room <= 0:
            return
        for job in await self.queue.write(self.queue.lease, endpoint, self.owner, room, self.lease_seconds):
            self._running_for[job.inference_id] = endpoint
            self.running[job.inference_id] = asyncio.create_task(self._run_job(job))

    def _ready_instances(self, endpoint: str) -> int:
        running = self.router.fleet.endpoints.get(endpoint)
        return sum(len(v.ready_instances()) for v in running.variants) if running is not None else 0

    async def _run_job(self, job: Job) -> None:
        try:
            await self._answer(job)
        except asyncio.CancelledError:
            await asyncio.shield(self.queue.write(self.queue.release, self.owner, job.inference_id))
            raise
        except Exception as exc:  # noqa: BLE001 - a job that breaks the worker's own code fails, loudly, alone
            log.exception("async job %s failed in the worker", job.inference_id)
            await self._fail(job, f"servelet could not run the job: {type(exc).__name__}: {exc}")
        finally:
            self.running.pop(job.inference_id, None)
            self._running_for.pop(job.inference_id, None)
            self.wake()  # its room goes to the next job now, not at the next interval

    async def _answer(self, job: Job) -> None:
        if job.attempts > 1:  # an earlier attempt's worker died, maybe mid-write; this lease is the only writer now
            await objects.remove_unfinished_writes(job.output_location)
            if job.failure_location:
                await objects.remove_unfinished_writes(job.failure_location)
            if await objects.exists(job.output_location):
                log.info("async job %s: its output was written before its worker stopped; completing it", job.inference_id)
                await self._finish(job, JobStatus.COMPLETED)
                return
        invocation = Invocation(
            endpoint=job.endpoint, body=job.inline_body or b"", content_type=job.content_type or "application/json",
            accept=job.accept, custom_attributes=job.custom_attributes, inference_id=job.inference_id,
            timeout=job.invocation_timeout,
        )
        try:
            await self._invoke(job, invocation)
        except TimeoutError:
            await self._fail(job, f"the model did not answer within InvocationTimeoutSeconds ({job.invocation_timeout} s)")
            return
        except objects.ObjectStoreError as exc:
            await self._fail(job, f"the input could not be read: {exc}")
            return
        except NOT_NOW as exc:
            log.debug("async job %s goes back to the queue: %s", job.inference_id, exc.message)
            await self.queue.write(self.queue.release, self.owner, job.inference_id)
            return
        except GatewayError as exc:
            await self._fail(job, _model_failure(exc), exc)
            return
        if await self._finish(job, JobStatus.COMPLETED):
            # A line per job is the audit trail of "completed once" (bench/async_crash.py counts them); it costs
            # the gateway about 0.15 ms per job.
            log.info("async job %s completed: %s", job.inference_id, job.output_location)

    async def _invoke(self, job: Job, invocation: Invocation) -> None:
        """Run the model, in one of the endpoint's invocation slots, within the job's InvocationTimeoutSeconds, and
        write its answer. A body sent with the request is small (128,000 bytes at most): its answer is written
        after the slot is given back. An input location's object streams to the instance and the answer streams
        to the output location, so the gateway holds a few chunks of either, whatever their size."""
        slot = self._slots.setdefault(job.endpoint, Slots(1))
        if job.input_location is None:
            async with slot, asyncio.timeout(job.invocation_timeout):
                answer = await self.router.invoke(invocation)
            await self._write_answer(job.output_location, answer.body, answer.content_type, self._kms_key(job))
            return
        size = await objects.size(job.input_location)
        if size > self.max_input_bytes:
            raise objects.ObjectStoreError(
                f"{job.input_location} has {size:,} bytes; async inputs may have {self.max_input_bytes:,} "
                "(SERVELET_ASYNC_MAX_INPUT_BYTES)"
            )
        async with slot, asyncio.timeout(job.invocation_timeout):
            async with self.router.upload(invocation, objects.read_chunks(job.input_location), size) as answer:
                await objects.write_chunks(job.output_location, answer.chunks, answer.content_type, self._kms_key(job))

    def _kms_key(self, job: Job) -> str | None:
        """The endpoint's KmsKeyId: S3 encrypts its outputs and failures with it (file:// outputs take none)."""
        config = self.known.get(job.endpoint)
        return config.output_config.kms_key_id if config else None

    async def _write_answer(self, uri: str, body: bytes, content_type: str, kms_key_id: str | None) -> None:
        location = objects.parse(uri)
        if isinstance(location, objects.FileLocation) and len(body) <= GROUPED_WRITE_BYTES:
            if (error := await self._write_files((location, body))) is not None:
                raise error
            return
        await objects.write_bytes(uri, body, content_type, kms_key_id)  # S3: each PUT in a thread of its own

    async def _fail(self, job: Job, reason: str, error: GatewayError | None = None) -> None:
        """Record the failure, and write it to the failure location when the endpoint has one."""
        if job.failure_location:
            body = json.dumps({"InferenceId": job.inference_id, "ErrorMessage": reason}
                              | ({"OriginalStatusCode": error.original_status} if isinstance(error, ModelFailed) else {}))
            try:
                await objects.write_bytes(job.failure_location, body.encode(), "application/json", self._kms_key(job))
            except objects.ObjectStoreError as exc:
                reason += f" (and the failure location could not be written: {exc})"
        if await self._finish(job, JobStatus.FAILED, reason):
            log.warning("async job %s failed: %s", job.inference_id, reason)

    async def _finish(self, job: Job, status: JobStatus, reason: str | None = None) -> bool:
        notify = webhook_for(self.known.get(job.endpoint), status.value) is not None
        return await self._finish_many(Ending(job.inference_id, status, reason, notify))

    # -- notifications --------------------------------------------------------------------------------------
    async def _notify(self, configs: dict[str, AsyncInferenceConfig]) -> None:
        for job in await asyncio.to_thread(self.queue.unnotified):
            if job.inference_id in self._notifying:
                continue
            url = webhook_for(configs.get(job.endpoint), job.status)
            if url is None:
                await self.queue.write(self.queue.mark_notified, job.inference_id)
                continue
            task = asyncio.create_task(self._deliver(job, url))
            self._notifying[job.inference_id] = task
            task.add_done_callback(lambda _, i=job.inference_id: self._notifying.pop(i, None))

    async def _deliver(self, job: Job, url: str) -> None:
        """POST the job's outcome, as SageMaker publishes it to SNS; retried with backoff, then given up (logged)."""
        delay = 1.0
        async with httpx.AsyncClient(timeout=NOTIFY_TIMEOUT_S) as client:
            for attempt in range(1, NOTIFY_ATTEMPTS + 1):
                try:
                    response = await client.post(url, json=notification_body(job))
                    if response.status_code < 300:
                        break
                    problem = f"answered {response.status_code}"
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if attempt == NOTIFY_ATTEMPTS:
                    log.warning("async job %s: webhook %s not told after %d attempts (%s); giving up",
                                job.inference_id, url, attempt, problem)
                    break
                await asyncio.sleep(delay)
                delay *= 2
        await self.queue.write(self.queue.mark_notified, job.inference_id)

    async def close(self) -> None:
        """Stop: jobs in progress go back to the queue (the next gateway runs them), nothing half-done is kept."""
        await super().close()
        tasks = list(self.running.values()) + list(self._notifying.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class GroupWrite(GroupCommit):
    """Jobs' answers to files, written together in one thread call as they come (each caller gets its own error or
    None): a thread hop per answer cost the event loop about three times what its share of a grouped one does
    (docs/benchmarks.md)."""

    def __init__(self):
        super().__init__(None, objects.write_files)

    async def _run(self, items: list) -> list:
        return await asyncio.to_thread(self.commit, items)


class Slots:
    """An endpoint's invocation slots: at most `capacity` jobs invoke it at once (its ready instances ×
    MaxConcurrentInvocationsPerInstance); the capacity follows its instances."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.busy = 0
        self._changed = asyncio.Condition()

    async def resize(self, capacity: int) -> None:
        async with self._changed:
            self.capacity = capacity
            self._changed.notify_all()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.busy < self.capacity)
            self.busy += 1

    async def __aexit__(self, *exc) -> None:
        async with self._changed:
            self.busy -= 1
            self._changed.notify()


def webhook_for(config: AsyncInferenceConfig | None, status: str) -> str | None:
    """The URL to tell of a job that ended with `status`, if the endpoint has one."""
    notification = config.output_config.notification_config if config else None
    if notification is None:
        return None
    return notification.success_topic if status == JobStatus.COMPLETED.value else notification.error_topic


def async_endpoints(store: Store) -> dict[str, AsyncInferenceConfig]:
    """The endpoints serving (in service, or updating) with an AsyncInferenceConfig: the one their record keeps
    (endpoints created before records kept it: their endpoint config's)."""
    found = {}
    for status in (EndpointStatus.IN_SERVICE, EndpointStatus.UPDATING):
        for record in store.list_endpoints(status=status):
            config = record.async_inference_config
            if config is None and (spec := store.get_endpoint_config(record.endpoint_config_name)) is not None:
                config = spec.async_inference_config
            if config is not None:
                found[record.endpoint_name] = AsyncInferenceConfig.model_validate(config)
    return found


def _model_failure(error: GatewayError) -> str:
    if isinstance(error, ModelFailed):
        return f"the model answered {error.original_status}: {error.message}"
    return error.message


def notification_body(job: Job) -> dict:
    """SageMaker's async notification message (what its SNS topics carry), for a webhook."""
    completed = job.status == JobStatus.COMPLETED.value
    body = {
        "awsRegion": "local",
        "eventTime": _iso(job.ended or time.time()),
        "receivedTime": _iso(job.created),
        "invocationStatus": job.status,
        "requestParameters": {
            "contentType": job.content_type, "endpointName": job.endpoint,
            "inputLocation": job.input_location or "(sent with the request)",
        },
        "inferenceId": job.inference_id,
        "eventVersion": "1.0",
        "eventSource": "aws:sagemaker",
        "eventName": "InferenceResult" if completed else "InferenceFailed",
    }
    if completed:
        body["responseParameters"] = {"contentType": job.accept or job.content_type, "outputLocation": job.output_location}
    else:
        body["failureReason"] = job.failure_reason
        if job.failure_location:
            body["responseParameters"] = {"failureLocation": job.failure_location}
    return body


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
