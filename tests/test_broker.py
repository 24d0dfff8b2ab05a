"""The local Kafka broker and the client helpers, against the real broker.

.venv/bin/pytest -q tests/test_broker.py
"""

import os
import socket
import uuid
from pathlib import Path

import pytest
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from rlhf_online.broker.clients import TopicLayoutError, ensure_topics, make_producer, read_topic
from rlhf_online.broker.local import EXIT_STOPPED, BrokerError, broker_status, main, start_broker, stop_broker
from rlhf_online.topics import Topics

KAFKA_TEST_HOME = Path(__file__).resolve().parent.parent / ".rlhf" / "kafka-test"  # as in conftest.py


def _partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names) if t["partitions"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.kafka
def test_start_is_idempotent_and_status_reports_running(kafka_bootstrap, capsys):
    before = broker_status(KAFKA_TEST_HOME)
    assert before.running and before.bootstrap == kafka_bootstrap and before.pid

    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    again = start_broker(KAFKA_TEST_HOME, port=port, controller_port=port + 1)

    assert again == kafka_bootstrap
    assert broker_status(KAFKA_TEST_HOME).pid == before.pid
    assert main(["status", "--kafka-home", str(KAFKA_TEST_HOME)], {}) == 0
    assert f"running, pid {before.pid}, bootstrap {kafka_bootstrap}" in capsys.readouterr().out


@pytest.mark.kafka
def test_topics_fixture_creates_copartitioned_topics(kafka_bootstrap, topics):
    counts = _partition_counts(kafka_bootstrap, topics.all())
    assert counts == {
        topics.interactions: 2, topics.feedback: 2, topics.models: 1, topics.rounds: 1, topics.canary: 1,
        topics.dlq: 1,
    }  # fmt: skip

    ensure_topics(kafka_bootstrap, topics, partitions=5)  # existing topics are kept as they are

    assert _partition_counts(kafka_bootstrap, topics.all()) == counts


@pytest.mark.kafka
def test_ensure_topics_refuses_a_pair_that_is_not_copartitioned(kafka_bootstrap):
    t = Topics(prefix=f"t{uuid.uuid4().hex[:10]}")
    with KafkaAdminClient(bootstrap_servers=kafka_bootstrap) as admin:
        admin.create_topics({t.interactions: {"num_partitions": 3, "replication_factor": 1}})
        admin.wait_for_topics([t.interactions])
    ensure_topics(kafka_bootstrap, t, partitions=2)  # the lone half decides: feedback gets 3 too
    assert _partition_counts(kafka_bootstrap, [t.feedback]) == {t.feedback: 3}

    bad = Topics(prefix=f"t{uuid.uuid4().hex[:10]}")
    with KafkaAdminClient(bootstrap_servers=kafka_bootstrap) as admin:
        admin.create_topics(
            {
                bad.interactions: {"num_partitions": 3, "replication_factor": 1},
                bad.feedback: {"num_partitions": 2, "replication_factor": 1},
            }
        )
    with pytest.raises(TopicLayoutError, match="co-partitioned"):
        ensure_topics(kafka_bootstrap, bad, partitions=2)


@pytest.mark.kafka
def test_acked_records_are_read_back_in_partition_order(kafka_bootstrap, topics):
    producer = make_producer(kafka_bootstrap, client_id="test-broker")
    sent = [(f"resp-{i % 5}".encode(), f"value-{i}".encode()) for i in range(20)]
    try:
        metadata = [producer.send(topics.feedback, key=k, value=v).get(timeout=30) for k, v in sent]
    finally:
        producer.close()
    assert all(m.offset >= 0 for m in metadata)

    records = read_topic(kafka_bootstrap, topics.feedback, min_records=20)

    assert sorted((r.key, r.value) for r in records) == sorted(sent)
    partition_of = {}
    for r in records:  # one key, one partition: what the co-partitioned join relies on
        assert partition_of.setdefault(r.key, r.partition) == r.partition
    assert [(r.partition, r.offset) for r in records] == sorted((r.partition, r.offset) for r in records)
    for key in partition_of:  # per key, the order sent is the order read
        assert [r.value for r in records if r.key == key] == [v for k, v in sent if k == key]


@pytest.mark.kafka
def test_read_topic_says_how_many_records_it_got(kafka_bootstrap, topics):
    assert read_topic(kafka_bootstrap, topics.models) == []
    with pytest.raises(TimeoutError, match="got 0 records"):
        read_topic(kafka_bootstrap, topics.models, min_records=1, timeout_s=1)


@pytest.mark.kafka
def test_stop_start_cycle_keeps_records_and_dead_broker_fails_sends(tmp_path):
    home, port, controller_port = tmp_path / "kafka", _free_port(), _free_port()
    t = Topics(prefix="cycle")
    ports = {"port": port, "controller_port": controller_port}
    bootstrap = start_broker(home, **ports, partitions=1, topics=t)
    try:
        pid = broker_status(home).pid
        assert start_broker(home, **ports, partitions=1, topics=t) == bootstrap
        assert broker_status(home).pid == pid
        producer = make_producer(bootstrap, client_id="test-cycle")
        producer.send(t.interactions, key=b"k", value=b"before stop").get(timeout=30)

        stop_broker(home)
        assert not broker_status(home).running
        stop_broker(home)  # stopping a stopped broker is a no-op
        assert main(["status", "--kafka-home", str(home)], {}) == EXIT_STOPPED
        with pytest.raises(KafkaError):  # no broker: the send fails instead of hanging
            producer.send(t.interactions, key=b"k", value=b"after stop").get(timeout=60)
        producer.close(timeout=1)

        assert start_broker(home, **ports, partitions=1, topics=t) == bootstrap
        assert broker_status(home).pid != pid
        records = read_topic(bootstrap, t.interactions, min_records=1)
        assert [r.value for r in records] == [b"before stop"]
    finally:
        stop_broker(home)
    assert not broker_status(home).running


def test_start_names_the_process_holding_a_taken_port(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port 127.0.0.1:{port} is taken by pid {os.getpid()} "):
            start_broker(tmp_path / "kafka", port=port, controller_port=_free_port(), timeout_s=5)
    assert not broker_status(tmp_path / "kafka").running


def test_status_of_a_home_without_a_broker_exits_3(tmp_path, capsys):
    assert main(["status"], {"RLHF_KAFKA_HOME": str(tmp_path / "nothing")}) == EXIT_STOPPED
    assert "kafka: stopped" in capsys.readouterr().out
