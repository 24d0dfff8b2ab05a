"""The inference service end to end: a real gRPC server on port 0, real channels, the real Kafka broker.

Events are read back with an independent reader (`read_topic`), not through the service.
"""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rlhf_online.broker.clients import read_topic
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2

pytestmark = pytest.mark.kafka

KEY = "test-signing-key-0123456789abcdef"


def config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path, **overrides) -> InferenceConfig:
    values = dict(
        grpc_port=0,
        metrics_port=-1,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topics.prefix,
        registry_dir=str(tmp_path / "registry"),
        base_model_dir=str(tiny_model_dir),
        signing_key=KEY,
        admin_token="admin-secret",
        default_max_new_tokens=16,
        replica_id="test",
    )
    values.update(overrides)
    return InferenceConfig(**values)


def ask(text: str, **params) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role="user", content=text)],
        user_id="alice",
        params=chat_pb2.GenerationParams(**params),
    )


@pytest.fixture
async def served(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    running = await create_server(config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, chat_pb2_grpc.ChatServiceStub(channel), channel
    await channel.close()
    await running.stop(grace_s=1)


async def test_chat_answers_and_publishes_the_interaction(served, kafka_bootstrap, topics):
    _, stub, _ = served
    response = await stub.Chat(ask("Hello there", max_new_tokens=8, seed=3), timeout=30)
    assert response.model_version == "v000001"
    assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 0
    assert response.finish_reason in ("stop", "length")
    records = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.interactions, min_records=1)
    interaction = events_pb2.Interaction.FromString(records[0].value)
    assert records[0].key == response.response_id.encode()
    assert interaction.response_id == response.response_id
    assert interaction.response == response.text
    assert interaction.model_version == "v000001"
    assert interaction.messages[0].content == "Hello there" and interaction.user_id == "alice"
    assert interaction.params.max_new_tokens == 8 and interaction.params.seed == 3


async def test_stream_yields_text_then_metadata_and_matches_chat(served):
    _, stub, _ = served
    request = ask("Tell me something", max_new_tokens=12, temperature=0)
    chunks = [chunk async for chunk in stub.ChatStream(request, timeout=30)]
    whole = await stub.Chat(request, timeout=30)
    assert "".join(c.text for c in chunks) == whole.text  # greedy: the same answer both ways
    assert all(not c.response_id for c in chunks[:-1])
    last = chunks[-1]
    assert last.response_id and last.model_version == "v000001"
    assert last.usage.completion_tokens == whole.usage.completion_tokens


async def test_concurrent_callers_share_a_batch(served):
    running, stub, _ = served
    before = running.engine.largest_batch_seen
    replies = await asyncio.gather(
        *(stub.Chat(ask(f"question {i}", max_new_tokens=24), timeout=60) for i in range(8))
    )
    assert len({r.response_id for r in replies}) == 8
    assert running.engine.largest_batch_seen > max(1, before)


async def test_feedback_is_acknowledged_published_once_and_deduplicated(served, kafka_bootstrap, topics):
    _, stub, _ = served
    response = await stub.Chat(ask("Rate me", max_new_tokens=4), timeout=30)
    ack = await stub.SubmitFeedback(
        chat_pb2.FeedbackRequest(
            response_id=response.response_id, rating=chat_pb2.THUMBS_UP, user_id="bob", comment="nice"
        ),
        timeout=30,
    )
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stub.SubmitFeedback(
            chat_pb2.FeedbackRequest(
                response_id=response.response_id, rating=chat_pb2.THUMBS_DOWN, user_id="bob"
            ),
            timeout=30,
        )
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    records = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.feedback, min_records=1)
    assert len(records) == 1
    event = events_pb2.FeedbackEvent.FromString(records[0].value)
    assert records[0].key == response.response_id.encode()
    assert (event.event_id, event.rating, event.user_id, event.comment) == (
        ack.event_id,
        chat_pb2.THUMBS_UP,
        "bob",
        "nice",
    )
    assert event.model_version == "v000001"


