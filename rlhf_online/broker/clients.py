"""Kafka client factories and helpers shared by every service, the tests and the demo (kafka-python).

    producer = make_producer("127.0.0.1:19092", client_id="inference-0")
    producer.send(topics.feedback, key=b"resp-1", value=event.SerializeToString()).get(timeout=10)
    records = read_topic("127.0.0.1:19092", topics.feedback, min_records=1)

Keys and values are bytes (serialized protobufs): no serializers are configured. The timeouts are short on
purpose: a producer call against a dead broker fails within seconds, so SubmitFeedback can answer UNAVAILABLE
instead of hanging for a minute (promise 1 in docs/design.md).
"""

import logging
import socket
import threading
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError, for_code
from kafka.producer.transaction_manager import TransactionState

from rlhf_online.topics import Topics

log = logging.getLogger(__name__)

# Producers: fail fast when the broker is gone. delivery_timeout_ms must be >= request_timeout_ms + linger_ms.
PRODUCER_DEFAULTS = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 5,
    "batch_size": 64 * 1024,
    "max_block_ms": 5_000,
    "request_timeout_ms": 5_000,
    "delivery_timeout_ms": 10_000,
    "bootstrap_timeout_ms": 5_000,
    "reconnect_backoff_max_ms": 1_000,
    "allow_auto_create_topics": False,
}
CONSUMER_DEFAULTS = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "isolation_level": "read_committed",
    "allow_auto_create_topics": False,
    "session_timeout_ms": 10_000,
    "heartbeat_interval_ms": 3_000,
    "bootstrap_timeout_ms": 10_000,
    "reconnect_backoff_max_ms": 1_000,
}


class TopicLayoutError(RuntimeError):
    """Existing topics whose partition counts break the co-partitioned join."""


def make_producer(bootstrap: str, *, client_id: str, **overrides) -> KafkaProducer:
    """An idempotent producer with acks=all: send().get() returns only once the broker has the record.

    Args:
        bootstrap: "host:port[,host:port]".
        client_id: shows in the broker's logs and metrics.
        overrides: any other KafkaProducer setting (kafka-python names), applied last.

    Raises kafka.errors.KafkaTimeoutError within `bootstrap_timeout_ms` (5 s) when no broker answers; call
    `wait_for_broker` first where the broker may still be starting.
    """
    config = {**PRODUCER_DEFAULTS, **overrides}
    producer = KafkaProducer(bootstrap_servers=_servers(bootstrap), client_id=client_id, **config)
    _recover_producer_id_after_reset(producer)
    return producer


def _recover_producer_id_after_reset(producer: KafkaProducer) -> None:
    """Works around a kafka-python 3.0.12 bug that the fault matrix found (tests/faults/README.md).

    When a batch that was already sent expires (the broker away longer than `delivery_timeout_ms`), the
    idempotent producer drops its producer id (`reset_producer_id`) but stays READY, so it never asks for a
    new one: every later send waits forever, and SubmitFeedback answers UNAVAILABLE until the process
    restarts. As the Java client does (KAFKA-7737), the reset goes back to UNINITIALIZED, from where the
    sender asks the broker for a new producer id before it sends again.
    """
    manager = producer._transaction_manager
    if manager is None or manager.is_transactional():
        return
    reset = manager.reset_producer_id

    def reset_and_reinitialize() -> None:
        with manager._lock:
            reset()
            manager._current_state = TransactionState.UNINITIALIZED  # kafka-python refuses this transition

    manager.reset_producer_id = reset_and_reinitialize


def make_consumer(bootstrap: str, *, group_id: str | None, client_id: str, **overrides) -> KafkaConsumer:
    """A consumer that never commits by itself, starts at the earliest offset and skips aborted transactions.

    Subscribe or assign after creating it; commit with `consumer.commit(offsets)` once the work is durable.
    """
    config = {**CONSUMER_DEFAULTS, **overrides}
    servers = _servers(bootstrap)
    return KafkaConsumer(bootstrap_servers=servers, group_id=group_id, client_id=client_id, **config)


