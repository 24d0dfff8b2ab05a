"""Kill-and-restart of `rlhf-online serve-reward` against the real broker (promise 2): SIGKILL mid-stream
after a checkpoint, restart, and the final checkpoint has applied every rating once: none lost, none twice."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_online.broker.clients import make_producer
from rlhf_online.registry import Registry
from rlhf_online.reward import checkpoint
from rlhf_online.reward.synthetic import synthetic_examples, to_events

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parent.parent


def start(kafka_bootstrap, topics, registry_dir, tiny_model_dir, log_path) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "rlhf_online.cli", "serve-reward",
        "--kafka-bootstrap", kafka_bootstrap, "--topic-prefix", topics.prefix,
        "--registry-dir", str(registry_dir), "--base-model-dir", str(tiny_model_dir),
        "--grpc-port", "0", "--metrics-port", "-1", "--torch-threads", "1", "--max-length", "64",
        "--update-every-examples", "8", "--checkpoint-every-updates", "3", "--checkpoint-interval-s", "1",
        "--eval-every-updates", "1000", "--keep-versions", "0",
    ]  # fmt: skip
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process by the caller
    return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(
                f"serve-reward exited with {proc.returncode} while waiting for {what}:\n{tail(log_path)}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{tail(log_path)}")
        time.sleep(0.2)


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def applied(registry: Registry) -> list[str]:
    latest = registry.latest("reward")
    return [] if latest is None else checkpoint.applied_event_ids(registry.verify("reward", latest))


def test_sigkill_mid_stream_loses_no_rating_and_applies_none_twice(
    kafka_bootstrap, topics, tmp_path, tiny_model_dir
):
    registry = Registry(tmp_path / "registry")
    log_path = tmp_path / "serve-reward.log"
    first, second = synthetic_examples(240, seed=7), synthetic_examples(60, seed=8, prefix="after")
    producer = make_producer(kafka_bootstrap, client_id="test-reward-restart")

    def produce(examples, duplicate_every: int = 0) -> None:
        for i, ex in enumerate(examples):
            interaction, feedback = to_events(ex)
            producer.send(
                topics.interactions, key=ex.response_id.encode(), value=interaction.SerializeToString()
            )
            producer.send(topics.feedback, key=ex.response_id.encode(), value=feedback.SerializeToString())
            if duplicate_every and i % duplicate_every == 0:  # a client retry: the same event_id again
                producer.send(
                    topics.feedback, key=ex.response_id.encode(), value=feedback.SerializeToString()
                )
        producer.flush()

    produce(first, duplicate_every=10)
    proc = start(kafka_bootstrap, topics, registry.root, tiny_model_dir, log_path)
    try:
        # 1. Kill it as soon as a checkpoint exists, while it is still working through the stream.
        wait_for(lambda: registry.latest("reward") is not None, 120, "a first checkpoint", proc, log_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        at_kill = applied(registry)
        assert 0 < len(at_kill) < len(first), "the kill was meant to land mid-stream"

        # 2. More ratings (and replays of applied ones) arrive while it is down; then it comes back.
        produce(second)
        produce(first[:20])
        proc = start(kafka_bootstrap, topics, registry.root, tiny_model_dir, log_path)
        expected = sorted(ex.event_id for ex in first + second)
        wait_for(lambda: len(applied(registry)) >= len(expected), 120, "every rating applied", proc, log_path)

        # 3. SIGTERM: final checkpoint, commit, exit 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, tail(log_path)
    finally:
        producer.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    ids = applied(registry)
    assert len(ids) == len(set(ids)), "an event_id was applied twice"
    assert sorted(ids) == expected, "a rating was lost"
    for version in registry.versions(
        "reward"
    ):  # every version verifies: nothing partial was left by the kill
        registry.verify("reward", version)
    assert b"published reward" in log_path.read_bytes()
