"""Where the inference service sends its events: Kafka in production, a list in unit tests.

Two ways to publish, matching two promises:
- `publish_acked_async` returns once the broker acknowledged the record (acks=all, idempotent producer) or
  raises PublishError: SubmitFeedback answers OK only after it returns (promise 1). It holds no thread while
  it waits: the producer's send future resolves an asyncio future from the producer's I/O thread, so
  thousands of ratings can wait at once. `publish_acked` is the blocking form, for callers off the loop.
- `publish_background` never blocks generation: records go to an outbox that a thread drains, retrying with
  backoff while the broker is down. Failures are counted and logged; nothing is dropped silently.
  `wait_background` waits for one of them: SubmitFeedback awaits the answer's Interaction before it stores
  the rating, so an acknowledged rating never refers to an Interaction that died in this process's outbox.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.errors import KafkaError

from rlhf_online.broker.clients import make_producer
from rlhf_online.inference import metrics
from rlhf_online.inference.journal import Journal

log = logging.getLogger(__name__)


class PublishError(Exception):
    """The broker did not acknowledge a record in time."""


@dataclass
class Record:
    topic: str
    key: bytes
    value: bytes
    attempts: int = 0
    seq: int = 0  # its entry in the outbox journal (0: none)


class KafkaEvents:
    """Publishes to Kafka with one producer for acknowledged writes and one behind a retrying outbox."""

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str,
        max_outbox: int = 100_000,
        ack_timeout_s: float = 10.0,
        journal: Journal | None = None,
    ) -> None:
        timeout_ms = int(ack_timeout_s * 1000)
        # Fails fast when the broker is away, so SubmitFeedback can answer UNAVAILABLE within its deadline.
        self._acked = make_producer(
            bootstrap,
            client_id=f"{client_id}-feedback",
            max_block_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
            delivery_timeout_ms=timeout_ms + 1000,
        )
        self._outbox = Outbox(
            make_producer(bootstrap, client_id=f"{client_id}-interactions"), max_outbox, journal
        )
        self._known_topics: set[str] = set()  # topics the acked producer has metadata for

    async def publish_acked_async(self, topic: str, key: bytes, value: bytes, timeout_s: float) -> None:
        """Returns once the broker acknowledged the record; raises PublishError if not within `timeout_s`.

        `send()` runs on the loop: with the topic's metadata known it only appends to the producer's buffer.
        The first record of a topic waits for that metadata in a worker thread instead, since `send()`
        would block the loop for it. A plain timer handle bounds the wait: `asyncio.timeout` cost about 20 us
        more per record on the 2-core dev machine, where the loop spends ~350 us on a whole rating.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            if topic not in self._known_topics:
                await asyncio.wait_for(asyncio.to_thread(self._acked.partitions_for, topic), timeout_s)
                self._known_topics.add(topic)
            acked = loop.create_future()
            expiry = loop.call_at(deadline, _expire, acked)
            try:
                sent = self._acked.send(topic, key=key, value=value)
                sent.add_callback(_on_ack, loop, acked)
                sent.add_errback(_on_error, loop, acked)
                await acked
            finally:
                expiry.cancel()
        except (KafkaError, TimeoutError) as e:
            metrics.PUBLISH_FAILURES.labels(topic).inc()
            reason = str(e) or type(e).__name__
            raise PublishError(
                f"the broker did not acknowledge the event within {timeout_s:.1f}s: {reason}"
            ) from e

    def publish_acked(self, topic: str, key: bytes, value: bytes, timeout_s: float) -> None:
        """Blocks until the broker acknowledged the record; raises PublishError otherwise."""
        try:
            self._acked.send(topic, key=key, value=value).get(timeout=timeout_s)
        except KafkaError as e:
            metrics.PUBLISH_FAILURES.labels(topic).inc()
            raise PublishError(
                f"the broker did not acknowledge the event within {timeout_s:.1f}s: {e}"
            ) from e

    def publish_background(self, topic: str, key: bytes, value: bytes) -> None:
        self._outbox.put(Record(topic, key, value))

    async def wait_background(self, topic: str, key: bytes, timeout_s: float) -> None:
        """Returns once no record of (`topic`, `key`) waits in the outbox: at once when none does (already
        acknowledged, or never published by this process). Raises PublishError if one still waits after
        `timeout_s`, or was given up on (outbox full, shutdown).

        An answer's Interaction still in the outbox dies with the process (SIGKILL, OOM); a rating of it that
        was acknowledged meanwhile could never be joined. Like `publish_acked_async`, it holds no thread.
        """
        loop = asyncio.get_running_loop()
        acked = loop.create_future()
        if not self._outbox.when_acked(topic, key, lambda error: _resolve_soon(loop, acked, error)):
            return
        expiry = loop.call_later(timeout_s, _expire, acked)
        try:
            await acked
        except (TimeoutError, PublishError) as e:
            raise PublishError(
                f"the answer it rates is not stored yet (its {topic} record waits for the broker after "
                f"{timeout_s:.1f}s): {e}"
            ) from e
        finally:
            expiry.cancel()

    @property
    def pending(self) -> int:
        return self._outbox.pending

    def close(self, timeout_s: float = 10.0) -> None:
        self._outbox.close(timeout_s)
        self._acked.close(timeout=timeout_s)


