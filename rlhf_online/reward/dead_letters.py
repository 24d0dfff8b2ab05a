"""The reward service's dead letters: records it will not process, sent to `rlhf.feedback.dlq` with their raw
bytes and why, so a person can look at them. They are sent without waiting; `flush()` makes them durable
before a checkpoint commits offsets past them (a dead letter the broker refused must not be skipped)."""

import dataclasses
import logging
from collections import OrderedDict

from rlhf_online import contract
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.reward import metrics
from rlhf_online.reward.join import INTERACTIONS, DeadLetter
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)

# Key (twice: the record's and the DeadLetter's) plus value of one dead letter, so that it fits in one Kafka
# record under the default 1 MiB limits (producer max_request_size, broker message.max.bytes) with its reason.
MAX_DEAD_LETTER_BYTES = 1_000_000
_KEEP_KEY_BYTES = 1024  # of a key that would not fit
# The `reason` label of rlhf_reward_dlq_total: a closed set, since reasons carry ids from the wire.
REASON_LABELS = ("cannot parse", "empty record value", "expired", "evicted", "internal error")
# Positions dead-lettered recently. After a rebalance the service reads a partition again from below what it
# held, so a bad record there comes back; it is dead-lettered once, not once per reading.
_REMEMBERED_POSITIONS = 100_000


def source_topic(topics: Topics, side: str) -> str:
    """The topic of a join side (INTERACTIONS or FEEDBACK)."""
    return topics.interactions if side == INTERACTIONS else topics.feedback


class DeadLetterOutbox:
    """Sends dead letters through the service's producer and remembers them until `flush()`."""

    def __init__(self, producer, topics: Topics) -> None:
        self._producer = producer
        self._topics = topics
        self._futures: list = []
        self.sent = 0
        self._positions: OrderedDict[tuple[str, int, int], None] = OrderedDict()

    def send(self, dead: DeadLetter) -> None:
        topic = source_topic(self._topics, dead.side)
        if not self._first_time(topic, dead.partition, dead.offset):
            return
        dead = fit(dead)
        msg = events_pb2.DeadLetter(
            source_topic=topic,
            partition=dead.partition,
            offset=dead.offset,
            key=dead.key or b"",
            value=dead.value or b"",
            reason=dead.reason,
            timestamp_ms=contract.now_ms(),
        )
        future = self._producer.send(self._topics.dlq, key=dead.key, value=msg.SerializeToString())
        self._futures.append(future)
        self.sent += 1
        metrics.DLQ.labels(reason_label(dead.reason)).inc()
        log.warning("dead-lettered %s:%d@%d: %s", topic, dead.partition, dead.offset, dead.reason)

    def _first_time(self, topic: str, partition: int, offset: int) -> bool:
        """True unless the record at this position was dead-lettered already (the oldest are forgotten)."""
        position = (topic, partition, offset)
        if position in self._positions:
            return False
        self._positions[position] = None
        if len(self._positions) > _REMEMBERED_POSITIONS:
            self._positions.popitem(last=False)
        return True

    def flush(self) -> None:
        """Blocks until the broker has every dead letter sent so far.

        Raises:
            RuntimeError: if one was refused (no offset past it may be committed).
        """
        if not self._futures:
            return
        self._producer.flush(timeout=30)
        futures, self._futures = self._futures, []
        failed = [f for f in futures if not f.succeeded()]
        if failed:
            metrics.DLQ_FAILURES.inc(len(failed))
            raise RuntimeError(
                f"{len(failed)} dead letters were not acknowledged by the broker ({failed[0].exception}); "
                "not committing offsets past them. Check the broker and restart the reward service."
            )


def fit(dead: DeadLetter) -> DeadLetter:
    """`dead`, with its key and value cut if it would not fit in one Kafka record, saying so in its reason
    (the broker refusing it would stop the service: no offset past a dead letter may be committed)."""
    key, value = dead.key or b"", dead.value or b""
    if 2 * len(key) + len(value) <= MAX_DEAD_LETTER_BYTES:
        return dead
    cut_key = key[:_KEEP_KEY_BYTES]
    cut_value = value[: MAX_DEAD_LETTER_BYTES - 2 * len(cut_key)]
    reason = (
        f"{dead.reason} (key and value cut from {len(key)} and {len(value)} bytes to {len(cut_key)} and "
        f"{len(cut_value)} to fit the dead-letter topic)"
    )
    return dataclasses.replace(dead, key=cut_key or dead.key, value=cut_value, reason=reason)


def reason_label(reason: str) -> str:
    """The metric label of a reason: its kind from `REASON_LABELS`, else "invalid"."""
    return next((label for label in REASON_LABELS if reason.startswith(label)), "invalid")
