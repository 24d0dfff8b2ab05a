"""The outbox journal (inference/journal.py): what a killed process left unacknowledged is sent by the next.

Pure file tests of the journal, then the outbox on it with a producer whose acks the test gives by hand.
The whole path (SIGKILL, restart, audit of the topics) is fault scenario 1 (tests/faults).
"""

import pytest

from rlhf_online.inference import metrics
from rlhf_online.inference.events import Outbox, Record
from rlhf_online.inference.journal import Journal, JournalError
from tests.faults.test_interaction_gate import HeldProducer


def reopen(path, **kw) -> tuple[Journal, list]:
    journal = Journal(path, **kw)
    return journal, journal.replay()


def test_records_not_acknowledged_are_replayed_in_order(tmp_path):
    journal, left = reopen(tmp_path)
    assert left == []
    seqs = [journal.append("interactions", f"r{i}".encode(), f"v{i}".encode()) for i in range(4)]
    journal.ack(seqs[1])
    journal.close()  # or a SIGKILL: every entry is written by then

    journal, left = reopen(tmp_path)
    assert [(r.topic, r.key, r.value) for r in left] == [
        ("interactions", b"r0", b"v0"), ("interactions", b"r2", b"v2"), ("interactions", b"r3", b"v3"),
    ]  # fmt: skip
    assert journal.unacknowledged == 3
    new = journal.append("interactions", b"r4", b"v4")
    assert new > max(r.seq for r in left)  # seqs never repeat across processes
    for record in left:
        journal.ack(record.seq)
    journal.close()
    _, left = reopen(tmp_path)
    assert [r.key for r in left] == [b"r4"]


def test_a_directory_serves_one_process_at_a_time(tmp_path):
    first = Journal(tmp_path)
    with pytest.raises(JournalError, match="own --outbox-dir"):
        Journal(tmp_path)
    first.close()
    Journal(tmp_path).close()  # free again


def test_a_torn_tail_loses_only_the_torn_entry(tmp_path):
    journal, _ = reopen(tmp_path)
    journal.append("t", b"whole", b"x" * 100)
    journal.append("t", b"torn", b"y" * 100)
    journal.close()
    (segment,) = tmp_path.glob("segment-*.log")
    segment.write_bytes(segment.read_bytes()[:-10])  # a crash in the middle of the last write
    _, left = reopen(tmp_path)
    assert [r.key for r in left] == [b"whole"]


def test_a_flipped_bit_stops_the_replay_of_its_segment(tmp_path):
    journal, _ = reopen(tmp_path)
    journal.append("t", b"first", b"x" * 100)
    journal.append("t", b"second", b"y" * 100)
    journal.close()
    (segment,) = tmp_path.glob("segment-*.log")
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0x01  # inside the second entry's value
    segment.write_bytes(bytes(data))
    _, left = reopen(tmp_path)
    assert [r.key for r in left] == [b"first"]


def test_acknowledged_segments_are_deleted_oldest_first(tmp_path):
    journal, _ = reopen(tmp_path, segment_bytes=256)
    seqs = [journal.append("t", f"k{i}".encode(), b"v" * 64) for i in range(20)]
    assert len(list(tmp_path.glob("segment-*.log"))) > 3
    for seq in seqs[1:]:  # the first record holds back every segment
        journal.ack(seq)
    assert len(list(tmp_path.glob("segment-*.log"))) > 3
    journal.ack(seqs[0])
    assert len(list(tmp_path.glob("segment-*.log"))) == 1  # only the active one
    journal.close()
    _, left = reopen(tmp_path)
    assert left == []


def test_the_outbox_journals_before_put_returns_and_the_next_one_sends_the_rest(tmp_path):
    producer = HeldProducer()
    outbox = Outbox(producer, max_records=10, journal=Journal(tmp_path))
    outbox.put(Record("interactions", b"acked", b"1"))
    outbox.put(Record("interactions", b"lost-with-the-process", b"2"))
    assert producer.sent.wait(10)
    producer.futures[0].success(None)  # the broker took the first; the process dies before the second
    outbox.close(timeout_s=0.2)

    again = HeldProducer()
    restarted = Outbox(again, max_records=10, journal=Journal(tmp_path))
    calls: list = []
    assert restarted.when_acked("interactions", b"lost-with-the-process", calls.append)  # a rating waits
    assert again.sent.wait(10)
    again.futures[0].success(None)
    assert calls == [None]
    restarted.close(timeout_s=1)
    _, left = reopen(tmp_path)
    assert left == []


def test_a_disk_that_refuses_the_journal_does_not_stop_the_answers(tmp_path):
    journal = Journal(tmp_path)
    producer = HeldProducer()
    outbox = Outbox(producer, max_records=10, journal=journal)

    def refuse(*_args):
        raise OSError(28, "No space left on device")

    journal.append = refuse
    before = metrics.JOURNAL_FAILURES._value.get()
    outbox.put(Record("interactions", b"r", b"v"))  # does not raise: kept in memory, counted
    assert metrics.JOURNAL_FAILURES._value.get() == before + 1
    assert producer.sent.wait(10)
    producer.futures[0].success(None)
    outbox.close(timeout_s=1)
