"""The reward service's offset book, without Kafka: what may be committed while records are still buffered
(in the join, or pending an update), seeking to a checkpoint on assignment, forgetting revoked partitions."""

from kafka.structs import TopicPartition

from rlhf_online.reward.offsets import OffsetBook, offset_key, parse_offset_key

FB0, FB1 = ("t.feedback", 0), ("t.feedback", 1)
IN0 = ("t.interactions", 0)


def read_all(book: OffsetBook, partition, offsets) -> None:
    for offset in offsets:
        book.read(partition, offset)


def test_offset_keys_round_trip_with_dots_and_colons_in_topic_names():
    assert offset_key("rlhf.feedback", 3) == "rlhf.feedback:3"
    assert parse_offset_key("a:b.feedback:12") == ("a:b.feedback", 12)


def test_committable_is_the_next_offset_to_read_when_nothing_is_buffered():
    book = OffsetBook()
    book.assign([FB0, IN0])
    read_all(book, FB0, range(5))
    read_all(book, IN0, range(3))
    assert book.committable() == {"t.feedback:0": 5, "t.interactions:0": 3}


def test_a_record_held_by_the_join_stops_the_commit_below_it_until_released():
    book = OffsetBook()
    book.assign([IN0])
    read_all(book, IN0, range(10))
    book.hold(IN0, 4)  # an interaction waiting for its ratings
    book.hold(IN0, 7)
    assert book.committable() == {"t.interactions:0": 4}
    book.release(IN0, 4)  # expired
    assert book.committable() == {"t.interactions:0": 7}
    book.release(IN0, 7)
    assert book.committable() == {"t.interactions:0": 10}
    book.release(IN0, 7)  # releasing what is not held changes nothing
    book.release(("t.other", 0), 1)
    assert book.committable() == {"t.interactions:0": 10}


def test_a_rating_pending_an_update_stops_the_commit_until_the_update_applies_it():
    book = OffsetBook()
    book.assign([FB0])
    read_all(book, FB0, range(3))
    book.hold(FB0, 1)  # waiting in the join for its interaction...
    book.release(FB0, 1)  # ...matched...
    book.await_update("e1", FB0, 1)  # ...and now pending in the learner
    book.await_update("e2", FB0, 2)
    assert book.committable() == {"t.feedback:0": 1}
    book.updated("e2")  # updates may apply them in any order
    assert book.committable() == {"t.feedback:0": 1}
    book.updated("e1")
    book.updated("unknown")
    assert book.committable() == {"t.feedback:0": 3}


def test_one_offset_held_twice_stays_held_until_both_let_go():
    book = OffsetBook()
    book.assign([FB0])
    read_all(book, FB0, range(2))
    book.hold(FB0, 0)
    book.await_update("e0", FB0, 0)
    book.release(FB0, 0)
    assert book.committable() == {"t.feedback:0": 0}
    book.updated("e0")
    assert book.committable() == {"t.feedback:0": 2}


def test_assignment_seeks_to_the_checkpoint_and_unread_partitions_keep_its_offsets():
    book = OffsetBook({"t.feedback:0": 12, "t.feedback:1": 30})
    # kafka-python's TopicPartition is a (topic, partition) tuple: the service passes its own.
    seeks = book.assign([TopicPartition(*FB0), TopicPartition("t.interactions", 0)])
    assert seeks == {TopicPartition(*FB0): 12}  # no checkpoint offset: the group's committed one applies
    assert book.owns(FB0) and book.owns(TopicPartition(*FB0)) and not book.owns(FB1)
    read_all(book, FB0, [12, 13])
    assert book.committable() == {"t.feedback:0": 14, "t.feedback:1": 30}


def test_only_owned_partitions_are_committed_and_a_publish_moves_the_restart_point():
    book = OffsetBook({"t.feedback:1": 30})
    book.assign([FB0])
    read_all(book, FB0, range(8))
    offsets = book.committable()
    assert book.owned_offsets(offsets) == {FB0: 8}  # partition 1 belongs to another consumer now
    book.published(offsets)
    book.revoke([FB0])
    assert book.assign([FB0]) == {FB0: 8}


def test_revoking_forgets_what_was_read_and_buffered_there_and_nothing_else():
    book = OffsetBook({"t.feedback:0": 2})
    book.assign([FB0, FB1])
    read_all(book, FB0, range(2, 9))
    read_all(book, FB1, range(5))
    book.hold(FB0, 3)
    book.await_update("e4", FB0, 4)
    book.await_update("e1", FB1, 1)
    book.revoke([FB0])
    assert not book.owns(FB0) and book.owned == {FB1}
    # Partition 0 falls back to the last checkpoint (its new owner replays from there); 1 is untouched.
    assert book.committable() == {"t.feedback:0": 2, "t.feedback:1": 1}
    book.updated("e4")  # an update after the revoke applies it; the book has nothing to release
    book.updated("e1")
    assert book.committable() == {"t.feedback:0": 2, "t.feedback:1": 5}
    # Assigned again, partition 0 starts from the checkpoint with nothing held.
    assert book.assign([FB0]) == {FB0: 2}
    read_all(book, FB0, [2])
    assert book.committable()["t.feedback:0"] == 3


def test_a_partition_owned_again_seeks_back_to_where_nothing_it_dropped_was_buffered():
    """kafka-python keeps the position of a partition a rebalance gives back to the same consumer; the join
    dropped what it held there, so the book must say where to read again from."""
    book = OffsetBook()
    book.assign([FB0, FB1])
    read_all(book, FB0, range(5, 9))  # the group's committed offset was 5
    book.hold(FB0, 6)
    book.revoke([FB0, FB1])
    assert book.assign([FB0, FB1]) == {FB0: 5}  # never read partition 1: its own position is right
    book.published({"t.feedback:0": 7})
    book.revoke([FB0])
    assert book.assign([FB0]) == {FB0: 7}  # a checkpoint has it now
