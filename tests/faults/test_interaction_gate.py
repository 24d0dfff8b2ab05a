"""The fix of fault scenario 1, part by part: a rating of an answer is stored and acknowledged only once the
answer's Interaction is acknowledged by the broker (events.py `wait_background`, chat.py `_store`).

The outbox with a producer whose acks the test gives by hand, SubmitFeedback through a real gRPC channel over
an in-memory events fake that holds Interactions, and `KafkaEvents` against the real broker.
"""

import asyncio
import threading
import types

import grpc
import pytest
from kafka.future import Future

from rlhf_online.broker.clients import read_topic
from rlhf_online.inference.chat import ChatService
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.events import KafkaEvents, MemoryEvents, Outbox, PublishError, Record
from rlhf_online.inference.signing import ResponseSigner
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from rlhf_online.topics import Topics

TOPICS = Topics("gate")


class HeldProducer:
    """A producer stand-in whose send futures stay pending until the test resolves them; `stuck` keeps the
    outbox thread inside its first send until set."""

    def __init__(self, stuck: threading.Event | None = None) -> None:
        self.futures: list[Future] = []
        self.sent = threading.Event()
        self.stuck = stuck

    def send(self, topic, key, value) -> Future:
        self.futures.append(Future())
        self.sent.set()
        if self.stuck is not None:
            self.stuck.wait(10)
        return self.futures[-1]

    def close(self, timeout=None) -> None:
        pass


def test_outbox_calls_back_once_the_record_is_acknowledged():
    producer = HeldProducer()
    outbox = Outbox(producer, max_records=10)
    outbox.put(Record("t", b"answer-1", b"v"))
    calls: list = []
    assert outbox.when_acked("t", b"answer-1", calls.append)
    assert not outbox.when_acked("t", b"never-published", calls.append)
    assert producer.sent.wait(10)
    assert calls == []  # sent, not acknowledged
    producer.futures[0].success(None)
    assert calls == [None]
    assert not outbox.when_acked("t", b"answer-1", calls.append)  # nothing of it waits any more
    outbox.close(timeout_s=1)


def test_outbox_reports_a_record_it_drops():
    stuck = threading.Event()
    producer = HeldProducer(stuck)
    outbox = Outbox(producer, max_records=1)
    outbox.put(Record("t", b"first", b"v"))
    assert producer.sent.wait(10)  # the outbox thread is inside the first send
    outbox.put(Record("t", b"second", b"v"))
    errors: list = []
    assert outbox.when_acked("t", b"second", errors.append)
    outbox.put(Record("t", b"third", b"v"))  # full: the oldest waiting record is dropped
    assert len(errors) == 1 and isinstance(errors[0], PublishError)
    stuck.set()
    outbox.close(timeout_s=0.2)


class HeldEvents(MemoryEvents):
    """MemoryEvents whose Interactions wait for `ack(key)` before a rating of them may be stored."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[bytes, asyncio.Event] = {}
        self.waiting = asyncio.Event()  # set when a rating waits for an Interaction

    def publish_background(self, topic: str, key: bytes, value: bytes) -> None:
        super().publish_background(topic, key, value)
        self.held[key] = asyncio.Event()

    async def wait_background(self, topic: str, key: bytes, timeout_s: float) -> None:
        self.waiting.set()
        try:
            await asyncio.wait_for(self.held[key].wait(), timeout_s)
        except TimeoutError as e:
            raise PublishError(f"not acknowledged within {timeout_s:.1f}s") from e

    def feedback(self) -> list[events_pb2.FeedbackEvent]:
        return [
            events_pb2.FeedbackEvent.FromString(r.value) for r in self.records if r.topic == TOPICS.feedback
        ]


@pytest.fixture
async def gated():
    """ChatService over a real channel; an answer's Interaction handed to the outbox, not acknowledged."""
    signer, events = ResponseSigner(b"k" * 32), HeldEvents()
    config = InferenceConfig(feedback_ack_timeout_s=1.0)
    chat = ChatService(config, types.SimpleNamespace(context_length=512), events, signer, TOPICS)
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(chat, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    response_id = signer.issue("v000001")
    events.publish_background(TOPICS.interactions, response_id.encode(), b"the answer")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel), events, response_id
    await server.stop(0)


def rate(response_id: str) -> chat_pb2.FeedbackRequest:
    return chat_pb2.FeedbackRequest(response_id=response_id, rating=chat_pb2.THUMBS_UP, user_id="u1")


async def test_a_rating_is_stored_only_after_its_interaction(gated):
    stub, events, response_id = gated
    call = asyncio.ensure_future(stub.SubmitFeedback(rate(response_id), timeout=30))
    waiting = asyncio.ensure_future(events.waiting.wait())
    await asyncio.wait({call, waiting}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert waiting.done() and not call.done()
    assert events.feedback() == []  # nothing stored while the Interaction may still die with the process
    events.held[response_id.encode()].set()
    reply = await call
    assert [e.event_id for e in events.feedback()] == [reply.event_id]


async def test_a_rating_whose_interaction_never_comes_is_unavailable_and_can_be_retried(gated):
    stub, events, response_id = gated
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitFeedback(rate(response_id), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not stored" in info.value.details()
    assert events.feedback() == []
    events.held[response_id.encode()].set()
    await stub.SubmitFeedback(rate(response_id), timeout=30)  # the vote was released: the retry counts
    assert len(events.feedback()) == 1


@pytest.mark.kafka
async def test_kafka_events_wait_returns_once_the_broker_has_the_record(kafka_bootstrap, topics):
    events = KafkaEvents(kafka_bootstrap, client_id="test-gate")
    try:
        events.publish_background(topics.interactions, b"answer-7", b"the answer")
        await events.wait_background(topics.interactions, b"answer-7", timeout_s=30)
        assert events.pending == 0
        records = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.interactions, min_records=1)
        assert [r.key for r in records] == [b"answer-7"]
        await events.wait_background(topics.interactions, b"never-published", timeout_s=0.01)  # at once
    finally:
        await asyncio.to_thread(events.close)
