"""Micro-batching: requests wait in one bounded queue and are scored together.

A request reserves room for its images before it decodes them (`reserve`), so the images held
by the service, decoded or waiting, never exceed `queue_size`; a request that finds no room gets
`QueueFull` at once (the service answers 503 with Retry-After). Worker threads take the oldest
job, then keep taking jobs for the same model for up to `batch_wait_ms` or until `max_batch`
images are gathered, and score them with one call. Each job's result arrives through a
`concurrent.futures.Future`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# (model, images) -> the model's Prediction for those images, in order.
Scorer = Callable[[Any, Sequence[Any]], Any]


class QueueFull(Exception):
    """No room in the queue for a request's images right now."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the scoring queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Closed(Exception):
    """The batcher is shutting down and takes no more work."""


@dataclass
class Job:
    """Images of one request for one model, and where their result goes."""

    model: Any
    images: list[Any]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchResult:
    """A job's share of a scored batch: the batch's Prediction and the job's rows in it."""

    prediction: Any
    rows: list[int]
    batch_images: int
    queue_seconds: float
    score_seconds: float


class Reservation:
    """Room for `n` images in the queue; released when its job is taken or on `release`."""

    def __init__(self, batcher: MicroBatcher, n: int) -> None:
        self.batcher = batcher
        self.n = n
        self.active = True

    def release(self) -> None:
        """Give the room back (idempotent)."""
        if self.active:
            self.active = False
            self.batcher.give_back(self.n)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class MicroBatcher:
    """A bounded queue of scoring jobs served by `workers` threads in micro-batches."""

    def __init__(self, scorer: Scorer, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 queue_size: int = 64, workers: int = 1,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1 or queue_size < 1 or workers < 1 or batch_wait_ms < 0:
            raise ValueError("max_batch, queue_size and workers must be >= 1, batch_wait_ms >= 0")
        self.scorer = scorer
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000.0
        self.queue_size = queue_size
        self.on_batch = on_batch
        self.jobs: deque[Job] = deque()
        self.reserved = 0  # images admitted (decoding or waiting), not yet taken by a worker
        self.waiting = 0  # images of the jobs in `jobs`
        self.busy = 0  # workers scoring right now
        self.recent_batch_seconds = 0.1
        self.closed = False
        self.lock = threading.Condition()
        self.threads = [threading.Thread(target=self.work, name=f"patchcore-batcher-{i}",
                                         daemon=True) for i in range(workers)]
        for t in self.threads:
            t.start()

    # -- admission --------------------------------------------------------------------------

    def reserve(self, n: int) -> Reservation:
        """Room for `n` images, or QueueFull (with a retry hint) when there is none."""
        with self.lock:
            if self.closed:
                raise Closed("the service is shutting down")
            if self.reserved + n > self.queue_size:
                raise QueueFull(self.retry_after())
            self.reserved += n
        return Reservation(self, n)

    def give_back(self, n: int) -> None:
        """Release room reserved for `n` images."""
        with self.lock:
            self.reserved -= n

    def retry_after(self) -> int:
        """Seconds after which the queue has probably drained (at least 1)."""
        batches = max(1, self.reserved) / self.max_batch / max(1, len(self.threads))
        return max(1, int(round(batches * self.recent_batch_seconds + 0.5)))

    def submit(self, reservation: Reservation, model: Any, images: list[Any]) -> Future:
        """Queue the images of a reservation for `model`; the Future gets a BatchResult."""
        if not reservation.active or len(images) != reservation.n:
            raise ValueError("submit needs an active reservation of exactly the images given")
        job = Job(model, list(images))
        with self.lock:
            if self.closed:
                raise Closed("the service is shutting down")
            reservation.active = False  # the room is now held by the queued job
            self.jobs.append(job)
            self.waiting += len(images)
            self.lock.notify()
        return job.future

    @property
    def depth(self) -> int:
        """Images waiting in the queue (not yet taken by a worker)."""
        return self.waiting

    @property
    def alive(self) -> bool:
        """True while every worker thread runs and the batcher is open."""
        return not self.closed and all(t.is_alive() for t in self.threads)

    # -- workers ----------------------------------------------------------------------------

    def take(self) -> list[Job] | None:
        """The next micro-batch: the oldest job plus later jobs for the same model."""
        with self.lock:
            while not self.jobs and not self.closed:
                self.lock.wait()
            if self.closed and not self.jobs:
                return None
            first = self.jobs.popleft()
            batch, count = [first], len(first.images)
            deadline = time.perf_counter() + self.batch_wait
            while count < self.max_batch:
                found = next((j for j in self.jobs if j.model is first.model
                              and count + len(j.images) <= self.max_batch), None)
                if found is not None:
                    self.jobs.remove(found)
                    batch.append(found)
                    count += len(found.images)
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self.closed:
                    break
                self.lock.wait(remaining)
            taken = sum(len(j.images) for j in batch)
            self.waiting -= taken
            self.reserved -= taken
            self.busy += 1
            return batch

    def work(self) -> None:
        """Worker loop: take a micro-batch, score it, hand each job its rows."""
        while (batch := self.take()) is not None:
            try:
                self.run(batch)
            finally:
                with self.lock:
                    self.busy -= 1

    def run(self, batch: list[Job]) -> None:
        """Score one micro-batch (cancelled jobs are skipped) and resolve the futures."""
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        images = [im for j in live for im in j.images]
        start = time.perf_counter()
        try:
            prediction = self.scorer(live[0].model, images)
        except Exception as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            log.warning("a batch of %d jobs failed (%s); scoring them one by one", len(live),
                        exc)
            for j in live:  # one bad job must not fail the others
                self.run_alone(j)
            return
        except BaseException as exc:  # every waiting request must hear of it
            for j in live:
                j.future.set_exception(exc)
            raise
        seconds = time.perf_counter() - start
        self.recent_batch_seconds = 0.8 * self.recent_batch_seconds + 0.2 * seconds
        if self.on_batch is not None:
            self.on_batch(len(images), seconds)
        row = 0
        for j in live:
            rows = list(range(row, row + len(j.images)))
            row += len(j.images)
            j.future.set_result(BatchResult(prediction, rows, len(images), start - j.enqueued,
                                            seconds))

    def run_alone(self, job: Job) -> None:
        """Score one job by itself (after its batch failed) and resolve its future."""
        start = time.perf_counter()
        try:
            prediction = self.scorer(job.model, job.images)
        except Exception as exc:
            job.future.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        job.future.set_result(BatchResult(prediction, list(range(len(job.images))),
                                          len(job.images), start - job.enqueued, seconds))

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work, fail the jobs still waiting with Closed, join the workers."""
        with self.lock:
            self.closed = True
            left = list(self.jobs)
            self.jobs.clear()
            self.reserved -= self.waiting
            self.waiting = 0
            self.lock.notify_all()
        for j in left:
            if j.future.set_running_or_notify_cancel():
                j.future.set_exception(Closed("the service is shutting down"))
        for t in self.threads:
            t.join(timeout)
