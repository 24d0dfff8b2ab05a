"""The trainer's canary trial against the real broker: a passed version is published without moving LATEST
and announced by a CANARY event; scripted users' thumbs on `rlhf.feedback` then promote it (LATEST moves,
PROMOTED) or roll it back (LATEST stays, ROLLED_BACK naming the stable version), with a CanaryDecision on
`rlhf.canary`, and no call of Rollback. Ratings accepted before the trial are not counted."""

import math
import threading

import pytest
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from rlhf_online.bootstrap import ensure_initial_policy
from rlhf_online.broker.clients import make_producer, read_topic
from rlhf_online.contract import CANARY_SHARE, POLICY, now_ms
from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2
from rlhf_online.registry import Registry
from rlhf_online.trainer.config import TrainerConfig
from tests.test_trainer_kafka import (
    N_TRAFFIC,
    announce_reward_checkpoint,
    model_events,
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    produce_traffic,
    start_trainer,
    wait_for,
)

pytestmark = pytest.mark.kafka

SMALL_ROUND = dict(
    rollouts_per_round=16, minibatch_size=8, ppo_epochs=1, max_new_tokens=8, eval_prompts=2,
    eval_samples_per_prompt=2, gate_margin=-1e6,  # every candidate passes: the users decide
    canary_share=0.2, canary_min_ratings=20, canary_margin=0.1, canary_max_ratings=400,
    canary_train_during_trial=False,  # one trial at a time; the test below trains during one
)  # fmt: skip


def scripted_thumbs(rate: float, n: int) -> list[bool]:
    """n thumbs with exactly floor(k * rate) ups among the first k, for every k (deterministic)."""
    return [math.floor((i + 1) * rate) > math.floor(i * rate) for i in range(n)]


def produce_ratings(bootstrap: str, topics, rates: dict[str, float], n: int) -> None:
    """n ratings of each version, interleaved, with the scripted thumbs-up rate of each."""
    producer = make_producer(bootstrap, client_id="test-canary-users")
    thumbs = {version: scripted_thumbs(rate, n) for version, rate in rates.items()}
    futures = []
    for i in range(n):
        for version, ups in thumbs.items():
            response_id = f"{version}-resp-{i}"
            event = events_pb2.FeedbackEvent(
                event_id=f"{version}-ev-{i}", response_id=response_id, user_id=f"{version}-user-{i}",
                rating=chat_pb2.THUMBS_UP if ups[i] else chat_pb2.THUMBS_DOWN, timestamp_ms=now_ms(),
                model_version=version,
            )  # fmt: skip
            futures.append(
                producer.send(topics.feedback, key=response_id.encode(), value=event.SerializeToString())
            )
    for future in futures:
        future.get(timeout=30)
    producer.close()


def decisions_counted(outcome: str) -> float:
    total = 0.0
    for code in ("non_inferior", "inferior", "timed_out_ratings", "timed_out_seconds"):
        labels = {"outcome": outcome, "code": code}
        total += REGISTRY.get_sample_value("rlhf_trainer_canary_decisions_total", labels) or 0.0
    return total


