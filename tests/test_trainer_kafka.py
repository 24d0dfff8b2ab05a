"""The trainer service against the real broker: interactions and ratings on the topics plus a reward
checkpoint in the registry lead to a PPO round, a gated policy version and its ModelEvent."""

import time

import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from rlhf_online.bootstrap import copy_model_files, ensure_initial_policy
from rlhf_online.broker.clients import make_producer, read_topic
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2
from rlhf_online.registry import Registry
from rlhf_online.reward.model import init_reward_model
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.service import create_service

pytestmark = pytest.mark.kafka

TOPICS = [
    "cats",
    "the sea",
    "bread",
    "music",
    "rain",
    "trains",
    "chess",
    "tea",
    "maps",
    "owls",
    "snow",
    "clocks",
]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gate_decisions(code: str) -> float:
    return REGISTRY.get_sample_value("rlhf_trainer_gate_decisions_total", {"code": code}) or 0.0


def publish_reward_checkpoint(registry: Registry, base_dir) -> str:
    """An untrained reward model whose head is scaled up, so its scores spread like a trained one's."""
    model = init_reward_model(base_dir, max_length=128, seed=0)
    with torch.no_grad():
        model.backbone.score.weight.mul_(30.0)
    return registry.publish("reward", model.save).version


def produce_traffic(bootstrap: str, topics, tokenizer, n: int) -> None:
    producer = make_producer(bootstrap, client_id="test-trainer-traffic")
    futures = []
    for i in range(n):
        messages = [
            chat_pb2.Message(role="user", content=f"Tell me about {TOPICS[i % len(TOPICS)]}, take {i}.")
        ]
        response_id = f"resp-{i}"
        interaction = events_pb2.Interaction(
            response_id=response_id, messages=messages, response="ok", model_version="v000001",
            prompt=render_prompt(tokenizer, [(m.role, m.content) for m in messages]) if i % 2 else "",
            timestamp_ms=int(time.time() * 1000), user_id=f"user-{i}",
        )  # fmt: skip
        rating = chat_pb2.THUMBS_UP if i % 3 else chat_pb2.THUMBS_DOWN
        feedback = events_pb2.FeedbackEvent(
            event_id=f"ev-{i}", response_id=response_id, rating=rating, user_id=f"user-{i}",
            timestamp_ms=int(time.time() * 1000), model_version="v000001",
        )  # fmt: skip
        key = response_id.encode()
        futures.append(producer.send(topics.interactions, key=key, value=interaction.SerializeToString()))
        futures.append(producer.send(topics.feedback, key=key, value=feedback.SerializeToString()))
    for future in futures:
        future.get(timeout=30)
    producer.close()


def test_ratings_lead_to_a_gated_published_version_and_model_event(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path
):
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    # Two earlier rounds' versions (copies of the base): the round starts from v000003, and retention (keep 1)
    # then deletes v000002 but keeps the reference v000001 and the new version's parent v000003.
    for parent in ("v000001", "v000002"):
        registry.publish("policy", lambda tmp: copy_model_files(tiny_model_dir, tmp), parent_version=parent)
    reward_version = publish_reward_checkpoint(registry, tiny_model_dir)
    produce_traffic(kafka_bootstrap, topics, AutoTokenizer.from_pretrained(tiny_model_dir), n=48)
    group = f"trainer-{topics.prefix}"
    config = TrainerConfig(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=topics.prefix, registry_dir=str(registry.root),
        grpc_port=0, consumer_group=group, min_new_ratings=40, round_interval_s=0, poll_interval_s=0.2,
        keep_versions=1,
    )  # fmt: skip
    passed_before = gate_decisions("passed")
    service = create_service(config)
    service.start()
    try:
        wait_for(lambda: service.rounds_run + service.rounds_failed > 0, 240, "a round")
        assert service.rounds_failed == 0
        assert service.versions_published == 1, service.last_result.decision.reason
        assert service.gate_rejections == 0
        # the counted ratings were committed, so a restarted trainer would not count them again
        wait_for(lambda: service.new_ratings == 0, 10, "the counter reset")
    finally:
        service.stop()

    version = service.last_published
    assert registry.latest("policy") == version == "v000004"
    assert registry.versions("policy") == ["v000001", "v000003", "v000004"]
    registry.verify("policy", version)
    manifest = registry.manifest("policy", version)
    assert manifest.parent_version == "v000003"
    assert (
        manifest.extra["reward_version"] == reward_version
        and manifest.extra["reference_version"] == "v000001"
    )
    assert manifest.metrics["gate_passed"] == 1.0
    assert manifest.metrics["gate_candidate_score"] > manifest.metrics["gate_serving_score"]
    assert gate_decisions("passed") == passed_before + 1
    assert REGISTRY.get_sample_value("rlhf_trainer_reward_mean") == pytest.approx(
        manifest.metrics["reward_mean"]
    )

    events = [
        events_pb2.ModelEvent.FromString(r.value)
        for r in read_topic(kafka_bootstrap, topics.models, min_records=1)
    ]
    assert len(events) == 1
    event = events[0]
    assert (event.kind, event.action) == (events_pb2.POLICY, events_pb2.PUBLISHED)
    assert (event.version, event.parent_version, event.path) == (version, "v000003", f"policy/{version}")
    assert event.metrics["gate_improvement"] == pytest.approx(manifest.metrics["gate_improvement"])

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(topics.feedback, p) for p in consumer.partitions_for_topic(topics.feedback)
        ]
        committed = sum(consumer.committed(tp) or 0 for tp in partitions)
    finally:
        consumer.close()
    assert committed == 48
