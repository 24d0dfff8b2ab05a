"""Stream join of ratings with the responses they rate, by response_id (pure: no Kafka here).

Both topics are keyed by response_id with the same partition count, so partition p of `rlhf.feedback` only
needs partition p of `rlhf.interactions`. Either side may arrive first:
- an interaction stays buffered, matching every rating that arrives for it, until it expires;
- a rating whose interaction has not arrived waits for it, and is dead-lettered if it expires first.

Time is *stream time* (record timestamps), not the wall clock, so a replay behaves like the first run. Each
side of a partition has a watermark (the largest timestamp seen there): an interaction expires once the
feedback watermark of its partition passes its timestamp + TTL (no more ratings are expected), a waiting
rating once the interactions watermark passes its timestamp + TTL (its interaction would have arrived by
then). A record older than the other side's watermark when it arrives gets TTL from that watermark instead,
so a late record is not expired before it had a chance to match. Watermarks per side keep a consumer that
reads one topic ahead of the other (typical on catch-up) from expiring anything early.

The buffer is bounded: past `max_interactions` / `max_waiting` the oldest entry is evicted (counted; an
evicted rating is dead-lettered). Each call reports which records it started to hold and which it let go of
(`JoinOutput.held`, `.released`): a Kafka offset may only be committed below the lowest offset still in the
buffer, or a crash would lose what the buffer held; `rlhf_online.reward.offsets.OffsetBook` keeps that count.
"""

import heapq
import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from rlhf_online.reward.records import Feedback, Interaction, LabelledExample, join, shorten

INTERACTIONS = "interactions"
FEEDBACK = "feedback"


@dataclass(frozen=True)
class DeadLetter:
    """A record that will not be processed, with its raw bytes and why."""

    side: str  # INTERACTIONS or FEEDBACK
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


class Place(NamedTuple):
    """Where a buffered record is in Kafka."""

    side: str  # INTERACTIONS or FEEDBACK
    partition: int
    offset: int


@dataclass
class JoinOutput:
    """What one call produced: joined examples, dead letters, and the records it began or stopped holding."""

    examples: list[LabelledExample] = field(default_factory=list)
    rating_offsets: list[int] = field(default_factory=list)  # of each example's rating, same order
    dead: list[DeadLetter] = field(default_factory=list)
    held: list[Place] = field(default_factory=list)  # buffered by this call
    released: list[Place] = field(default_factory=list)  # matched, expired or evicted by this call

    def extend(self, other: "JoinOutput") -> None:
        self.examples += other.examples
        self.rating_offsets += other.rating_offsets
        self.dead += other.dead
        self.held += other.held
        self.released += other.released


@dataclass
class _HeldInteraction:
    interaction: Interaction
    partition: int
    offset: int
    expires_at_ms: int


@dataclass
class _WaitingFeedback:
    feedback: Feedback
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    expires_at_ms: int


