"""Batch transform jobs, run: the job's own instances of its model, its inputs file by file, its records in
batches, one `<input name>.out` per input file.

Nothing is lost or done twice across a crash. Each batch's answer is written (atomically) as a *part* named by the
batch's file and first record under `<S3OutputPath>/.servelet-parts/<job>/`; batch boundaries depend only on the
input and the job's settings, so a job resumed after a crash reads its records again, skips every batch whose part
exists and runs the rest. A file's output is assembled from its parts, in record order, once they are all there,
written atomically, and its parts deleted; the store counts the files done. A job found InProgress when the gateway
starts is resumed; `StopTransformJob` stops it within seconds and keeps what was written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .. import objects
from ..errors import NOT_NOW, GatewayError, ModelFailed
from ..transform.filters import DataProcessing, FilterError
from ..transform.inputs import InputObject, list_inputs
from ..transform.outputs import Assembler, output_uri
from ..transform.records import Batch, batches, records
from .endpoints import Fleet, VariantPlan
from .invocation import Invocation
from .resources import TransformJobSpec, TransformJobStatus, now
from .router import Router
from .store import Store

log = logging.getLogger("servelet.transform")

PARTS_FOLDER = ".servelet-parts"
RETRY_DELAY_S = 1.0


@dataclass(frozen=True)
class JobPlan:
    """What a run reads of the job's spec, in one place."""

    name: str
    data_source: dict
    content_type: str
    compression: str
    split: str
    strategy: str
    max_payload_bytes: int
    concurrency: int
    instances: int
    timeout: float
    retries: int
    output_path: str
    accept: str | None
    assemble_with: str
    processing: DataProcessing
    kms_key_id: str | None = None  # S3 encrypts the outputs (and their parts) with it

    @classmethod
    def of(cls, spec: TransformJobSpec) -> JobPlan:
        source, output = spec.transform_input, spec.transform_output
        client = spec.model_client_config
        return cls(
            name=spec.transform_job_name,
            data_source=source.data_source.model_dump(by_alias=True),
            content_type=source.content_type or "application/json",
            compression=source.compression_type or "None",
            split=source.split_type or "None",
            strategy=spec.batch_strategy or "MultiRecord",
            max_payload_bytes=(spec.max_payload_in_mb or 6) * 1024 * 1024,
            concurrency=spec.max_concurrent_transforms or 1,
            instances=spec.transform_resources.instance_count,
            timeout=client.invocations_timeout_in_seconds if client else 600,
            retries=client.invocations_max_retries if client else 3,
            output_path=output.s3_output_path,
            accept=output.accept,
            assemble_with=output.assemble_with or "None",
            processing=DataProcessing.parse(spec.data_processing),
            kms_key_id=output.kms_key_id,
        )

    def parts_prefix(self, file: int) -> str:
        return objects.join(self.output_path, f"{PARTS_FOLDER}/{self.name}/{file:06d}")


class RecordsFailed(Exception):
    """A batch whose records cannot be transformed: counted and reported, the job goes on."""


