"""Shared fixtures: the local Kafka broker (`kafka_bootstrap`), fresh topics per test (`topics`) and a tiny
model (`tiny_model_dir`).

The test broker lives in .rlhf/kafka-test on ports 19192/19193, apart from the dev broker (.rlhf/kafka,
19092/19093), so tests never touch a running demo. A test broker that is already running (say, started by hand
with `rlhf-online kafka start --kafka-home .rlhf/kafka-test --kafka-port 19192 --kafka-controller-port 19193`
to save its start-up across runs) is reused and left running; otherwise the session starts one on a freshly
formatted home and stops it at the end.
"""

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from kafka.admin import KafkaAdminClient

from rlhf_online.broker.clients import ensure_topics, wait_for_broker
from rlhf_online.broker.local import broker_status, start_broker, stop_broker
from rlhf_online.topics import Topics

# Two threads on a 2-core machine shared with a broker and servers run ~10x slower than one.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
KAFKA_TEST_HOME = REPO / ".rlhf" / "kafka-test"
# RLHF_TEST_KAFKA_PORT moves the test broker (and its controller, the port above it), so a second checkout can
# run its suite beside this one.
KAFKA_TEST_PORT = int(os.environ.get("RLHF_TEST_KAFKA_PORT", "19192"))
KAFKA_TEST_CONTROLLER_PORT = KAFKA_TEST_PORT + 1


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """Bootstrap address of the test broker, started for this session unless it already runs."""
    status = broker_status(KAFKA_TEST_HOME)
    if status.running and status.bootstrap:
        wait_for_broker(status.bootstrap, timeout_s=60)
        yield status.bootstrap
        return
    # Not running: start from empty storage, so topics of earlier sessions do not pile up.
    shutil.rmtree(KAFKA_TEST_HOME / "data", ignore_errors=True)
    bootstrap = start_broker(
        KAFKA_TEST_HOME, port=KAFKA_TEST_PORT, controller_port=KAFKA_TEST_CONTROLLER_PORT, partitions=2
    )
    try:
        yield bootstrap
    finally:
        stop_broker(KAFKA_TEST_HOME)


@pytest.fixture
def topics(kafka_bootstrap):
    """A `Topics` with a prefix of its own, created with 2 partitions for interactions and feedback."""
    t = Topics(prefix=f"t{uuid.uuid4().hex[:10]}")
    ensure_topics(kafka_bootstrap, t, partitions=2)
    yield t
    # Best effort: keeps a long session's broker small; a failure here must not fail the test.
    with contextlib.suppress(Exception), KafkaAdminClient(bootstrap_servers=kafka_bootstrap) as admin:
        admin.delete_topics(t.all(), raise_errors=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny randomly initialised LlamaForCausalLM and its character-level tokenizer (seed 0)."""
    from rlhf_online.engine.tiny_model import write_tiny_model

    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path, seed=0)
    return path
