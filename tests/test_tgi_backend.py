"""`--backend tgi` end to end: one rlhf-online instance generates with the tiny model and serves the TGI HTTP
API on port 0; a second one (backend=tgi) fronts it over gRPC and TGI HTTP, signing, publishing and taking
ratings itself, on topics of its own. The real broker; events read back with `read_topic`."""

import asyncio
import uuid

import grpc
import pytest
from text_generation import AsyncClient

from rlhf_online.broker.clients import ensure_topics, read_topic
from rlhf_online.inference.server import create_server
from rlhf_online.inference.tgi_backend import TgiBackend
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from rlhf_online.topics import Topics
from tests.test_inference_server import ask, config_for

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning"),
]


@pytest.fixture
async def pair(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    """(generating instance, fronting instance, the fronting one's topics)."""
    generating = await create_server(
        config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path / "a", tgi_port=0)
    )
    front_topics = Topics(f"f{uuid.uuid4().hex[:10]}")
    await asyncio.to_thread(ensure_topics, kafka_bootstrap, front_topics, partitions=2)
    fronting = await create_server(
        config_for(
            kafka_bootstrap,
            front_topics,
            tiny_model_dir,
            tmp_path / "b",
            backend="tgi",
            tgi_url=f"http://127.0.0.1:{generating.tgi_port}",
            tgi_port=0,
        )
    )
    yield generating, fronting, front_topics
    await fronting.stop(grace_s=1)
    await generating.stop(grace_s=1)


def stub_of(server) -> tuple[grpc.aio.Channel, chat_pb2_grpc.ChatServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return channel, chat_pb2_grpc.ChatServiceStub(channel)


async def test_the_fronting_instance_answers_what_the_generating_one_generates(pair, kafka_bootstrap):
    generating, fronting, front_topics = pair
    assert isinstance(fronting.engine, TgiBackend) and fronting.follower is None
    request = ask("Tell me a story", max_new_tokens=12, temperature=0)
    (ch_a, stub_a), (ch_b, stub_b) = stub_of(generating), stub_of(fronting)
    async with ch_a, ch_b:
        direct = await stub_a.Chat(request, timeout=60)
        fronted = await stub_b.Chat(request, timeout=60)
        chunks = [c async for c in stub_b.ChatStream(request, timeout=60)]
        rating = chat_pb2.FeedbackRequest(
            response_id=fronted.response_id, rating=chat_pb2.THUMBS_UP, user_id="u"
        )
        assert (await stub_b.SubmitFeedback(rating, timeout=30)).event_id
    assert fronted.text == direct.text  # greedy, the same prompt ids on the far side
    assert fronted.model_version == direct.model_version == "v000001"  # from the remote's /info
    assert (fronted.usage.prompt_tokens, fronted.finish_reason) == (
        direct.usage.prompt_tokens,
        direct.finish_reason,
    )
    assert "".join(c.text for c in chunks) == direct.text and chunks[-1].response_id
    records = await asyncio.to_thread(read_topic, kafka_bootstrap, front_topics.interactions, min_records=2)
    published = {events_pb2.Interaction.FromString(r.value).response_id for r in records}
    assert {fronted.response_id, chunks[-1].response_id} <= published
    feedback = await asyncio.to_thread(read_topic, kafka_bootstrap, front_topics.feedback, min_records=1)
    assert events_pb2.FeedbackEvent.FromString(feedback[0].value).response_id == fronted.response_id


async def test_the_fronting_instance_speaks_tgi_too(pair):
    generating, fronting, _ = pair
    prompt = "Why is the sky blue?"
    direct = await AsyncClient(f"http://127.0.0.1:{generating.tgi_port}", timeout=60).generate(prompt)
    client = AsyncClient(f"http://127.0.0.1:{fronting.tgi_port}", timeout=60)
    fronted = await client.generate(prompt)
    streamed = [r async for r in client.generate_stream(prompt)]
    assert fronted.generated_text == direct.generated_text == streamed[-1].generated_text
    assert fronted.details.generated_tokens == direct.details.generated_tokens


async def test_a_remote_that_goes_away_is_unavailable(pair):
    generating, fronting, _ = pair
    await generating.stop(grace_s=1)
    channel, stub = stub_of(fronting)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Chat(ask("anyone there?", max_new_tokens=4), timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "TGI server at http://127.0.0.1" in info.value.details() and "retry later" in info.value.details()
    assert fronting.engine.in_flight == 0  # the failed request gave its slot back
