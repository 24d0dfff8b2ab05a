"""The reward service in-process against the real broker: join in both orders, duplicates, dead letters,
held-out figures, checkpoints with their offsets, ModelEvents, committed offsets, health, resume."""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaConsumer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor

from rlhf_online import contract
from rlhf_online.broker.clients import make_consumer, make_producer, read_topic
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import Registry
from rlhf_online.reward import checkpoint
from rlhf_online.reward.config import RewardConfig
from rlhf_online.reward.service import create_service
from rlhf_online.reward.synthetic import synthetic_examples, to_events

pytestmark = pytest.mark.kafka


def make_config(kafka_bootstrap, topics, tmp_path, tiny_model_dir, **overrides) -> RewardConfig:
    settings = dict(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topics.prefix,
        registry_dir=str(tmp_path / "registry"),
        grpc_port=0,
        metrics_port=-1,
        base_model_dir=str(tiny_model_dir),
        torch_threads=1,
        max_length=64,
        update_every_examples=8,
        update_interval_s=0.5,
        checkpoint_every_updates=2,
        heldout_fraction=0.2,
        eval_every_updates=2,
        join_ttl_s=60.0,
    )
    return RewardConfig(**{**settings, **overrides})


def send(producer, topic: str, key: str, message) -> None:
    producer.send(topic, key=key.encode(), value=message.SerializeToString())


def test_service_joins_dead_letters_checkpoints_commits_and_resumes(
    kafka_bootstrap, topics, tmp_path, tiny_model_dir
):
    examples = synthetic_examples(40, seed=3)
    producer = make_producer(kafka_bootstrap, client_id="test-reward-service")
    # 1. Interactions first for half, ratings first for the other half; a duplicate rating; two bad records.
    for i, ex in enumerate(examples):
        interaction, feedback = to_events(ex)
        order = [(topics.interactions, interaction), (topics.feedback, feedback)]
        for topic, msg in order if i % 2 else reversed(order):
            send(producer, topic, ex.response_id, msg)
    send(producer, topics.feedback, examples[0].response_id, to_events(examples[0])[1])  # duplicate
    producer.send(topics.feedback, key=b"junk", value=b"\xff\x00 not a protobuf")
    ghost = events_pb2.FeedbackEvent(
        event_id="ghost/u1", response_id="ghost", rating=1, user_id="u1", timestamp_ms=1000
    )
    send(producer, topics.feedback, "ghost", ghost)
    producer.flush()

    config = make_config(kafka_bootstrap, topics, tmp_path, tiny_model_dir)
    service = create_service(config)
    service.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert service.wait_until(lambda s: s.examples_applied == 40, timeout_s=60), service.examples_applied
        assert service.wait_until(lambda s: s.duplicates >= 1 and s.dead_letters >= 1, timeout_s=30)
        # 2. Interactions far later in stream time expire the ghost rating on whichever partition it is.
        for i, ex in enumerate(synthetic_examples(4, seed=4, prefix="late")):
            interaction, _ = to_events(ex, timestamp_ms=10**9 + i)
            send(producer, topics.interactions, f"late-{i}", interaction)
        producer.flush()
        assert service.wait_until(lambda s: s.dead_letters == 2, timeout_s=30), service.dead_letters
    finally:
        service.stop()
    assert service.error is None

    # 3. The final checkpoint applied each of the 40 events once, and says which offsets it includes.
    registry = Registry(config.registry_dir)
    latest = registry.latest("reward")
    assert latest == service.version and service.checkpoints_published >= 2
    ids = checkpoint.applied_event_ids(registry.verify("reward", latest))
    assert sorted(ids) == sorted(ex.event_id for ex in examples)
    manifest = registry.manifest("reward", latest)
    assert manifest.extra["applied_heldout"] > 0 and "heldout_accuracy" in manifest.metrics
    offsets = manifest.extra["offsets"]
    assert set(offsets) == {f"{t}:{p}" for t in (topics.interactions, topics.feedback) for p in (0, 1)}
    committed = committed_offsets(kafka_bootstrap, service.group_id, [topics.interactions, topics.feedback])
    assert committed == offsets
    # Every rating was applied or dead-lettered: nothing holds the feedback offsets back from the end.
    assert [offsets[f"{topics.feedback}:{p}"] for p in (0, 1)] == end_offsets(
        kafka_bootstrap, topics.feedback
    )

    # 4. Dead letters carry the raw bytes and the reason.
    dead = [
        events_pb2.DeadLetter.FromString(r.value)
        for r in read_topic(kafka_bootstrap, topics.dlq, min_records=2)
    ]
    by_key = {d.key: d for d in dead}
    assert by_key[b"junk"].value == b"\xff\x00 not a protobuf" and "cannot parse" in by_key[b"junk"].reason
    assert by_key[b"ghost"].reason.startswith("expired: no interaction for response_id ghost")
    assert by_key[b"ghost"].source_topic == topics.feedback

    # 5. Each checkpoint was announced on the models topic.
    records = read_topic(kafka_bootstrap, topics.models)
    announced = [events_pb2.ModelEvent.FromString(r.value) for r in records]
    assert [e.version for e in announced] == registry.versions("reward")
    assert all(e.kind == events_pb2.REWARD and e.action == events_pb2.PUBLISHED for e in announced)
    assert all(r.key == b"reward" for r in records)
    # Each carries the figures of its manifest by the contract's names; the total of ratings applied in all.
    figures = {v for k, v in vars(contract.RewardFigure).items() if k.isupper()}
    for event in announced:
        manifest = registry.manifest("reward", event.version)
        assert dict(event.metrics) == manifest.metrics and set(event.metrics) <= figures
        applied = event.metrics[contract.RewardFigure.RATINGS_APPLIED]
        assert applied == manifest.extra["applied_events"] > 0
    assert announced[-1].metrics[contract.RewardFigure.RATINGS_APPLIED] == 40

    # 6. A restart resumes the lineage: the same ratings again change nothing; new ones are applied.
    for ex in examples[:5]:
        send(producer, topics.feedback, ex.response_id, to_events(ex)[1])
    more = synthetic_examples(6, seed=5, prefix="more")
    for i, ex in enumerate(more):  # stamped after the late interactions: stream time moves forward
        interaction, feedback = to_events(ex, timestamp_ms=10**9 + 1000 + i)
        send(producer, topics.interactions, ex.response_id, interaction)
        send(producer, topics.feedback, ex.response_id, feedback)
    producer.flush()
    producer.close()
    resumed = create_service(config)
    resumed.start()
    try:
        assert resumed.version == latest
        done = resumed.wait_until(lambda s: s.examples_applied >= 6 and s.duplicates >= 5, timeout_s=60)
        assert done, (resumed.examples_applied, resumed.duplicates, resumed.dead_letters)
    finally:
        resumed.stop()
    ids = checkpoint.applied_event_ids(registry.verify("reward", registry.latest("reward")))
    assert sorted(ids) == sorted(ex.event_id for ex in examples + more)
    assert registry.manifest("reward", registry.latest("reward")).parent_version == latest


