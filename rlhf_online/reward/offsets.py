"""Which Kafka offsets the reward service may commit (pure: no Kafka here).

Promise 2 (each rating applied at least once per lineage) rests on one rule: an offset is committed only once
every record below it is either applied in a published checkpoint or will never be needed. A record read but
still buffered, in the join waiting for its other half or pending the learner's next update, is not applied
yet; committing past it would lose it in a crash. So, per partition, `OffsetBook` tracks:
- the next offset to read (everything below was read);
- the offsets still buffered, with a count (a rating can be held by the join, then by a pending update);
- the offsets of the last checkpoint, where an assigned partition starts, and what a partition that was not
  read since keeps;
- the first offset read per partition, where a partition owned again starts if no checkpoint has it yet.

A revoked partition's buffers are dropped, so when it is assigned again it must be read again from a point
where nothing was buffered: kafka-python (3.0) keeps the position of a partition that a rebalance gives back
to the same consumer, which would skip what the buffers held, so `assign` says where to seek.

`committable()` gives, per partition read since, the lowest buffered offset, else the next offset to read.
A partition is `(topic, partition)`; kafka-python's `TopicPartition` is such a tuple, so the service passes
its own. Offsets travel as "topic:partition" -> next offset in the checkpoint's manifest (`offset_key`).
"""

from collections import Counter
from collections.abc import Iterable, Mapping

Partition = tuple[str, int]  # (topic, partition)


def offset_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def parse_offset_key(key: str) -> Partition:
    topic, _, partition = key.rpartition(":")
    return topic, int(partition)


class OffsetBook:
    """Read positions, buffered offsets and checkpoint offsets of the partitions this consumer owns."""

    def __init__(self, checkpointed: Mapping[str, int] | None = None) -> None:
        self._checkpointed = dict(checkpointed or {})  # "topic:partition" -> next offset, last checkpoint
        self._owned: set[Partition] = set()
        self._next: dict[Partition, int] = {}  # next offset to read, per partition read since assignment
        self._held: dict[Partition, Counter[int]] = {}  # offset -> how many buffers hold it
        self._pending: dict[str, tuple[Partition, int]] = {}  # event_id -> its rating's place
        self._first_read: dict[Partition, int] = {}  # where this process began reading each partition

    # ---- assignment ---------------------------------------------------------------------------------------

    @property
    def owned(self) -> frozenset[Partition]:
        return frozenset(self._owned)

    def owns(self, partition: Partition) -> bool:
        return partition in self._owned

    def assign(self, partitions: Iterable[Partition]) -> dict[Partition, int]:
        """Takes `partitions` on; returns where to seek each: the last checkpoint's offset, else the first
        offset this process read there (one it owned before). A partition new to this process and to the
        lineage needs no seek: it starts at the group's committed offset, never ahead of a checkpoint."""
        seeks = {}
        for p in partitions:
            self._owned.add(p)
            offset = self._checkpointed.get(offset_key(*p), self._first_read.get(p))
            if offset is not None:
                seeks[p] = offset
        return seeks

    def revoke(self, partitions: Iterable[Partition]) -> None:
        """Forgets what was read and buffered there: the new owner replays it from the committed offset."""
        for p in partitions:
            self._owned.discard(p)
            self._next.pop(p, None)
            self._held.pop(p, None)
        self._pending = {eid: place for eid, place in self._pending.items() if place[0] in self._owned}

    # ---- reading and buffering --------------------------------------------------------------------------

    def read(self, partition: Partition, offset: int) -> None:
        """The record at `offset` was read (and is either used up now or held by `hold`)."""
        self._first_read.setdefault(partition, offset)
        self._next[partition] = offset + 1

    def hold(self, partition: Partition, offset: int) -> None:
        """A buffer (the join) keeps the record at `offset`; it stays uncommitted until `release`."""
        self._held.setdefault(partition, Counter())[offset] += 1

    def release(self, partition: Partition, offset: int) -> None:
        """One buffer let go of the record at `offset` (matched, expired, evicted); unknown: a no-op."""
        held = self._held.get(partition)
        if held is None or held[offset] <= 0:
            return
        held[offset] -= 1
        if held[offset] == 0:
            del held[offset]

    def await_update(self, event_id: str, partition: Partition, offset: int) -> None:
        """The rating `event_id` (at `offset`) waits for the learner's next update."""
        self._pending[event_id] = (partition, offset)
        self.hold(partition, offset)

    def updated(self, event_id: str) -> None:
        """An update applied the rating `event_id`."""
        place = self._pending.pop(event_id, None)
        if place is not None:
            self.release(*place)

    # ---- committing -------------------------------------------------------------------------------------

    def committable(self) -> dict[str, int]:
        """Per "topic:partition", the offset to commit: strictly below anything still buffered. For a
        partition read since, its lowest buffered offset, else the next to read; others keep the last
        checkpoint's."""
        offsets = dict(self._checkpointed)
        for p, next_offset in self._next.items():
            held = self._held.get(p)
            offsets[offset_key(*p)] = min(min(held), next_offset) if held else next_offset
        return offsets

    def published(self, offsets: Mapping[str, int]) -> None:
        """A checkpoint that includes `offsets` is published: they are where a partition restarts now."""
        self._checkpointed = dict(offsets)

    def owned_offsets(self, offsets: Mapping[str, int]) -> dict[Partition, int]:
        """The part of `offsets` this consumer may commit: its owned partitions."""
        parsed = {parse_offset_key(key): offset for key, offset in offsets.items()}
        return {p: offset for p, offset in parsed.items() if p in self._owned}
