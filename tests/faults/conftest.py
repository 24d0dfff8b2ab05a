"""Fixtures of the fault matrix: a cluster of service processes on the shared test broker (`cluster`), and
one on a broker of the matrix's own (`own_cluster`) for the scenarios that kill or pause the broker."""

import os
import signal
import uuid

import pytest

from rlhf_online.broker.clients import ensure_topics
from rlhf_online.broker.local import broker_status
from rlhf_online.topics import Topics
from tests.faults.cluster import Cluster, OwnBroker


@pytest.fixture
def cluster(kafka_bootstrap, topics, tmp_path, tiny_model_dir):
    """Service processes on the shared test broker, with the test's own topics and registry."""
    processes = Cluster(kafka_bootstrap, topics, tmp_path, tiny_model_dir)
    yield processes
    processes.close()


@pytest.fixture(scope="package")
def own_broker(tmp_path_factory):
    """A broker on free ports with a home of its own; never the shared test broker at 19192."""
    broker = OwnBroker(tmp_path_factory.mktemp("faults-kafka"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def own_cluster(own_broker, tmp_path, tiny_model_dir):
    """Service processes on `own_broker` (running again, and not paused, whatever the last test did)."""
    status = broker_status(own_broker.home)
    if status.running:
        os.kill(status.pid, signal.SIGCONT)
    else:
        own_broker.start()
    topics = Topics(prefix=f"f{uuid.uuid4().hex[:10]}")
    ensure_topics(own_broker.bootstrap, topics, partitions=2)
    processes = Cluster(own_broker.bootstrap, topics, tmp_path, tiny_model_dir)
    yield processes
    processes.close()