class TransformRunner:
    """Runs each transform job as one task; `start` and `stop` are what the control API calls."""

    def __init__(self, store: Store, fleet: Fleet, router: Router, instance_start_timeout: float):
        self.store = store
        self.fleet = fleet
        self.router = router
        self.instance_start_timeout = instance_start_timeout
        self.tasks: dict[str, asyncio.Task] = {}
        self._stop_asked: set[str] = set()
        self._ended: set[str] = set()  # jobs this runner ended
        self._saving: dict[str, asyncio.Lock] = {}  # per job: its saves land in the order they were made

    def start(self, spec: TransformJobSpec) -> None:
        name = spec.transform_job_name
        self._ended.discard(name)
        if name not in self.tasks:
            self.tasks[name] = asyncio.create_task(self._run(name))
            self.tasks[name].add_done_callback(lambda _: self.tasks.pop(name, None))

    async def stop(self, name: str) -> None:
        self._stop_asked.add(name)
        if (task := self.tasks.get(name)) is not None:
            task.cancel()
        else:
            await self._set_status(name, TransformJobStatus.STOPPED)

    async def resume(self) -> None:
        """At the gateway's start: jobs a stopped gateway left running go on; those it was stopping stop."""
        for spec in await asyncio.to_thread(self.store.list_transform_jobs):
            if spec.transform_job_status == TransformJobStatus.STOPPING:
                await self._set_status(spec.transform_job_name, TransformJobStatus.STOPPED)
            elif spec.transform_job_status == TransformJobStatus.IN_PROGRESS:
                log.info("transform job %s: resuming", spec.transform_job_name)
                self.start(spec)

    async def close(self) -> None:
        """The gateway stops: running jobs stay InProgress in the store, and the next start resumes them."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one job ---------------------------------------------------------------------------------------------
    async def _run(self, name: str) -> None:
        spec = await asyncio.to_thread(self.store.get_transform_job, name)
        endpoint = f"transform-job-{name}"
        try:
            plan = JobPlan.of(spec)
            model = await asyncio.to_thread(self.store.get_model, spec.model_name)
            if model is None:
                raise RecordsFailed(f"the model {spec.model_name!r} no longer exists")
            if spec.transform_start_time is None:
                spec.transform_start_time = now()
            inputs = await list_inputs(plan.data_source)
            spec.files_total = len(inputs)
            await self._save(spec)
            env = model.instance_environment() | (spec.environment or {})
            await self.fleet.deploy_variants(
                endpoint, [VariantPlan("AllTraffic", model.uri, plan.instances, env=env)], self.instance_start_timeout,
            )
            why = await self.fleet.wait_ready(endpoint, self.instance_start_timeout)
            if why is not None:
                raise RecordsFailed(f"the job's instances did not start: {why}")
            for index, source in enumerate(inputs):
                if index < spec.files_done:
                    continue  # assembled before a crash
                await self._transform_file(plan, spec, index, source, endpoint)
                spec.files_done = index + 1
                await self._save(spec)
            failed_all = spec.records_failed and not spec.records_done
            await self._end(spec, TransformJobStatus.FAILED if failed_all else TransformJobStatus.COMPLETED,
                      "every record failed: see RecordFailures" if failed_all else None)
        except asyncio.CancelledError:
            if name in self._stop_asked:
                self._stop_asked.discard(name)
                await self._set_status(name, TransformJobStatus.STOPPED)
            raise
        except (RecordsFailed, objects.ObjectStoreError, FilterError, ValueError) as exc:
            await self._set_status(name, TransformJobStatus.FAILED, str(exc))
        except Exception as exc:  # noqa: BLE001 - the job fails saying why; the gateway goes on
            log.exception("transform job %s failed", name)
            await self._set_status(name, TransformJobStatus.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            await asyncio.shield(self.fleet.remove(endpoint))

    async def _transform_file(self, plan: JobPlan, spec: TransformJobSpec, index: int, source: InputObject,
                              endpoint: str) -> None:
        done = await self._parts_written(plan, index)
        originals: dict[int, bytes] = {}
        unfilterable: dict[int, str] = {}
        slots = asyncio.Semaphore(plan.concurrency * plan.instances)
        running: set[asyncio.Task] = set()
        records_in = self._filtered(plan, source, originals, unfilterable)
        try:
            async for batch in batches(records_in, plan.strategy, plan.max_payload_bytes, file=index):
                if batch.first in done:
                    _forget(originals, batch)
                    continue
                await slots.acquire()
                task = asyncio.create_task(self._batch(plan, spec, endpoint, index, batch, originals, unfilterable))
                task.add_done_callback(lambda _: slots.release())
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
        finally:  # stopped or failed: no batch may outlive its job (and count into a job that ended)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        await self._assemble(plan, index, source)

    async def _filtered(self, plan: JobPlan, source: InputObject, originals: dict[int, bytes],
                        unfilterable: dict[int, str]) -> AsyncIterator[bytes]:
        """The file's records through the InputFilter, keeping each original while its batch runs (JoinSource)."""
        index = 0
        async for record in records(source.uri, plan.compression, plan.split):
            if plan.processing.passes_through:
                yield record
            else:
                originals[index] = record
                try:
                    yield plan.processing.filter_input(record, plan.content_type)
                except FilterError as exc:
                    unfilterable[index] = str(exc)
                    yield record
            index += 1

    async def _batch(self, plan: JobPlan, spec: TransformJobSpec, endpoint: str, file: int, batch: Batch,
                     originals: dict[int, bytes], unfilterable: dict[int, str]) -> None:
        try:
            if batch.error:
                raise RecordsFailed(batch.error)
            bad = [unfilterable[i] for i in range(batch.first, batch.end) if i in unfilterable]
            if bad:
                raise RecordsFailed(f"the InputFilter does not apply: {bad[0]}")
            answer = await self._invoke(plan, endpoint, batch.body)
            output = self._process_outputs(plan, batch, answer, originals)
            await objects.write_bytes(objects.join(plan.parts_prefix(file), _part_name(batch)), output,
                                      kms_key_id=plan.kms_key_id)
            await self._count(spec, done=batch.count)
        except RecordsFailed as exc:
            await objects.write_bytes(objects.join(plan.parts_prefix(file), _part_name(batch)), b"",
                                      kms_key_id=plan.kms_key_id)
            await self._count(spec, failed=batch.count, failure=(file, batch.first, str(exc)))
        finally:
            _forget(originals, batch)

    async def _invoke(self, plan: JobPlan, endpoint: str, body: bytes) -> bytes:
        """One request, retried InvocationsMaxRetries times when it fails or times out (a refusal that says "not
        now" waits and retries without counting)."""
        invocation = Invocation(endpoint=endpoint, body=body, content_type=plan.content_type, accept=plan.accept,
                                timeout=plan.timeout)
        attempt, waiting_since = 0, None
        while True:
            try:
                async with asyncio.timeout(plan.timeout):
                    return (await self.router.invoke(invocation)).body
            except NOT_NOW as exc:
                waiting_since = waiting_since or asyncio.get_running_loop().time()
                if asyncio.get_running_loop().time() - waiting_since > plan.timeout:
                    raise RecordsFailed(f"the instances kept refusing the batch for {plan.timeout:g} s: {exc.message}") from None
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            except (GatewayError, TimeoutError) as exc:
                attempt += 1
                if attempt > plan.retries:
                    reason = exc.message if isinstance(exc, GatewayError) else f"no answer within {plan.timeout:g} s"
                    if isinstance(exc, ModelFailed):
                        reason = f"the model answered {exc.original_status}: {exc.message}"
                    raise RecordsFailed(reason) from None
                await asyncio.sleep(RETRY_DELAY_S)

    @staticmethod
    def _process_outputs(plan: JobPlan, batch: Batch, answer: bytes, originals: dict[int, bytes]) -> bytes:
        """JoinSource and OutputFilter, per record: a MultiRecord answer has one line per record."""
        if plan.processing.passes_through:
            return answer
        outputs = answer.splitlines() if batch.count > 1 or plan.split == "Line" else [answer]
        if len(outputs) != batch.count:
            raise RecordsFailed(f"the model answered {len(outputs)} lines for {batch.count} records")
        try:
            return b"\n".join(
                plan.processing.join_and_filter_output(originals[batch.first + i], output, plan.content_type)
                for i, output in enumerate(outputs)
            )
        except FilterError as exc:
            raise RecordsFailed(str(exc)) from None

    async def _parts_written(self, plan: JobPlan, file: int) -> set[int]:
        """First records of the batches whose part exists (written before a crash)."""
        return {int(p.name.rsplit("/", 1)[-1].split("-")[1]) for p in await _listed(plan.parts_prefix(file) + "/")}

    async def _assemble(self, plan: JobPlan, file: int, source: InputObject) -> None:
        parts = sorted(await _listed(plan.parts_prefix(file) + "/"), key=lambda p: p.name)
        assembler = Assembler(plan.assemble_with)

        async def assembled() -> AsyncIterator[bytes]:
            for part in parts:  # one batch's answer each: at most about MaxPayloadInMB
                answer = b"".join([chunk async for chunk in objects.read_chunks(part.uri)])
                if answer:  # an empty part stands for a batch whose records failed
                    yield assembler.assemble(answer)

        await objects.write_chunks(output_uri(plan.output_path, source), assembled(), kms_key_id=plan.kms_key_id)
        for part in parts:
            await objects.delete(part.uri)

    # -- the job's record in the store ------------------------------------------------------------------------
    async def _count(self, spec: TransformJobSpec, done: int = 0, failed: int = 0, failure: tuple | None = None) -> None:
        if spec.transform_job_name in self._ended:
            return  # a straggler of a job that has ended: its record says how it ended
        spec.records_done += done
        if failure is not None:
            file, first, reason = failure
            spec.add_record_failure(file, first, reason)
            spec.records_failed += failed - 1  # add_record_failure counted one
            log.warning("transform job %s: %d records from %d of file %d failed: %s", spec.transform_job_name, failed,
                        first, file, reason)
        if spec.transform_job_name in self._stop_asked:
            spec.transform_job_status = TransformJobStatus.STOPPING  # what the API wrote: a batch must not undo it
        await self._save(spec)

    async def _save(self, spec: TransformJobSpec) -> None:
        """In a thread (a slow store must not stall the streams on the event loop), a copy taken now (the job's
        batches go on changing `spec` meanwhile), after the job's saves made before it."""
        snapshot = spec.model_copy(deep=True)
        async with self._saving.setdefault(spec.transform_job_name, asyncio.Lock()):
            await asyncio.to_thread(self.store.save_transform_job, snapshot)
        spec.last_modified_time = snapshot.last_modified_time

    async def _end(self, spec: TransformJobSpec | None, status: TransformJobStatus, reason: str | None) -> None:
        if spec is None:
            return
        self._ended.add(spec.transform_job_name)
        spec.transform_job_status = status
        spec.failure_reason = reason
        spec.transform_end_time = now()
        await self._save(spec)
        log.info("transform job %s: %s%s", spec.transform_job_name, status.value, f" ({reason})" if reason else "")

    async def _set_status(self, name: str, status: TransformJobStatus, reason: str | None = None) -> None:
        await self._end(await asyncio.to_thread(self.store.get_transform_job, name), status, reason)


def _part_name(batch: Batch) -> str:
    """Sorts in record order; carries the batch's first record and count (what a resumed run skips)."""
    return f"part-{batch.first:012d}-{batch.count}"


def _forget(originals: dict[int, bytes], batch: Batch) -> None:
    for index in range(batch.first, batch.end):
        originals.pop(index, None)


async def _listed(prefix: str) -> list[InputObject]:
    try:
        return await list_inputs({"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": prefix}})
    except objects.ObjectStoreError:
        return []  # nothing there yet

