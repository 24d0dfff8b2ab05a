"""The trainer service against the real broker: interactions on their topic and a reward checkpoint
announced by its ModelEvent (with ratings_applied) lead to a PPO round; a round the gate passes becomes a
policy version, its ModelEvent and a PASSED RoundEvent, a round it rejects a REJECTED RoundEvent only.
Ratings on `rlhf.feedback` are never read: what counts is what the reward checkpoints applied."""

import time

import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from rlhf_online.bootstrap import copy_model_files, ensure_initial_policy
from rlhf_online.broker.clients import make_producer, read_topic
from rlhf_online.contract import (
    POLICY,
    REWARD,
    RewardFigure,
    RoundFigure,
    model_event,
    model_event_key,
    now_ms,
)
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.tiny_model import TINY_LEARNING_RATE
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
N_TRAFFIC = 48


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


def announce_reward_checkpoint(
    bootstrap: str, topics, registry: Registry, base_dir, ratings_applied: int
) -> str:
    """What the reward service does: a checkpoint in the registry, then its ModelEvent on the models topic.

    The model is untrained with its head scaled up, so its scores spread like a trained one's.
    """
    model = init_reward_model(base_dir, max_length=128, seed=0)
    with torch.no_grad():
        model.backbone.score.weight.mul_(30.0)
    manifest = registry.publish(REWARD, model.save, metrics={RewardFigure.RATINGS_APPLIED: ratings_applied})
    event = model_event(REWARD, events_pb2.PUBLISHED, manifest.version, metrics=manifest.metrics)
    producer = make_producer(bootstrap, client_id="test-trainer-reward")
    producer.send(topics.models, key=model_event_key(event), value=event.SerializeToString()).get(timeout=30)
    producer.close()
    return manifest.version


def produce_traffic(bootstrap: str, topics, tokenizer, n: int, *, ratings: bool) -> None:
    """n interactions (half with a rendered prompt, half with messages only), and a rating of each."""
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
            timestamp_ms=now_ms(), user_id=f"user-{i}",
        )  # fmt: skip
        key = response_id.encode()
        futures.append(producer.send(topics.interactions, key=key, value=interaction.SerializeToString()))
        if ratings:
            feedback = events_pb2.FeedbackEvent(
                event_id=f"ev-{i}", response_id=response_id, user_id=f"user-{i}", timestamp_ms=now_ms(),
                rating=chat_pb2.THUMBS_UP if i % 3 else chat_pb2.THUMBS_DOWN, model_version="v000001",
            )  # fmt: skip
            futures.append(producer.send(topics.feedback, key=key, value=feedback.SerializeToString()))
    for future in futures:
        future.get(timeout=30)
    producer.close()


def start_trainer(bootstrap: str, topics, registry: Registry, **overrides):
    """A trainer with a ratings trigger of 40, once its prompt pool holds all the traffic."""
    config = TrainerConfig(
        kafka_bootstrap=bootstrap, topic_prefix=topics.prefix, registry_dir=str(registry.root), grpc_port=0,
        consumer_group=f"trainer-{topics.prefix}", min_new_ratings=40, round_interval_s=0,
        poll_interval_s=0.2, **{"learning_rate": TINY_LEARNING_RATE, **overrides},
    )  # fmt: skip
    service = create_service(config)
    service.start()
    wait_for(lambda: service.prompts_in_pool == N_TRAFFIC, 60, "the prompt pool")
    return service


def round_events(bootstrap: str, topics) -> list[events_pb2.RoundEvent]:
    records = read_topic(bootstrap, topics.rounds, min_records=1)
    assert all(r.key == POLICY.encode() for r in records)
    return [events_pb2.RoundEvent.FromString(r.value) for r in records]


def model_events(bootstrap: str, topics, kind: int) -> list[events_pb2.ModelEvent]:
    events = [events_pb2.ModelEvent.FromString(r.value) for r in read_topic(bootstrap, topics.models)]
    return [e for e in events if e.kind == kind]