def test_a_rebalance_that_hands_partitions_back_loses_nothing_the_join_held(
    kafka_bootstrap, topics, tmp_path, tiny_model_dir
):
    """On revocation the service drops the join's buffers; kafka-python keeps the position of a partition a
    rebalance gives back to the same consumer, so the service must read it again from where nothing was
    buffered, or the interactions it held are gone and their ratings never match."""
    examples = synthetic_examples(20, seed=6)
    producer = make_producer(kafka_bootstrap, client_id="test-reward-rebalance")
    for ex in examples:  # 1. interactions only: the join holds every one, waiting for its ratings
        send(producer, topics.interactions, ex.response_id, to_events(ex)[0])
    producer.flush()
    service = create_service(make_config(kafka_bootstrap, topics, tmp_path, tiny_model_dir))
    service.start()
    try:
        assert service.wait_until(lambda s: s.join.n_interactions == 20, timeout_s=60)
        # 2. A second member joins the group, so the service keeps one partition of each topic, then leaves.
        intruder = make_consumer(
            kafka_bootstrap,
            group_id=service.group_id,
            client_id="test-reward-intruder",
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        intruder.subscribe([topics.interactions, topics.feedback])
        deadline = time.monotonic() + 60
        while not intruder.assignment() and time.monotonic() < deadline:
            intruder.poll(timeout_ms=100)
        assert len(intruder.assignment()) == 2
        intruder.close(autocommit=False)
        assert service.wait_until(lambda s: len(s.offsets.owned) == 4, timeout_s=60)
        # 3. The ratings arrive: each finds its interaction, on the partitions kept and on those handed back.
        for ex in examples:
            send(producer, topics.feedback, ex.response_id, to_events(ex)[1])
        producer.flush()
        done = service.wait_until(lambda s: s.examples_applied == 20, timeout_s=60)
        assert done, (service.examples_applied, service.join.n_interactions, service.join.n_waiting)
    finally:
        producer.close()
        service.stop()
    assert service.error is None and service.dead_letters == 0


def end_offsets(bootstrap: str, topic: str) -> list[int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(topic, p) for p in (0, 1)]
        ends = consumer.end_offsets(partitions)
        return [ends[tp] for tp in partitions]
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group_id: str, topic_names: list[str]) -> dict[str, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    try:
        result = {}
        for topic in topic_names:
            for p in (0, 1):
                offset = consumer.committed(TopicPartition(topic, p))
                if offset is not None:
                    result[f"{topic}:{p}"] = offset
        return result
    finally:
        consumer.close(autocommit=False)