@pytest.mark.parametrize(
    ("canary_rate", "stable_rate", "outcome"),
    [(0.8, 0.3, events_pb2.CANARY_PROMOTED), (0.2, 0.7, events_pb2.CANARY_ROLLED_BACK)],
    ids=["liked-more-is-promoted", "liked-less-is-rolled-back"],
)
def test_the_users_thumbs_promote_or_roll_back_the_canary(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path, canary_rate, stable_rate, outcome
):
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    # 48 ratings of v000001 before the trial: never counted in it
    produce_traffic(
        kafka_bootstrap, topics, AutoTokenizer.from_pretrained(tiny_model_dir), N_TRAFFIC, ratings=True
    )
    promoted = outcome == events_pb2.CANARY_PROMOTED
    counted_before = decisions_counted("promote" if promoted else "roll_back")
    service = start_trainer(kafka_bootstrap, topics, registry, **SMALL_ROUND)
    try:
        announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 40)
        wait_for(lambda: service.rounds_run or service.rounds_failed, 240, "a round")
        assert service.trial_running and service.last_published == "v000002"
        assert registry.latest(POLICY) == "v000001"  # a canary does not move LATEST
        assert service.run_round_now("asked") is None  # no round while the trial runs
        produce_ratings(kafka_bootstrap, topics, {"v000002": canary_rate, "v000001": stable_rate}, 200)
        wait_for(lambda: service.canary.decisions, 120, "the trial's decision")
    finally:
        service.stop()

    (decision,) = service.canary.decisions
    assert decision.code == ("non_inferior" if promoted else "inferior"), decision.reason
    assert registry.latest(POLICY) == ("v000002" if promoted else "v000001")
    assert decisions_counted("promote" if promoted else "roll_back") == counted_before + 1

    (record,) = read_topic(kafka_bootstrap, topics.canary, min_records=1)
    assert record.key == POLICY.encode()
    event = events_pb2.CanaryDecision.FromString(record.value)
    assert (event.stable_version, event.canary_version, event.outcome) == ("v000001", "v000002", outcome)
    assert event.code == decision.code and event.reason == decision.reason
    assert 20 <= event.canary_ratings <= 200 and 20 <= event.stable_ratings <= 200  # the 48 earlier: not in
    assert event.canary_rate == pytest.approx(event.canary_ups / event.canary_ratings)
    assert (event.lower > -0.1) if promoted else (event.upper < 0.0)
    assert (event.alpha, event.margin, event.canary_share) == pytest.approx((0.05, 0.1, 0.2))
    assert event.timestamp_ms >= event.started_ms > 0

    policy_events = model_events(kafka_bootstrap, topics, events_pb2.POLICY)
    assert [(e.action, e.version) for e in policy_events] == [
        (events_pb2.CANARY, "v000002"),
        (events_pb2.PROMOTED, "v000002") if promoted else (events_pb2.ROLLED_BACK, "v000001"),
    ]
    start = policy_events[0]
    assert start.parent_version == "v000001" and start.metrics[CANARY_SHARE] == pytest.approx(0.2)


@pytest.mark.parametrize("promoted", [True, False], ids=["promoted-then-next-canary", "rolled-back-dropped"])
def test_a_round_during_a_trial_trains_from_the_canary_and_waits_for_the_decision(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path, promoted
):
    """The trainer does not idle through a trial: the next round starts from the canary, and its candidate
    becomes the next canary once the canary is promoted, or goes with it when it is rolled back."""
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    produce_traffic(
        kafka_bootstrap, topics, AutoTokenizer.from_pretrained(tiny_model_dir), N_TRAFFIC, ratings=True
    )
    service = start_trainer(
        kafka_bootstrap, topics, registry, **{**SMALL_ROUND, "canary_train_during_trial": True}
    )
    try:
        announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 40)
        wait_for(lambda: service.trial_running, 240, "the first canary")
        announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 80)  # 40 more ratings
        wait_for(lambda: service._pending is not None, 240, "a candidate trained from the canary")
        assert service._pending.record.start_version == "v000002" and service.trial_running
        assert service.last_published == "v000002"  # it waits: one trial at a time
        rates = {"v000002": 0.8, "v000001": 0.3} if promoted else {"v000002": 0.2, "v000001": 0.7}
        produce_ratings(kafka_bootstrap, topics, rates, 200)
        wait_for(lambda: service.canary.decisions and service._pending is None, 120, "the decision")
    finally:
        service.stop()
    actions = [
        (e.action, e.version, e.parent_version)
        for e in model_events(kafka_bootstrap, topics, events_pb2.POLICY)
    ]
    if promoted:
        assert actions == [
            (events_pb2.CANARY, "v000002", "v000001"),
            (events_pb2.PROMOTED, "v000002", "v000001"),
            (events_pb2.CANARY, "v000003", "v000002"),  # the waiting candidate, against its parent
        ]
        assert registry.manifest(POLICY, "v000003").parent_version == "v000002"
    else:
        assert actions == [
            (events_pb2.CANARY, "v000002", "v000001"),
            (events_pb2.ROLLED_BACK, "v000001", ""),
        ]
        assert registry.versions(POLICY) == ["v000001", "v000002"]  # the candidate was never published
    assert registry.latest(POLICY) == ("v000002" if promoted else "v000001")