@pytest.mark.parametrize(
    "request_, fragment",
    [
        (chat_pb2.ChatRequest(), "messages is empty"),
        (chat_pb2.ChatRequest(messages=[chat_pb2.Message(role="wizard", content="x")]), "role is 'wizard'"),
        (chat_pb2.ChatRequest(messages=[chat_pb2.Message(role="user", content="")]), "content is empty"),
        (ask("x", max_new_tokens=10_000), "at most 256"),
        (ask("x", temperature=-1), "temperature is -1"),
        (ask("x", temperature=float("nan")), "temperature is nan"),
        (ask("x", top_p=1.5), "top_p is 1.5"),
        (ask("x" * 600, max_new_tokens=16), "context of 512 tokens"),
    ],
)
async def test_bad_chat_requests_get_invalid_argument_and_server_keeps_serving(served, request_, fragment):
    _, stub, _ = served
    for call in (stub.Chat, lambda r, timeout: _drain(stub.ChatStream(r, timeout=timeout))):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request_, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in info.value.details()
    assert (await stub.Chat(ask("still there?", max_new_tokens=2), timeout=30)).response_id


async def _drain(stream):
    return [chunk async for chunk in stream]


async def test_bad_feedback_gets_clear_errors(served):
    _, stub, _ = served
    good = (await stub.Chat(ask("hi", max_new_tokens=2), timeout=30)).response_id
    forged = good[:-4] + ("0000" if not good.endswith("0000") else "1111")
    cases = [
        (chat_pb2.FeedbackRequest(response_id=forged, rating=chat_pb2.THUMBS_UP, user_id="u"), "not issued"),
        (
            chat_pb2.FeedbackRequest(response_id="garbage", rating=chat_pb2.THUMBS_UP, user_id="u"),
            "malformed",
        ),
        (chat_pb2.FeedbackRequest(response_id=good, user_id="u"), "RATING_UNSPECIFIED"),
        (chat_pb2.FeedbackRequest(response_id=good, rating=chat_pb2.THUMBS_UP, user_id="u" * 500), "user_id"),
        (
            chat_pb2.FeedbackRequest(
                response_id=good, rating=chat_pb2.THUMBS_UP, user_id="u", comment="c" * 9000
            ),
            "comment",
        ),
    ]
    for request, fragment in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitFeedback(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert fragment in info.value.details()
    ok = await stub.SubmitFeedback(
        chat_pb2.FeedbackRequest(response_id=good, rating=chat_pb2.THUMBS_DOWN, user_id="u"), timeout=30
    )
    assert ok.event_id


async def test_per_user_rate_limit(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    config = config_for(
        kafka_bootstrap, topics, tiny_model_dir, tmp_path, feedback_burst=2, feedback_rate_per_s=0.001
    )
    running = await create_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            ids = [(await stub.Chat(ask("q", max_new_tokens=2), timeout=30)).response_id for _ in range(3)]
            for rid in ids[:2]:
                await stub.SubmitFeedback(
                    chat_pb2.FeedbackRequest(response_id=rid, rating=1, user_id="eve"), timeout=30
                )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitFeedback(
                    chat_pb2.FeedbackRequest(response_id=ids[2], rating=1, user_id="eve"), timeout=30
                )
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry in" in info.value.details()
            await stub.SubmitFeedback(
                chat_pb2.FeedbackRequest(response_id=ids[2], rating=1, user_id="zed"), timeout=30
            )
    finally:
        await running.stop(grace_s=1)


async def test_health_and_reflection(served):
    _, _, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "rlhf.v1.ChatService", "rlhf.v1.ModelAdmin"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name async for reply in replies for s in reply.list_services_response.service}
    assert {"rlhf.v1.ChatService", "rlhf.v1.ModelAdmin", "grpc.health.v1.Health"} <= names