def wait_for_broker(bootstrap: str, timeout_s: float = 60.0) -> None:
    """Blocks until a broker at `bootstrap` answers a metadata request and has an unfenced broker.

    Raises:
        TimeoutError: naming the last failure, when it does not answer within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    last_error = "no attempt made"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"Kafka at {bootstrap} did not answer within {timeout_s:.0f}s (last error: {last_error}). "
                "Start the local broker with `rlhf-online kafka start`, or check --kafka-bootstrap."
            )
        if not _any_port_open(bootstrap):
            last_error = "connection refused"
            time.sleep(min(0.2, max(remaining, 0)))
            continue
        try:
            with _admin(bootstrap, min(remaining, 5.0)) as admin:
                brokers = admin.describe_cluster()["brokers"]
            if any(not b.get("is_fenced", False) for b in brokers):
                return
            last_error = "the broker is registered but still fenced"
        except (KafkaError, OSError) as e:
            last_error = f"{type(e).__name__}: {e}"
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))


def ensure_topics(
    bootstrap: str, topics: Topics, *, partitions: int, replication: int = 1, timeout_s: float = 30.0
) -> None:
    """Creates those of the six topics of `topics` that do not exist, and waits for every partition's leader.

    interactions and feedback get `partitions` each (the reward join needs them co-partitioned); models,
    rounds, canary and dlq one partition (the first three: one total order of versions, rounds, trials).
    Existing topics are left as they are.

    Raises:
        TopicLayoutError: interactions and feedback exist with different partition counts.
        RuntimeError: the broker refused to create a topic.
        TimeoutError: the topics did not get leaders within `timeout_s`.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    deadline = time.monotonic() + timeout_s
    wanted = {
        topics.interactions: partitions, topics.feedback: partitions,
        topics.models: 1, topics.rounds: 1, topics.canary: 1, topics.dlq: 1,
    }  # fmt: skip
    with _admin(bootstrap, timeout_s) as admin:
        existing = _partition_counts(admin, list(wanted))
        _check_copartitioned(topics, existing)
        # A lone half of the join pair decides the count of the other half, so the pair stays co-partitioned.
        for have, other in ((topics.interactions, topics.feedback), (topics.feedback, topics.interactions)):
            if have in existing and other not in existing:
                wanted[other] = existing[have]
        for name, count in existing.items():
            if count != wanted[name]:
                log.info(
                    "topic %s already exists with %d partitions (asked for %d); keeping it",
                    name,
                    count,
                    wanted[name],
                )
        missing = {
            name: {"num_partitions": n, "replication_factor": replication}
            for name, n in wanted.items()
            if name not in existing
        }
        if missing:
            _create(admin, missing, timeout_s)
            log.info("created %s", ", ".join(f"{n} ({c['num_partitions']}p)" for n, c in missing.items()))
        try:
            admin.wait_for_topics(list(wanted), timeout_ms=max(deadline - time.monotonic(), 1.0) * 1000)
        except KafkaError as e:
            raise TimeoutError(f"topics of prefix {topics.prefix!r} have no leader yet: {e}") from e
        _check_copartitioned(topics, _partition_counts(admin, list(wanted)))


def wait_for_partitions(
    consumer: KafkaConsumer, topic: str, *, timeout_s: float = 30.0, stop: threading.Event | None = None
) -> list[TopicPartition]:
    """The partitions of `topic`, once the consumer's metadata has them (a topic just created may lag).

    Args:
        stop: when set while waiting, returns [] at once (a service shutting down).

    Raises:
        RuntimeError: the topic does not exist after `timeout_s`, saying how to create it.
    """
    deadline = time.monotonic() + timeout_s
    while not (ids := consumer.partitions_for_topic(topic)):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"topic {topic} does not exist (waited {timeout_s:.0f}s); create it with "
                "`rlhf-online kafka start` or the Strimzi KafkaTopic resources"
            )
        if stop is not None and stop.wait(0.2):
            return []
        if stop is None:
            time.sleep(0.2)
    return [TopicPartition(topic, p) for p in sorted(ids)]


