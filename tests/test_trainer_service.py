"""The trainer service without Kafka: triggers and prompt split (pure), resuming the ratings count from the
registry, health over a real channel, a stop or a rollback in the middle of a round that publishes nothing
but an ABANDONED RoundEvent, failed rounds' RoundEvents (and a RoundEvent the broker refuses, which the loop
survives), and `rlhf-online serve-trainer` exiting 0 on SIGTERM. Events go to an in-memory producer here;
tests/test_trainer_kafka.py covers the real broker."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from rlhf_online.bootstrap import copy_model_files, ensure_initial_policy
from rlhf_online.config import parse_config
from rlhf_online.contract import RewardFigure, RoundFigure, round_event_key
from rlhf_online.engine.tiny_model import TINY_LEARNING_RATE
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import Registry
from rlhf_online.topics import Topics
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.publish import Publisher
from rlhf_online.trainer.service import create_service, read_prompt_file
from rlhf_online.trainer.triggers import RoundTrigger, prompt_hash, split_prompts

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


class _Sent:
    def get(self, timeout=None):
        return None


class MemoryProducer:
    """Stands in for a KafkaProducer: keeps what was sent; the first `failures` sends raise instead."""

    def __init__(self, failures: int = 0) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.failures = failures

    def send(self, topic, key, value):
        if self.failures:
            self.failures -= 1
            raise OSError("the broker went away")
        self.sent.append((topic, key, value))
        return _Sent()

    def round_events(self, topics: Topics) -> list[events_pb2.RoundEvent]:
        assert all(key == round_event_key() for topic, key, _ in self.sent if topic == topics.rounds)
        return [events_pb2.RoundEvent.FromString(v) for topic, _, v in self.sent if topic == topics.rounds]


TEST_TOPICS = Topics("test")


def test_trigger_needs_ratings_or_interval_and_a_newer_reward():
    trigger = RoundTrigger(min_new_ratings=10, interval_s=60.0)
    check = trigger.check
    assert (
        check(new_ratings=50, seconds_since_last_round=0, reward_version=None, last_reward_version=None)
        is None
    )
    assert "ratings" in check(new_ratings=10, seconds_since_last_round=0, reward_version="v000001",
                              last_reward_version=None)  # fmt: skip
    assert check(new_ratings=9, seconds_since_last_round=59, reward_version="v000002",
                 last_reward_version="v000001") is None  # fmt: skip
    reason = check(new_ratings=0, seconds_since_last_round=61, reward_version="v000002",
                   last_reward_version="v000001")  # fmt: skip
    assert "since the last round" in reason
    # the same (or an older, rolled back) reward model does not start a round
    for last in ("v000002", "v000003"):
        assert check(new_ratings=99, seconds_since_last_round=999, reward_version="v000002",
                     last_reward_version=last) is None  # fmt: skip
    relaxed = RoundTrigger(min_new_ratings=10, interval_s=0, require_new_reward=False)
    assert relaxed.check(new_ratings=10, seconds_since_last_round=0, reward_version="v000002",
                         last_reward_version="v000002")  # fmt: skip


def test_split_is_stable_and_never_trains_on_heldout_prompts():
    prompts = [f"prompt {i}" for i in range(50)] + ["prompt 1"] * 5
    train, heldout = split_prompts(prompts, heldout_fraction=0.2, n_eval=4)
    again_train, again_heldout = split_prompts(list(reversed(prompts)), heldout_fraction=0.2, n_eval=4)
    assert heldout == again_heldout and sorted(train) == sorted(again_train)
    assert 1 <= len(heldout) <= 4 and not set(heldout) & set(train)
    assert split_prompts(["a", "b"], heldout_fraction=0.01, n_eval=4)[1]  # something is always held out
    with pytest.raises(ValueError, match="at least 2 distinct prompts"):
        split_prompts(["same", "same"], heldout_fraction=0.2, n_eval=4)


def test_config_validation_says_what_to_change():
    with pytest.raises(ValueError, match="minibatch-size"):
        TrainerConfig(rollouts_per_round=8, minibatch_size=16)
    with pytest.raises(ValueError, match="kl_estimator"):
        TrainerConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="no round ever runs"):
        TrainerConfig(min_new_ratings=0, round_interval_s=0)
    config = parse_config(TrainerConfig, ["--train-mode", "lora"], {"RLHF_MIN_NEW_RATINGS": "7"})
    assert config.train_mode == "lora" and config.min_new_ratings == 7


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The service sets torch's thread count (default 1) for the whole process; put it back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def registry_with_models(tiny_model_dir, tmp_path):
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    registry.publish("reward", lambda tmp: (tmp / "weights.txt").write_text("in-test reward"))
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(f"Tell me about topic number {i}." for i in range(20)) + "\n")
    return registry, prompt_file


def test_health_serves_and_a_stop_during_a_round_publishes_nothing(registry_with_models):
    registry, prompt_file = registry_with_models
    assert len(read_prompt_file(prompt_file)) == 20
    config = TrainerConfig(
        kafka_bootstrap="", registry_dir=str(registry.root), prompt_file=str(prompt_file), grpc_port=0,
        min_new_ratings=0, round_interval_s=0.01, poll_interval_s=0.05, rollouts_per_round=16,
        max_new_tokens=8,
    )  # fmt: skip
    in_round = threading.Event()
    service = None

    def reward_loader(path, device):
        def reward_fn(prompts, responses):
            in_round.set()
            wait_for(
                lambda: service.stopping, 60, "the stop"
            )  # the round is held here until stop() is called
            return torch.zeros(len(responses))

        return reward_fn

    producer = MemoryProducer()
    service = create_service(config, reward_loader=reward_loader, publisher=Publisher(producer, TEST_TOPICS))
    service.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert (
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            assert in_round.wait(60), "no round started"
    finally:
        service.stop()
    assert registry.versions("policy") == ["v000001"] and registry.latest("policy") == "v000001"
    assert service.versions_published == 0 and service.rounds_run == 0 and service.rounds_failed == 0
    leftovers = [p.name for p in (registry.root / "policy").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
    assert service.rounds_abandoned == 1
    assert [topic for topic, _, _ in producer.sent] == [TEST_TOPICS.rounds]  # no ModelEvent
    (event,) = producer.round_events(TEST_TOPICS)
    assert (event.round, event.name, event.outcome) == (1, "round-000001", events_pb2.ABANDONED)
    assert (event.start_version, event.published_version, event.reward_version) == ("v000001", "", "v000001")
    assert event.reference_version == "v000001" and event.gate_code == "abandoned"
    assert "stopped before rollouts" in event.gate_reason


def vowel_reward(prompts, responses):
    return torch.tensor([10.0 * sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses])


def test_a_rollback_during_a_round_drops_the_candidate(registry_with_models, tiny_model_dir):
    registry, prompt_file = registry_with_models
    registry.publish("policy", lambda tmp: copy_model_files(tiny_model_dir, tmp), parent_version="v000001")
    config = TrainerConfig(
        kafka_bootstrap="", registry_dir=str(registry.root), prompt_file=str(prompt_file), grpc_port=0,
        min_new_ratings=0, round_interval_s=0.01, poll_interval_s=0.05, rollouts_per_round=32,
    )  # fmt: skip
    loads = []
    service = None

    def reward_loader(path, device):
        loads.append(path)
        first_round = len(loads) == 1

        def reward_fn(prompts, responses):
            if first_round:
                registry.set_latest("policy", "v000001")  # an operator's Rollback while the round trains
                return vowel_reward(prompts, responses)
            wait_for(lambda: service.stopping, 60, "the stop")  # hold the next round until stop()
            return torch.zeros(len(responses))

        return reward_fn

    producer = MemoryProducer()
    service = create_service(config, reward_loader=reward_loader, publisher=Publisher(producer, TEST_TOPICS))
    service.start()
    try:
        wait_for(lambda: len(loads) >= 2, 120, "the round after the dropped one")
    finally:
        service.stop()
    assert service.gate_rejections == 0 and service.rounds_run == 0
    assert registry.versions("policy") == ["v000001", "v000002"]
    assert registry.latest("policy") == "v000001"
    assert service.versions_published == 0
    dropped, stopped = producer.round_events(TEST_TOPICS)
    assert (dropped.round, dropped.outcome, dropped.start_version) == (1, events_pb2.ABANDONED, "v000002")
    assert dropped.gate_reason == "serving moved from v000002 to v000001 during the round"
    assert (stopped.round, stopped.outcome, stopped.start_version) == (2, events_pb2.ABANDONED, "v000001")


@pytest.mark.parametrize("in_manifest", [True, False], ids=["policy-manifest", "reward-manifest"])
def test_new_ratings_resume_from_what_the_reward_checkpoints_applied(tiny_model_dir, tmp_path, in_manifest):
    # The serving version was trained with reward v000001 (20 ratings applied); v000002 has applied 50.
    # Its manifest says 20 itself (the trainer writes that), or the reward manifest does (older versions).
    registry = Registry(tmp_path / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    for applied in (20, 50):
        registry.publish("reward", lambda tmp: (tmp / "w.txt").write_text("r"),
                         metrics={RewardFigure.RATINGS_APPLIED: applied})  # fmt: skip
    extra = {"reward_version": "v000001", **({"ratings_applied": 20} if in_manifest else {})}
    registry.publish("policy", lambda tmp: copy_model_files(tiny_model_dir, tmp), parent_version="v000001",
                     extra=extra)  # fmt: skip
    config = TrainerConfig(
        kafka_bootstrap="", registry_dir=str(registry.root), grpc_port=0, min_new_ratings=31,
        round_interval_s=0,
    )  # fmt: skip
    service = create_service(config)
    service.start()
    try:
        assert (service.reward_version, service.new_ratings) == ("v000002", 30)  # one short of a round
    finally:
        service.stop()
    assert service.rounds_run + service.rounds_failed + service.rounds_abandoned == 0


def round_event_failures() -> float:
    return REGISTRY.get_sample_value("rlhf_trainer_round_event_failures_total") or 0.0


def test_failed_rounds_are_events_and_a_refused_event_does_not_stop_the_loop(registry_with_models):
    registry, prompt_file = registry_with_models
    config = TrainerConfig(
        kafka_bootstrap="", registry_dir=str(registry.root), prompt_file=str(prompt_file), grpc_port=0,
        min_new_ratings=0, round_interval_s=0.01, poll_interval_s=0.05,
    )  # fmt: skip

    def reward_loader(path, device):
        raise OSError(f"cannot read the reward model in {path.name}")

    producer = MemoryProducer(failures=1)  # the first RoundEvent is refused
    failures_before = round_event_failures()
    service = create_service(config, reward_loader=reward_loader, publisher=Publisher(producer, TEST_TOPICS))
    service.start()
    try:
        wait_for(lambda: len(producer.round_events(TEST_TOPICS)) >= 2, 120, "two RoundEvents")
    finally:
        service.stop()
    assert round_event_failures() == failures_before + 1
    assert service.rounds_failed >= 3 and service.rounds_run == 0
    second, third = producer.round_events(TEST_TOPICS)[:2]
    assert (second.round, third.round) == (2, 3)
    assert (second.outcome, second.gate_code) == (events_pb2.FAILED, "error")
    assert second.gate_reason == "OSError: cannot read the reward model in v000001"
    assert (second.start_version, second.reward_version, second.reference_version) == ("v000001",) * 3
    assert second.published_version == "" and second.metrics["round_s"] >= 0
    assert registry.versions("policy") == ["v000001"]


def test_serve_trainer_exits_0_on_sigterm(tiny_model_dir, tmp_path):
    command = [
        sys.executable, "-m", "rlhf_online.cli", "serve-trainer", "--kafka-bootstrap", "",
        "--registry-dir", str(tmp_path / "registry"), "--base-model-dir", str(tiny_model_dir),
        "--grpc-port", "0", "--metrics-port", "0", "--round-interval-s", "3600",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        lines = []
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            lines.append(line)
            if "trainer started" in line or time.monotonic() > deadline:
                break
        assert any("trainer started" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "trainer stopped" in rest
    assert Registry(tmp_path / "registry").latest("policy") == "v000001"  # it bootstrapped the base model


def test_the_gate_keeps_its_prompts_while_the_pool_changes(tmp_path):
    """Once the gate has its --eval-prompts held-out prompts it keeps them, so rounds compare alike and a
    round re-scores the serving version's answers; a prompt of lower hash arriving later does not join."""
    service = create_service(
        TrainerConfig(kafka_bootstrap="", registry_dir=str(tmp_path), grpc_port=0, eval_prompts=3)
    )
    heldout = sorted((f"prompt {i}" for i in range(400)), key=prompt_hash)
    heldout = [p for p in heldout if prompt_hash(p) < 0.2]
    first = service._eval_set(heldout[3:5])  # the pool so far holds two of them
    assert first == heldout[3:5]
    second = service._eval_set(heldout[:4])  # later: lower hashes arrive, one of the first two left
    assert second == [*heldout[3:5], heldout[0]]
    assert service._eval_set(heldout[:2]) == second  # full: fixed from now on