def test_a_reward_event_leads_to_a_published_version_its_model_event_and_a_passed_round_event(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path
):
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    # Two earlier rounds' versions (copies of the base): the round starts from v000003, and retention (keep 1)
    # then deletes v000002 but keeps the reference v000001 and the new version's parent v000003.
    for parent in ("v000001", "v000002"):
        registry.publish(POLICY, lambda tmp: copy_model_files(tiny_model_dir, tmp), parent_version=parent)
    # 48 ratings on the feedback topic, which the trainer must not count (the reward checkpoint says 40)
    produce_traffic(
        kafka_bootstrap, topics, AutoTokenizer.from_pretrained(tiny_model_dir), N_TRAFFIC, ratings=True
    )
    passed_before = gate_decisions("passed")
    service = start_trainer(kafka_bootstrap, topics, registry, keep_versions=1)
    try:
        assert service.reward_version is None and service.new_ratings == 0
        reward_version = announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 40)
        wait_for(lambda: service.rounds_run + service.rounds_failed > 0, 240, "a round")
    finally:
        service.stop()  # joins the loop: every event of the round is sent by now
    assert service.rounds_failed == 0 and service.gate_rejections == 0
    assert service.versions_published == 1, service.last_result.decision.reason

    version = service.last_published
    assert registry.latest(POLICY) == version == "v000004"
    assert registry.versions(POLICY) == ["v000001", "v000003", "v000004"]
    registry.verify(POLICY, version)
    manifest = registry.manifest(POLICY, version)
    assert manifest.parent_version == "v000003"
    extra = manifest.extra
    assert (extra["reward_version"], extra["reference_version"], extra["ratings_applied"]) == (
        reward_version, "v000001", 40
    )  # fmt: skip
    assert manifest.metrics["gate_passed"] == 1.0
    assert (
        manifest.metrics[RoundFigure.GATE_CANDIDATE_SCORE] > manifest.metrics[RoundFigure.GATE_SERVING_SCORE]
    )
    assert gate_decisions("passed") == passed_before + 1
    assert REGISTRY.get_sample_value("rlhf_trainer_reward_mean") == pytest.approx(
        manifest.metrics[RoundFigure.REWARD_MEAN]
    )

    (event,) = model_events(kafka_bootstrap, topics, events_pb2.POLICY)
    assert event.action == events_pb2.PUBLISHED
    assert (event.version, event.parent_version, event.path) == (version, "v000003", f"policy/{version}")
    assert event.metrics[RoundFigure.GATE_IMPROVEMENT] == pytest.approx(manifest.metrics["gate_improvement"])

    (rnd,) = round_events(kafka_bootstrap, topics)
    assert (rnd.round, rnd.name, rnd.outcome, rnd.gate_code) == (
        1,
        "round-000001",
        events_pb2.PASSED,
        "passed",
    )
    assert (rnd.start_version, rnd.published_version) == ("v000003", version)
    assert (rnd.reward_version, rnd.reference_version) == (reward_version, "v000001")
    assert rnd.ratings_applied == 40 and rnd.metrics["new_ratings"] == 40  # not 48 + 40: feedback unread
    for name in (RoundFigure.REWARD_MEAN, RoundFigure.KL_PER_RESPONSE, RoundFigure.GATE_IMPROVEMENT):
        assert rnd.metrics[name] == pytest.approx(manifest.metrics[name]), name
    assert rnd.metrics[RoundFigure.ROUND_S] >= rnd.metrics["generate_s"] > 0
    assert rnd.timestamp_ms >= event.timestamp_ms  # after the registry publish and its ModelEvent

    # nothing consumed the feedback topic in the trainer's group (it used to commit the ratings it counted)
    consumer = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=f"trainer-{topics.prefix}", enable_auto_commit=False
    )
    try:
        ids = consumer.partitions_for_topic(topics.feedback)
        assert [consumer.committed(TopicPartition(topics.feedback, p)) for p in sorted(ids)] == [None, None]
    finally:
        consumer.close()


def test_a_round_the_gate_rejects_is_a_rejected_round_event_and_publishes_nothing(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path
):
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    produce_traffic(
        kafka_bootstrap, topics, AutoTokenizer.from_pretrained(tiny_model_dir), N_TRAFFIC, ratings=False
    )
    service = start_trainer(
        kafka_bootstrap, topics, registry, gate_margin=1e6, rollouts_per_round=16, ppo_epochs=1,
        max_new_tokens=8, eval_prompts=2, eval_samples_per_prompt=2,
    )  # fmt: skip
    try:
        reward_version = announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 64)
        wait_for(lambda: service.rounds_run + service.rounds_failed > 0, 240, "a round")
    finally:
        service.stop()
    assert (service.rounds_failed, service.gate_rejections, service.versions_published) == (0, 1, 0)
    assert registry.versions(POLICY) == ["v000001"] and registry.latest(POLICY) == "v000001"
    assert model_events(kafka_bootstrap, topics, events_pb2.POLICY) == []

    (rnd,) = round_events(kafka_bootstrap, topics)
    assert (rnd.round, rnd.outcome, rnd.gate_code) == (1, events_pb2.REJECTED, "no_improvement")
    assert "does not beat serving" in rnd.gate_reason
    assert (rnd.start_version, rnd.published_version, rnd.reward_version) == ("v000001", "", reward_version)
    assert rnd.reference_version == "v000001" and rnd.ratings_applied == 64
    assert rnd.metrics["gate_passed"] == 0.0 and rnd.metrics["gate_margin"] == 1e6
    assert rnd.metrics[RoundFigure.GATE_IMPROVEMENT] == pytest.approx(
        rnd.metrics[RoundFigure.GATE_CANDIDATE_SCORE] - rnd.metrics[RoundFigure.GATE_SERVING_SCORE]
    )
    assert rnd.metrics[RoundFigure.ROUND_S] > 0 and rnd.metrics["train_s"] > 0