def read_topic(
    bootstrap: str, topic: str, *, timeout_s: float = 30.0, min_records: int = 0
) -> list[ConsumerRecord]:
    """Reads `topic` from the beginning, without a consumer group (nothing is committed).

    Stops once it has read up to the end offsets seen at the start and holds at least `min_records`.

    Returns:
        The records, ordered by (partition, offset).

    Raises:
        TimeoutError: saying how many records it got, when that takes longer than `timeout_s` (or when no
            broker answers).
    """
    deadline = time.monotonic() + timeout_s
    try:
        consumer = make_consumer(
            bootstrap, group_id=None, client_id="rlhf-online-read-topic",
            bootstrap_timeout_ms=_ms_left(deadline),
        )  # fmt: skip
    except KafkaTimeoutError as e:
        raise TimeoutError(f"read_topic({topic!r}): no Kafka broker answered at {bootstrap}: {e}") from e
    try:
        try:
            tps = wait_for_partitions(consumer, topic, timeout_s=max(deadline - time.monotonic(), 0.0))
        except RuntimeError as e:
            raise TimeoutError(f"read_topic({topic!r}) on {bootstrap}: {e}") from e
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps, timeout_ms=_ms_left(deadline))
        records: list[ConsumerRecord] = []
        while True:
            if len(records) >= min_records and all(
                (consumer.position(tp, timeout_ms=_ms_left(deadline)) or 0) >= end[tp] for tp in tps
            ):
                break
            if time.monotonic() > deadline:
                ends = {tp.partition: offset for tp, offset in sorted(end.items())}
                raise TimeoutError(
                    f"read_topic({topic!r}) got {len(records)} records in {timeout_s:.0f}s; wanted at least "
                    f"{min_records} and up to the end offsets {ends} (partition: offset) seen at the start"
                )
            for batch in consumer.poll(timeout_ms=min(200, _ms_left(deadline))).values():
                records.extend(batch)
    finally:
        consumer.close()
    return sorted(records, key=lambda r: (r.partition, r.offset))


def _servers(bootstrap: str) -> list[str]:
    return [s.strip() for s in bootstrap.split(",") if s.strip()]


def _ms_left(deadline: float) -> int:
    return max(int((deadline - time.monotonic()) * 1000), 1)


def _admin(bootstrap: str, timeout_s: float) -> KafkaAdminClient:
    timeout_ms = max(int(timeout_s * 1000), 1000)
    return KafkaAdminClient(
        bootstrap_servers=_servers(bootstrap),
        client_id="rlhf-online-admin",
        bootstrap_timeout_ms=timeout_ms,
        request_timeout_ms=timeout_ms,
        reconnect_backoff_max_ms=1_000,
    )


def _any_port_open(bootstrap: str) -> bool:
    """A plain TCP connect, so waiting on a broker that is not up yet costs no client threads or log noise."""
    for server in _servers(bootstrap):
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=1.0):
                return True
        except OSError:
            continue
    return False


def _partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition count of each of `names` that exists."""
    return {
        t["name"]: len(t["partitions"])
        for t in admin.describe_topics(names)
        if t.get("error_code", 0) == 0 and t.get("partitions")
    }


def _check_copartitioned(topics: Topics, counts: dict[str, int]) -> None:
    a, b = counts.get(topics.interactions), counts.get(topics.feedback)
    if a is not None and b is not None and a != b:
        raise TopicLayoutError(
            f"{topics.interactions} has {a} partitions but {topics.feedback} has {b}: the reward join needs "
            "them co-partitioned (equal counts). Delete both topics, or use a new --topic-prefix, and create "
            "them again."
        )


def _create(admin: KafkaAdminClient, new_topics: dict[str, dict], timeout_s: float) -> None:
    response = admin.create_topics(new_topics, timeout_ms=int(timeout_s * 1000), raise_errors=False)
    for t in response["topics"]:
        code = t.get("error_code", 0)
        if code in (0, TopicAlreadyExistsError.errno):  # created concurrently by another process: fine
            continue
        raise RuntimeError(
            f"the broker refused to create topic {t['name']}: {for_code(code).__name__} "
            f"({t.get('error_message') or 'no message'})"
        )
