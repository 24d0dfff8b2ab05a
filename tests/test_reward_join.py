"""The stream join of ratings with interactions: both arrival orders, expiry, duplicates, bounds, and the
records it reports holding and releasing (what the offset book counts)."""

from collections import Counter

import pytest

from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2
from rlhf_online.reward.join import FEEDBACK, INTERACTIONS, JoinBuffer, JoinOutput, Place
from rlhf_online.reward.records import (
    BadRecord,
    Feedback,
    Interaction,
    parse_feedback,
    parse_interaction,
)

TTL = 60_000


def interaction(rid: str, ts: int = 1000) -> Interaction:
    return Interaction(rid, f"prompt of {rid}", f"answer of {rid}", "policy-v1", ts)


def feedback(rid: str, user: str = "u1", ts: int = 2000, label: float = 1.0) -> Feedback:
    return Feedback(f"{rid}/{user}", rid, label, user, "policy-v1", ts)


class Held:
    """What a caller learns from the join's reports: the offsets still buffered, per side and partition."""

    def __init__(self) -> None:
        self.places: Counter[Place] = Counter()

    def __call__(self, out: JoinOutput) -> JoinOutput:
        self.places.update(out.held)
        self.places.subtract(out.released)
        assert all(n >= 0 for n in self.places.values()), "released a record it did not hold"
        return out

    def lowest(self, side: str, partition: int) -> int | None:
        here = [p.offset for p, n in self.places.items() if n and (p.side, p.partition) == (side, partition)]
        return min(here, default=None)


def test_interaction_first_then_ratings_from_two_users():
    join, held = JoinBuffer(TTL), Held()
    assert held(join.add_interaction(0, 10, interaction("r1"))).examples == []
    out1 = held(join.add_feedback(0, 20, feedback("r1", "u1", label=1.0)))
    out2 = held(join.add_feedback(0, 21, feedback("r1", "u2", label=0.0)))
    [ex1], [ex2] = out1.examples, out2.examples
    assert (ex1.event_id, ex1.prompt, ex1.response, ex1.label) == (
        "r1/u1",
        "prompt of r1",
        "answer of r1",
        1.0,
    )
    assert (ex2.event_id, ex2.label, ex2.model_version, ex2.timestamp_ms) == ("r1/u2", 0.0, "policy-v1", 2000)
    # The interaction stays for later ratings, holding its offset; the matched ratings hold nothing.
    assert join.n_interactions == 1 and join.n_waiting == 0
    assert held.lowest(INTERACTIONS, 0) == 10
    assert held.lowest(FEEDBACK, 0) is None
    assert (out1.rating_offsets, out2.rating_offsets) == ([20], [21])
    assert join.counts["matched"] == 2


def test_rating_first_waits_for_its_interaction():
    join, held = JoinBuffer(TTL), Held()
    assert held(join.add_feedback(1, 5, feedback("r1", "u1"))).examples == []
    assert held(join.add_feedback(1, 6, feedback("r1", "u2"))).examples == []
    assert join.n_waiting == 2 and held.lowest(FEEDBACK, 1) == 5
    out = held(join.add_interaction(1, 3, interaction("r1")))
    assert sorted(zip((ex.event_id for ex in out.examples), out.rating_offsets, strict=True)) == [
        ("r1/u1", 5),
        ("r1/u2", 6),
    ]
    assert join.n_waiting == 0 and held.lowest(FEEDBACK, 1) is None
    assert held.lowest(INTERACTIONS, 1) == 3


def test_unmatched_rating_expires_into_the_dead_letters_in_stream_time():
    join = JoinBuffer(TTL)
    join.add_feedback(0, 7, feedback("ghost", ts=1000), key=b"ghost", value=b"raw-bytes")
    # Feedback time moving on does not expire it: the interactions side may just be behind.
    assert join.add_feedback(0, 8, feedback("other", ts=10**9)).dead == []
    # An interaction far enough in stream time does.
    out = join.add_interaction(0, 1, interaction("late", ts=1000 + TTL + 1))
    [dead] = out.dead
    assert dead.side == FEEDBACK and (dead.partition, dead.offset) == (0, 7)
    assert (dead.key, dead.value) == (b"ghost", b"raw-bytes")
    assert dead.reason.startswith("expired: no interaction for response_id ghost within TTL")
    assert join.counts["feedback_expired"] == 1
    # Watermarks are per partition: partition 1 is not affected by partition 0's time.
    join.add_feedback(1, 0, feedback("p1", ts=1000))
    join.add_interaction(0, 2, interaction("later", ts=10**9))
    assert join.is_waiting("p1/u1")


