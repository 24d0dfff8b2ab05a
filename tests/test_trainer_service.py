"""The trainer service without Kafka: triggers and prompt split (pure), health over a real channel, a stop
in the middle of a round that publishes nothing, and `rlhf-online serve-trainer` exiting 0 on SIGTERM."""

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

from rlhf_online.bootstrap import copy_model_files, ensure_initial_policy
from rlhf_online.config import parse_config
from rlhf_online.registry import Registry
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.service import create_service, read_prompt_file
from rlhf_online.trainer.triggers import RoundTrigger, split_prompts

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


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

    service = create_service(config, reward_loader=reward_loader)
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

    service = create_service(config, reward_loader=reward_loader)
    service.start()
    try:
        wait_for(lambda: len(loads) >= 2, 120, "the round after the dropped one")
    finally:
        service.stop()
    assert service.gate_rejections == 0 and service.rounds_run == 0
    assert registry.versions("policy") == ["v000001", "v000002"]
    assert registry.latest("policy") == "v000001"
    assert service.versions_published == 0


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
