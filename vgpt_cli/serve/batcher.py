"""Dynamic batching: requests' images wait in one queue; a worker takes up to `max_batch` of them, or
what has come within `max_wait_ms` of the first, and runs them as one batch on one model thread.

The worker waits only for images it knows are coming: a request announces itself on arrival and
while its body is read and its images decoded (`announce` / `retract`), and the clients of the last
batch, answered just before the next batch forms, are expected back: a batch smaller than the last one
waits for them too (closed-loop clients: 16 of them were otherwise served in batches of 15, 1, 15, 1,
...). With nothing announced and the batch as large as the last one it starts at once, so a lone
request never pays the wait (after a larger batch, once: then the last batch is its own); under load
the wait lets the images still being decoded join the batch instead of starting a batch of one after it.

While a batch forms, its first images are already prepared in the model thread (`prepare`: the
server's backbone), which would otherwise sit idle through the wait; images that arrive while that
runs join the batch even past the wait (the model is busy with the batch anyway), up to max_batch.
With max_batch 1 nothing waits, and each image is prepared, then run, as before.

The event loop only moves jobs; prepare and the batch function run in a single worker thread (one model in
memory, one batch at a time), so the server keeps answering /health and accepting uploads while the
model works. A job whose future was cancelled (its client went away) is dropped before it reaches
the model, and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """One image of one request."""

    item: Any                           # what the batch function takes (here: a PIL image)
    options: dict[str, Any]             # per-request options (here: {"attention": bool})
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    withdrawn: int = 0                  # jobs cancelled by their request (its client left)
    dropped: int = 0                    # withdrawn jobs the worker then skipped (never reached the model)
    failed_batches: int = 0
    largest_batch: int = 0


class Batcher:
    """run_batch(items, options_list) -> results (one per item, in order), called in one thread; with
    prepare(items) -> prepared items (one per item, in order), run_batch gets the prepared items, and
    prepare runs (in the same thread) on the images of a batch still forming (see _next_batch)."""

    def __init__(self, run_batch: Callable[[list[Any], list[dict[str, Any]]], Sequence[Any]], *,
                 max_batch: int = 16, max_wait_ms: float = 50.0,
                 prepare: Callable[[list[Any]], list[Any]] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: use 1 or more")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms}: use 0 or more")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000.0
        self.prepare = prepare  # items -> what run_batch takes, one per item: run while the batch forms
        self.stats = BatchStats()
        self.announced = 0  # images (or requests not yet parsed) on their way to submit()
        self.last_batch = 0  # images in the last batch run
        self._queue: asyncio.Queue[Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgpt-model")
        self._worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait().future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._worker = self._executor = self._queue = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def submit(self, items: Sequence[Any], options: dict[str, Any]) -> list[asyncio.Future]:
        """Queue the items; one future per item. Cancel a future to withdraw its item."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            job = Job(item, options, loop.create_future())
            self._queue.put_nowait(job)
            futures.append(job.future)
        return futures

    def announce(self, n: int) -> None:
        """n more images are on their way (being received or decoded)."""
        self.announced += n

    def retract(self, n: int) -> None:
        """n announced images arrived (call just before submit) or will not come."""
        self.announced = max(0, self.announced - n)

    def _take(self, batch: list[Job], job: Job) -> None:
        if job.future.done():  # withdrawn (its client left): never reaches the model
            self.stats.dropped += 1
        else:
            batch.append(job)

    def withdraw(self, futures: Sequence[asyncio.Future]) -> None:
        """Cancel the jobs of these futures that have no result yet; the worker skips them."""
        for f in futures:
            if not f.done():
                f.cancel()
                self.stats.withdrawn += 1

    async def _next_batch(self) -> tuple[list[Job], list[Any] | Exception]:
        """The next batch's jobs, and with `prepare` their prepared items (or the exception it raised).

        While the batch forms, `prepare` already runs in the model thread on the images taken so far
        (the model would otherwise sit idle through the wait); images that arrive while it runs join the
        batch even after max_wait (the model is busy with this batch anyway), up to max_batch."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch: list[Job] = []
        ready: list[Any] = []                      # prepare's results for batch[:len(ready)]
        running: asyncio.Future | None = None      # a prepare in the model thread
        failed: Exception | None = None

        def harvest() -> None:
            nonlocal running, failed
            if running is not None and running.done():
                try:
                    ready.extend(running.result())
                except Exception as e:  # noqa: BLE001 - the batch fails with it (see _work)
                    failed = e
                running = None

        def prepare_the_rest() -> None:
            nonlocal running
            if self.prepare is not None and running is None and failed is None and len(ready) < len(batch):
                running = loop.run_in_executor(self._executor, self.prepare, [j.item for j in batch[len(ready):]])

        try:
            while not batch:
                self._take(batch, await self._queue.get())
            deadline = time.monotonic() + self.max_wait
            # the clients of the last batch were answered just now: under load they send their next
            # images at once, so a batch smaller than the last one also waits for those
            expected = min(self.last_batch, self.max_batch)
            while True:
                while len(batch) < self.max_batch and not self._queue.empty():  # already waiting: no timer
                    self._take(batch, self._queue.get_nowait())
                harvest()
                prepare_the_rest()
                if len(batch) >= self.max_batch or failed is not None:  # full, or failing: no one else joins
                    break
                left = deadline - time.monotonic()
                # more is known to be coming, or the batch is smaller than the last one
                wait = left > 0 and (self.announced > 0 or len(batch) < expected)
                if not wait and running is None:
                    break
                getter = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({getter} if running is None else {getter, running},
                                   timeout=left if wait else None, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()  # a get that won the race still hands over its job below: none is lost
                    await asyncio.wait({getter})
                if not getter.cancelled():
                    self._take(batch, getter.result())
            if running is not None:
                await asyncio.wait({running})
                harvest()
            prepare_the_rest()
            if running is not None:
                await asyncio.wait({running})
                harvest()
        except asyncio.CancelledError:  # stopping: what was gathered will not run; its requests hear so
            for j in batch:
                j.future.cancel()
            raise
        if failed is not None:
            return batch, failed
        return batch, (ready if self.prepare is not None else [j.item for j in batch])

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch, items = await self._next_batch()
            try:
                if isinstance(items, Exception):  # prepare failed
                    raise items
                results = await loop.run_in_executor(self._executor, self.run_batch, items, [j.options for j in batch])
            except Exception as e:  # the model failed: every waiting client hears why; the worker goes on
                self.stats.failed_batches += 1
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.images += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self.last_batch = len(batch)
            for j, r in zip(batch, results):
                if not j.future.done():
                    j.future.set_result(r)