@pytest.mark.parametrize("keep_rejected", [True, False], ids=["kept", "dropped"])
def test_a_candidate_the_gate_rejects_is_where_the_next_round_starts(registry_with_models, keep_rejected):
    """Steps smaller than the gate's noise add up (--keep-rejected): the second round trains on from the
    first's candidate, and its gate still compares with the serving version, not with that candidate."""
    registry, prompt_file = registry_with_models
    config = TrainerConfig(
        kafka_bootstrap="", registry_dir=str(registry.root), prompt_file=str(prompt_file), grpc_port=0,
        min_new_ratings=0, round_interval_s=0.01, poll_interval_s=0.05, rollouts_per_round=16,
        max_new_tokens=8, eval_prompts=2, learning_rate=TINY_LEARNING_RATE, gate_margin=1e6,
        keep_rejected=keep_rejected, require_new_reward=False,
    )  # fmt: skip
    producer = MemoryProducer()
    service = create_service(
        config, reward_loader=lambda path, device: vowel_reward, publisher=Publisher(producer, TEST_TOPICS)
    )
    service.start()
    try:
        wait_for(lambda: service.rounds_run >= 2, 240, "two rounds")
    finally:
        service.stop()
    first, second = producer.round_events(TEST_TOPICS)[:2]
    assert [e.gate_code for e in (first, second)] == ["no_improvement"] * 2
    assert registry.versions("policy") == ["v000001"]
    serving = RoundFigure.GATE_SERVING_SCORE
    assert second.metrics[serving] == first.metrics[serving]  # the same v000001, prompts and seed
    # the second round's rollouts come from the policy it starts from: v000001 is the reference itself
    rollout_kl = second.metrics[RoundFigure.KL_PER_RESPONSE]
    assert (rollout_kl > 0.05) if keep_rejected else (rollout_kl == 0.0)