class Outbox:
    """A bounded queue of records that a thread sends, re-queueing each failure with backoff.

    With a `journal` (journal.py), each record is on local disk before `put` returns and the records an
    earlier process left unacknowledged there are queued first.
    """

    def __init__(self, producer, max_records: int, journal: Journal | None = None) -> None:
        self._producer = producer
        self._journal = journal
        self._journal_failures = 0
        self._max_records = max_records
        self._queue: deque[Record] = deque()
        self._in_flight = 0
        self._unacked: dict[tuple[str, bytes], int] = {}  # (topic, key) -> its records not acknowledged yet
        self._waiters: dict[tuple[str, bytes], list[Callable[[Exception | None], None]]] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._backoff_s = 0.0
        for left in journal.replay() if journal else ():
            self._enqueue(Record(left.topic, left.key, left.value, seq=left.seq))
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_flight

    def put(self, record: Record) -> None:
        with self._cond:
            if len(self._queue) >= self._max_records:
                dropped = self._queue.popleft()
                metrics.PUBLISH_DROPPED.labels(dropped.topic).inc()
                log.error(
                    "outbox full (%d records): dropped the oldest %s record", self._max_records, dropped.topic
                )
                self._settle(dropped, PublishError("the outbox was full and dropped it"))
            if self._journal is not None:
                record.seq = self._journaled(record)
            self._enqueue(record)
            self._cond.notify()

    def _journaled(self, record: Record) -> int:
        """Appends `record` to the journal; its seq, or 0 when the disk refuses (full, gone): the answer is
        still served, its Interaction then waits in memory only, and that is counted and logged (every
        100th time)."""
        try:
            return self._journal.append(record.topic, record.key, record.value)
        except OSError as e:
            self._journal_failures += 1
            metrics.JOURNAL_FAILURES.inc()
            if self._journal_failures % 100 == 1:
                log.error(
                    "outbox journal %s refused a record (%d so far), keeping it in memory only: %s",
                    self._journal.directory, self._journal_failures, e,
                )  # fmt: skip
            return 0

    def _enqueue(self, record: Record) -> None:
        """Holds `self._cond` (or runs before the thread starts)."""
        self._queue.append(record)
        name = (record.topic, record.key)
        self._unacked[name] = self._unacked.get(name, 0) + 1
        metrics.OUTBOX.set(len(self._queue) + self._in_flight)

    def when_acked(self, topic: str, key: bytes, callback: Callable[[Exception | None], None]) -> bool:
        """Arranges `callback(None)` once no record of (`topic`, `key`) waits, or `callback(error)` when one
        is given up on; returns False, and never calls it, when none waits now. The callback runs in the
        producer's thread (or the caller's), holding the outbox lock: it may only hand over."""
        with self._cond:
            if (topic, key) not in self._unacked:
                return False
            self._waiters.setdefault((topic, key), []).append(callback)
            return True

    def close(self, timeout_s: float) -> None:
        """Waits up to `timeout_s` for the outbox to drain, then reports what is left."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._queue or self._in_flight) and time.monotonic() < deadline:
                self._cond.wait(timeout=0.1)
            self._closing = True
            left = list(self._queue)
            for record in left:  # kept in the journal, if any, for the next start
                self._settle(
                    record, PublishError("the service shut down before the broker acknowledged it"), keep=True
                )
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self._producer.close(timeout=max(0.0, deadline - time.monotonic()))
        with self._cond:
            unsent = len(left) + self._in_flight
            if self._journal is not None:
                self._journal.close()
        if self._journal is not None and unsent:
            log.warning(
                "shut down with %d events not acknowledged by the broker; they stay in the outbox journal "
                "%s and the next start on it sends them", unsent, self._journal.directory,
            )  # fmt: skip
        elif unsent:
            for record in left:
                metrics.PUBLISH_DROPPED.labels(record.topic).inc()
            log.error("shut down with %d events not acknowledged by the broker", unsent)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                record = self._queue.popleft()
                self._in_flight += 1
                backoff = self._backoff_s
            if backoff:
                time.sleep(backoff)  # a broker outage: pace the retries instead of spinning
            self._send(record)

    def _send(self, record: Record) -> None:
        record.attempts += 1
        try:
            future = self._producer.send(record.topic, key=record.key, value=record.value)
        except KafkaError as e:
            self._failed(record, e)
            return
        future.add_callback(lambda _meta: self._done(record))
        future.add_errback(lambda e: self._failed(record, e))

    def _done(self, record: Record) -> None:
        with self._cond:
            self._in_flight -= 1
            self._backoff_s = 0.0
            self._settle(record)
            metrics.OUTBOX.set(len(self._queue) + self._in_flight)
            self._cond.notify_all()

    def _failed(self, record: Record, error: Exception) -> None:
        metrics.PUBLISH_FAILURES.labels(record.topic).inc()
        if record.attempts == 1 or record.attempts % 20 == 0:
            log.warning(
                "publishing to %s failed (attempt %d), will retry: %s", record.topic, record.attempts, error
            )
        with self._cond:
            self._in_flight -= 1
            self._backoff_s = min(5.0, max(0.1, self._backoff_s * 2))
            self._queue.appendleft(record)
            self._cond.notify_all()

    def _settle(self, record: Record, error: Exception | None = None, keep: bool = False) -> None:
        """One record of its (topic, key) is acknowledged or given up on; wakes the waiters on the last one.
        Its journal entry is acknowledged too, unless `keep` (shutdown: the next start sends it). Holds
        `self._cond`."""
        if record.seq and not keep and self._journal is not None:
            self._journal.ack(record.seq)
        name = (record.topic, record.key)
        left = self._unacked.get(name, 0) - 1
        if left > 0:
            self._unacked[name] = left
            return
        self._unacked.pop(name, None)
        for callback in self._waiters.pop(name, ()):
            callback(error)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no acknowledgement yet"))


def _on_ack(loop: asyncio.AbstractEventLoop, future: asyncio.Future, _metadata) -> None:
    _resolve_soon(loop, future, None)


def _on_error(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: Exception) -> None:
    _resolve_soon(loop, future, error)


def _resolve_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: Exception | None) -> None:
    """Resolves `future` on its own loop. Runs in the producer's I/O thread (or in the caller's, when the
    send future was already done), so it may only hand over to the loop."""

    def resolve() -> None:
        if future.done():  # the waiter gave up (timeout or cancellation)
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(resolve)


@dataclass
class MemoryEvents:
    """In-memory stand-in for unit tests: records what was published; `down=True` simulates an outage."""

    down: bool = False
    records: list[Record] = field(default_factory=list)

    def publish_acked(self, topic: str, key: bytes, value: bytes, timeout_s: float) -> None:
        if self.down:
            raise PublishError("the broker did not acknowledge the event (simulated outage)")
        self.records.append(Record(topic, key, value))

    async def publish_acked_async(self, topic: str, key: bytes, value: bytes, timeout_s: float) -> None:
        self.publish_acked(topic, key, value, timeout_s)

    def publish_background(self, topic: str, key: bytes, value: bytes) -> None:
        self.records.append(Record(topic, key, value))

    async def wait_background(self, topic: str, key: bytes, timeout_s: float) -> None:
        pass  # records are stored as they are published

    @property
    def pending(self) -> int:
        return 0

    def close(self, timeout_s: float = 10.0) -> None:
        pass