class JoinBuffer:
    """Joins interactions and ratings by response_id; see the module docstring for the rules."""

    def __init__(self, ttl_ms: int, max_interactions: int = 100_000, max_waiting: int = 100_000) -> None:
        self.ttl_ms = ttl_ms
        self.max_interactions = max_interactions
        self.max_waiting = max_waiting
        # Insertion order = arrival order, so the first entry is the one to evict.
        self._interactions: OrderedDict[str, _HeldInteraction] = OrderedDict()
        self._waiting: OrderedDict[str, _WaitingFeedback] = OrderedDict()  # by event_id
        self._waiting_by_response: dict[str, set[str]] = {}  # response_id -> event_ids
        self._watermarks: dict[tuple[str, int], int] = {}  # (side, partition) -> max timestamp_ms
        # Expiry heaps of (expires_at_ms, seq, id, offset); stale entries are skipped when popped.
        self._interaction_expiry: dict[int, list] = {}
        self._waiting_expiry: dict[int, list] = {}
        # Records held and released since the current call began (reported in its JoinOutput).
        self._moves = JoinOutput()
        self._seq = itertools.count()
        self.counts: Counter[str] = Counter()  # matched, duplicate_*, *_expired, *_evicted

    # ---- sizes and offsets -------------------------------------------------------------------------------

    @property
    def n_interactions(self) -> int:
        return len(self._interactions)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    def is_waiting(self, event_id: str) -> bool:
        return event_id in self._waiting

    # ---- input ---------------------------------------------------------------------------------------------

    def add_interaction(self, partition: int, offset: int, interaction: Interaction) -> JoinOutput:
        """Buffers an interaction and joins it with the ratings waiting for it."""
        out = JoinOutput()
        rid = interaction.response_id
        if rid in self._interactions:
            self.counts["duplicate_interaction"] += 1
        else:
            expires = self._deadline(FEEDBACK, partition, interaction.timestamp_ms)
            self._interactions[rid] = _HeldInteraction(interaction, partition, offset, expires)
            heapq.heappush(
                self._interaction_expiry.setdefault(partition, []), (expires, next(self._seq), rid, offset)
            )
            self._hold(INTERACTIONS, partition, offset)
            for event_id in sorted(self._waiting_by_response.pop(rid, ())):
                waiting = self._remove_waiting(event_id)
                out.examples.append(join(interaction, waiting.feedback))
                out.rating_offsets.append(waiting.offset)
                self.counts["matched"] += 1
            while len(self._interactions) > self.max_interactions:
                self._remove_interaction(next(iter(self._interactions)))
                self.counts["interaction_evicted"] += 1
        out.extend(self._advance(INTERACTIONS, partition, interaction.timestamp_ms))
        return self._report(out)

    def add_feedback(
        self,
        partition: int,
        offset: int,
        feedback: Feedback,
        key: bytes | None = None,
        value: bytes | None = None,
    ) -> JoinOutput:
        """Joins a rating with its interaction, or buffers it until the interaction arrives.

        The caller drops ratings whose event_id was applied already; a rating already waiting is a duplicate.
        """
        out = JoinOutput()
        held = self._interactions.get(feedback.response_id)
        if held is not None:
            out.examples.append(join(held.interaction, feedback))
            out.rating_offsets.append(offset)
            self.counts["matched"] += 1
        elif feedback.event_id in self._waiting:
            self.counts["duplicate_feedback"] += 1
        else:
            expires = self._deadline(INTERACTIONS, partition, feedback.timestamp_ms)
            self._waiting[feedback.event_id] = _WaitingFeedback(
                feedback, partition, offset, key, value, expires
            )
            self._waiting_by_response.setdefault(feedback.response_id, set()).add(feedback.event_id)
            heapq.heappush(
                self._waiting_expiry.setdefault(partition, []),
                (expires, next(self._seq), feedback.event_id, offset),
            )
            self._hold(FEEDBACK, partition, offset)
            while len(self._waiting) > self.max_waiting:
                evicted = self._remove_waiting(next(iter(self._waiting)))
                self.counts["feedback_evicted"] += 1
                reason = (
                    f"evicted: join buffer full ({self.max_waiting} ratings waiting for their interactions)"
                )
                out.dead.append(_dead_letter(evicted, reason))
        out.extend(self._advance(FEEDBACK, partition, feedback.timestamp_ms))
        return self._report(out)

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forgets everything of revoked partitions (their uncommitted records will be replayed; the offset
        book forgets their offsets itself); returns how many entries were dropped."""
        rids = [rid for rid, h in self._interactions.items() if h.partition in partitions]
        eids = [eid for eid, w in self._waiting.items() if w.partition in partitions]
        for rid in rids:
            self._remove_interaction(rid)
        for eid in eids:
            self._remove_waiting(eid)
        for p in partitions:
            for side in (INTERACTIONS, FEEDBACK):
                self._watermarks.pop((side, p), None)
            self._interaction_expiry.pop(p, None)
            self._waiting_expiry.pop(p, None)
        self._moves = JoinOutput()
        return len(rids) + len(eids)

    # ---- internals -----------------------------------------------------------------------------------------

    def _deadline(self, other_side: str, partition: int, timestamp_ms: int) -> int:
        """Expiry in the other side's stream time: TTL after the record's timestamp, or after that side's
        watermark if it is already later (a late or clock-skewed record still gets a full TTL to match)."""
        return max(timestamp_ms, self._watermarks.get((other_side, partition), timestamp_ms)) + self.ttl_ms

    def _advance(self, side: str, partition: int, timestamp_ms: int) -> JoinOutput:
        """Moves the watermark of one side of a partition and expires what the move made too old."""
        out = JoinOutput()
        key = (side, partition)
        if timestamp_ms <= self._watermarks.get(key, -1):
            return out
        self._watermarks[key] = timestamp_ms
        if side == FEEDBACK:  # no more ratings expected for interactions older than watermark - TTL
            heap = self._interaction_expiry.get(partition, [])
            while heap and heap[0][0] < timestamp_ms:
                _, _, rid, offset = heapq.heappop(heap)
                held = self._interactions.get(rid)
                if held is not None and held.offset == offset:
                    self._remove_interaction(rid)
                    self.counts["interaction_expired"] += 1
        else:  # the interaction of a rating older than watermark - TTL would have arrived by now
            heap = self._waiting_expiry.get(partition, [])
            while heap and heap[0][0] < timestamp_ms:
                _, _, eid, offset = heapq.heappop(heap)
                waiting = self._waiting.get(eid)
                if waiting is not None and waiting.offset == offset:
                    self._remove_waiting(eid)
                    self.counts["feedback_expired"] += 1
                    rid = shorten(waiting.feedback.response_id)
                    reason = (
                        f"expired: no interaction for response_id {rid} within TTL "
                        f"({self.ttl_ms / 1000:.0f}s of stream time)"
                    )
                    out.dead.append(_dead_letter(waiting, reason))
        return out

    def _report(self, out: JoinOutput) -> JoinOutput:
        """`out` with the records held and released during this call."""
        out.held, out.released = self._moves.held, self._moves.released
        self._moves = JoinOutput()
        return out

    def _hold(self, side: str, partition: int, offset: int) -> None:
        self._moves.held.append(Place(side, partition, offset))

    def _release(self, side: str, partition: int, offset: int) -> None:
        self._moves.released.append(Place(side, partition, offset))

    def _remove_interaction(self, rid: str) -> _HeldInteraction:
        held = self._interactions.pop(rid)
        self._release(INTERACTIONS, held.partition, held.offset)
        return held

    def _remove_waiting(self, event_id: str) -> _WaitingFeedback:
        waiting = self._waiting.pop(event_id)
        rid = waiting.feedback.response_id
        siblings = self._waiting_by_response.get(rid)
        if siblings is not None:
            siblings.discard(event_id)
            if not siblings:
                del self._waiting_by_response[rid]
        self._release(FEEDBACK, waiting.partition, waiting.offset)
        return waiting


def _dead_letter(waiting: _WaitingFeedback, reason: str) -> DeadLetter:
    return DeadLetter(FEEDBACK, waiting.partition, waiting.offset, waiting.key, waiting.value, reason)
