"""A bug the fault matrix found (scenario 2): after a broker outage longer than the delivery timeout, an
idempotent kafka-python producer reset its producer id and then never sent again. `make_producer` works around
it (broker/clients.py); here the reset is triggered directly, on the real broker."""

import pytest

from rlhf_online.broker.clients import make_producer, read_topic

pytestmark = pytest.mark.kafka


def test_a_producer_sends_again_after_its_producer_id_was_reset(kafka_bootstrap, topics):
    producer = make_producer(kafka_bootstrap, client_id="test-producer-reset")
    try:
        producer.send(topics.feedback, key=b"before", value=b"1").get(timeout=30)
        # What the sender does when a batch it had sent expires (sender.py, needs_transaction_state_reset).
        producer._transaction_manager.reset_producer_id()
        producer.send(topics.feedback, key=b"after", value=b"2").get(
            timeout=30
        )  # hung forever before the fix
    finally:
        producer.close(timeout=5)
    assert [r.key for r in read_topic(kafka_bootstrap, topics.feedback, min_records=2)].count(b"after") == 1