def test_interaction_expires_once_ratings_move_past_its_ttl():
    join, held = JoinBuffer(TTL), Held()
    held(join.add_interaction(0, 4, interaction("r1", ts=1000)))
    held(join.add_interaction(0, 5, interaction("r2", ts=50_000)))
    held(join.add_feedback(0, 9, feedback("r2", ts=1000 + TTL + 1)))  # past r1's TTL, within r2's
    assert join.n_interactions == 1 and join.counts["interaction_expired"] == 1
    assert held.lowest(INTERACTIONS, 0) == 5
    # A rating for the expired interaction now waits (and will expire as unmatched).
    assert join.add_feedback(0, 10, feedback("r1", "u9", ts=1000 + TTL + 2)).examples == []
    assert join.is_waiting("r1/u9")


def test_duplicates_are_counted_not_joined_twice():
    join = JoinBuffer(TTL)
    join.add_feedback(0, 1, feedback("r1"))
    join.add_feedback(0, 2, feedback("r1"))  # same event_id while waiting
    join.add_interaction(0, 3, interaction("r1"))
    assert join.add_interaction(0, 4, interaction("r1")).examples == []  # same response_id again
    assert join.counts["duplicate_feedback"] == 1 and join.counts["duplicate_interaction"] == 1
    assert join.counts["matched"] == 1


def test_bounded_buffer_evicts_the_oldest():
    join, held = JoinBuffer(TTL, max_interactions=2, max_waiting=2), Held()
    for i in range(3):
        held(join.add_interaction(0, i, interaction(f"r{i}")))
    assert join.n_interactions == 2 and join.counts["interaction_evicted"] == 1
    assert held.lowest(INTERACTIONS, 0) == 1
    dead = []
    for i in range(3):
        dead += held(join.add_feedback(0, 10 + i, feedback(f"missing{i}"))).dead
    assert join.n_waiting == 2 and [d.offset for d in dead] == [10]
    assert held.lowest(FEEDBACK, 0) == 11
    assert dead[0].reason.startswith("evicted: join buffer full")


def test_dropping_revoked_partitions_forgets_them_and_keeps_the_others():
    join, held = JoinBuffer(TTL), Held()
    held(join.add_interaction(0, 1, interaction("a")))
    held(join.add_interaction(1, 1, interaction("b")))
    held(join.add_feedback(1, 2, feedback("c")))
    assert join.drop_partitions({1}) == 2
    assert join.n_interactions == 1 and join.n_waiting == 0
    # A rating for the dropped interaction now waits, and the next report does not release what the drop
    # removed (the offset book forgets revoked partitions itself); the kept interaction still matches.
    out = join.add_feedback(1, 3, feedback("b"))
    assert out.examples == [] and (out.held, out.released) == ([Place(FEEDBACK, 1, 3)], [])
    out = join.add_feedback(0, 2, feedback("a"))
    assert [ex.event_id for ex in out.examples] == ["a/u1"] and (out.held, out.released) == ([], [])


def test_parse_records_and_refuse_bad_ones():
    msg = events_pb2.FeedbackEvent(
        event_id="e1", response_id="r1", rating=chat_pb2.THUMBS_DOWN, user_id="u", timestamp_ms=5
    )
    fb = parse_feedback(msg.SerializeToString())
    assert (fb.event_id, fb.label, fb.timestamp_ms) == ("e1", 0.0, 5)
    inter = events_pb2.Interaction(response_id="r1", prompt="p", response="a", timestamp_ms=3)
    assert parse_interaction(inter.SerializeToString()).prompt == "p"
    with pytest.raises(BadRecord, match="cannot parse"):
        parse_feedback(b"\xff\xff\xff")
    with pytest.raises(BadRecord, match="rating"):
        parse_feedback(events_pb2.FeedbackEvent(event_id="e", response_id="r").SerializeToString())
    with pytest.raises(BadRecord, match="no response_id"):
        parse_interaction(b"")
    with pytest.raises(BadRecord, match="empty record"):
        parse_feedback(None)


def test_a_late_record_gets_a_full_ttl_after_it_arrives():
    join = JoinBuffer(TTL)
    join.add_interaction(0, 0, interaction("now", ts=10**9))  # the interactions side is far ahead already
    assert join.add_feedback(0, 0, feedback("old", ts=1000)).dead == []  # an old rating, clock-skewed
    assert join.add_interaction(0, 1, interaction("other", ts=10**9 + TTL // 2)).dead == []
    [ex] = join.add_interaction(0, 2, interaction("old", ts=1000)).examples
    assert ex.event_id == "old/u1"
    # ...but not more than that.
    join.add_feedback(0, 1, feedback("never", ts=1000))
    [dead] = join.add_interaction(0, 3, interaction("later", ts=10**9 + 2 * TTL)).dead
    assert dead.reason.startswith("expired: no interaction for response_id never")