def test_a_draining_trainer_lets_the_open_trial_decide_and_starts_nothing_new(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path
):
    """What the demo does at its end (SIGUSR1 in serve-trainer): no trial is left open, none is started."""
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    produce_traffic(
        kafka_bootstrap, topics, AutoTokenizer.from_pretrained(tiny_model_dir), N_TRAFFIC, ratings=True
    )
    pipelined = {**SMALL_ROUND, "canary_train_during_trial": True}
    service = start_trainer(kafka_bootstrap, topics, registry, **pipelined)
    drained = threading.Event()
    try:
        announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 40)
        wait_for(lambda: service.trial_running, 240, "the canary")
        service.drain(then=drained.set)
        announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 80)  # would trigger
        assert not drained.is_set()  # the trial is still open
        produce_ratings(kafka_bootstrap, topics, {"v000002": 0.8, "v000001": 0.3}, 200)
        wait_for(drained.is_set, 120, "the drain")
        assert service.run_round_now("asked") is None  # drained: nothing starts
    finally:
        service.stop()
    assert [d.outcome for d in service.canary.decisions] == ["promote"] and not service.trial_running
    assert service.rounds_run == 1 and registry.versions(POLICY) == ["v000001", "v000002"]
    actions = [e.action for e in model_events(kafka_bootstrap, topics, events_pb2.POLICY)]
    assert actions == [events_pb2.CANARY, events_pb2.PROMOTED]


def test_a_drain_times_out_a_trial_that_does_not_decide(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    """--drain-trial-timeout-s: no rating comes, so the open trial times out (rolled back); the drain ends."""
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    produce_traffic(
        kafka_bootstrap, topics, AutoTokenizer.from_pretrained(tiny_model_dir), N_TRAFFIC, ratings=True
    )
    service = start_trainer(kafka_bootstrap, topics, registry, **SMALL_ROUND, drain_trial_timeout_s=1.0)
    drained = threading.Event()
    try:
        announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 40)
        wait_for(lambda: service.trial_running, 240, "the canary")
        service.drain(then=drained.set)
        wait_for(drained.is_set, 60, "the drain")
    finally:
        service.stop()
    (decision,) = service.canary.decisions
    assert (decision.outcome, decision.code) == ("roll_back", "timed_out_seconds")
    assert registry.latest(POLICY) == "v000001"


def test_a_trainer_restarted_during_a_trial_carries_it_on(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    produce_traffic(
        kafka_bootstrap, topics, AutoTokenizer.from_pretrained(tiny_model_dir), N_TRAFFIC, ratings=True
    )
    first = start_trainer(kafka_bootstrap, topics, registry, **SMALL_ROUND)
    try:
        announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 40)
        wait_for(lambda: first.rounds_run or first.rounds_failed, 240, "a round")
        assert first.trial_running
    finally:
        first.stop()  # or killed: the trial lives on in the events, not in the process
    produce_ratings(kafka_bootstrap, topics, {"v000002": 0.8, "v000001": 0.3}, 15)  # read by the next one

    second = start_trainer(kafka_bootstrap, topics, registry, **SMALL_ROUND)
    try:
        assert second.trial_running and second.canary.trial.canary_version == "v000002"
        assert second.run_round_now("asked") is None  # no round while the resumed trial runs
        produce_ratings(kafka_bootstrap, topics, {"v000002": 0.8, "v000001": 0.3}, 200)
        wait_for(lambda: second.canary.decisions, 120, "the resumed trial's decision")
    finally:
        second.stop()
    (decision,) = second.canary.decisions
    assert decision.outcome == "promote" and registry.latest(POLICY) == "v000002"
    (record,) = read_topic(kafka_bootstrap, topics.canary, min_records=1)
    event = events_pb2.CanaryDecision.FromString(record.value)
    assert event.canary_ratings >= 20  # the 15 rated before the restart may count, each once
    actions = [e.action for e in model_events(kafka_bootstrap, topics, events_pb2.POLICY)]
    assert actions == [events_pb2.CANARY, events_pb2.PROMOTED]  # the restart announced nothing


def test_a_canary_share_needs_kafka(tmp_path):
    from rlhf_online.trainer.service import create_service

    service = create_service(
        TrainerConfig(kafka_bootstrap="", registry_dir=str(tmp_path), canary_share=0.1, grpc_port=0)
    )
    with pytest.raises(ValueError, match="--canary-share needs --kafka-bootstrap"):
        service.start()


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"canary_share": 1.0}, "canary_share must be in"), ({"canary_alpha": 0.0}, "bad --canary-\\* setting")],
)
def test_bad_canary_settings_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**setting)
