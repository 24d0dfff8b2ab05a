"""The TGI HTTP API end to end through Hugging Face's own client (`text-generation` 0.7.0): a real inference
server (tiny model, port 0 for gRPC and HTTP), the real broker, events read back with `read_topic`.

The sync client blocks, and the server runs on the test's own loop, so its calls go through a thread.
Every client gets a 60 s timeout: the default 10 s covers a whole answer, and this machine is shared.
"""

import asyncio
import json
import ssl

import aiohttp
import grpc
import pytest
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError

from rlhf_online.broker.clients import read_topic
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from tests.test_inference_server import ask, config_for
from tests.test_tls import Pki, make_ca, make_leaf

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning"),
]
TIMEOUT = 60


@pytest.fixture
async def served(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    running = await create_server(config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path, tgi_port=0))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, f"http://127.0.0.1:{running.tgi_port}", chat_pb2_grpc.ChatServiceStub(channel)
    await channel.close()
    await running.stop(grace_s=1)


async def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, object]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def test_sync_generate_answers_in_tgi_shapes(served):
    _, url, _ = served
    client = Client(url, timeout=TIMEOUT)
    answer = await asyncio.to_thread(client.generate, "Hello there", max_new_tokens=8)
    details = answer.details
    assert details.finish_reason.value in ("length", "eos_token")
    assert 1 <= details.generated_tokens <= 8
    assert "".join(t.text for t in details.tokens if not t.special) == answer.generated_text
    assert details.prefill == []
    full = await asyncio.to_thread(client.generate, "Hi", max_new_tokens=4, return_full_text=True)
    assert full.generated_text.startswith("Hi")


async def test_answers_are_tagged_signed_and_published(served, kafka_bootstrap, topics):
    running, url, stub = served
    status, headers, body = await post(
        f"{url}/generate",
        {"inputs": "Rate this", "parameters": {"max_new_tokens": 6, "details": True}},
        {"x-user-id": "alice"},
    )
    assert status == 200
    response_id, version = headers["x-response-id"], headers["x-model-version"]
    assert version == running.engine.version == "v000001"
    assert headers["x-generated-tokens"] == str(body["details"]["generated_tokens"])
    records = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.interactions, min_records=1)
    interaction = events_pb2.Interaction.FromString(records[0].value)
    assert records[0].key == response_id.encode()
    assert (interaction.prompt, interaction.response) == ("Rate this", body["generated_text"])
    assert (interaction.model_version, interaction.user_id) == ("v000001", "alice")
    assert interaction.params.max_new_tokens == 6 and not interaction.messages
    # The id is ours: a rating of it is taken over gRPC and over HTTP, once per user.
    rating = chat_pb2.FeedbackRequest(response_id=response_id, rating=chat_pb2.THUMBS_UP, user_id="bob")
    assert (await stub.SubmitFeedback(rating, timeout=30)).event_id
    status, _, reply = await post(
        f"{url}/feedback", {"response_id": response_id, "rating": "THUMBS_DOWN", "user_id": "carol"}
    )
    assert status == 200 and reply["event_id"]
    status, _, again = await post(
        f"{url}/feedback", {"response_id": response_id, "rating": "THUMBS_UP", "user_id": "carol"}
    )
    assert (status, again["error_type"]) == (409, "validation") and "already rated" in again["error"]
    feedback = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.feedback, min_records=2)
    assert {events_pb2.FeedbackEvent.FromString(r.value).user_id for r in feedback} == {"bob", "carol"}


async def test_async_generate_of_a_rendered_prompt_matches_grpc_chat(served):
    running, url, stub = served
    prompt = render_prompt(running.engine.tokenizer, [("user", "Tell me something")])
    answer = await AsyncClient(url, timeout=TIMEOUT).generate(prompt, max_new_tokens=12)  # greedy
    chat = await stub.Chat(ask("Tell me something", max_new_tokens=12, temperature=0), timeout=60)
    assert answer.generated_text == chat.text
    assert answer.details.generated_tokens == chat.usage.completion_tokens


async def test_streams_match_the_whole_answer(served):
    _, url, _ = served
    whole = await AsyncClient(url, timeout=TIMEOUT).generate("Once upon", max_new_tokens=10)
    events = [
        r async for r in AsyncClient(url, timeout=TIMEOUT).generate_stream("Once upon", max_new_tokens=10)
    ]
    sync_client = Client(url, timeout=TIMEOUT)
    sync_events = await asyncio.to_thread(
        lambda: list(sync_client.generate_stream("Once upon", max_new_tokens=10))
    )
    for stream in (events, sync_events):
        *body, last = stream
        assert all(e.details is None and e.generated_text is None for e in body)
        assert last.generated_text == whole.generated_text
        assert "".join(e.token.text for e in stream if not e.token.special) == whole.generated_text
        assert last.details.generated_tokens == whole.details.generated_tokens


async def test_the_last_stream_event_carries_the_response_id(served, kafka_bootstrap, topics):
    _, url, _ = served
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/generate_stream", json={"inputs": "Hey", "parameters": {"max_new_tokens": 5}}
        ) as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = [line async for line in r.content if line.startswith(b"data:")]
    assert not any(b"[DONE]" in line for line in lines)
    last = json.loads(lines[-1][len(b"data:") :])
    assert last["model_version"] == "v000001"
    records = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.interactions, min_records=1)
    assert records[0].key == last["response_id"].encode()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"max_new_tokens": 10_000}, "from 1 to 256"),
        ({"top_k": 5}, "`top_k` is not supported"),
        ({"stop_sequences": ["."]}, "`stop` is not supported"),
    ],
)
async def test_bad_requests_raise_validation_error_and_the_server_keeps_serving(served, kwargs, fragment):
    _, url, _ = served
    client = AsyncClient(url, timeout=TIMEOUT)
    with pytest.raises(ValidationError, match=fragment):
        await client.generate("x", **kwargs)
    with pytest.raises(ValidationError, match=fragment):
        [r async for r in client.generate_stream("x", **kwargs)]
    with pytest.raises(ValidationError, match=fragment):
        await asyncio.to_thread(Client(url, timeout=TIMEOUT).generate, "x", **kwargs)
    assert (await client.generate("still there?", max_new_tokens=2)).generated_text is not None


async def test_a_prompt_too_long_for_the_context_is_a_validation_error(served):
    _, url, _ = served
    with pytest.raises(ValidationError, match="context of 512 tokens"):
        await AsyncClient(url, timeout=TIMEOUT).generate("x" * 600, max_new_tokens=16)
    status, _, body = await post(f"{url}/generate", {"inputs": "hi", "parameters": {"temperature": -1}})
    assert status == 422 and body["error_type"] == "validation" and "`temperature` is -1" in body["error"]


async def test_info_and_health(served):
    running, url, _ = served
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/info") as response:
            info = await response.json()
        async with session.get(f"{url}/health") as response:
            assert response.status == 200
    assert info["model_sha"] == info["model_version"] == "v000001"
    assert info["max_total_tokens"] == running.engine.context_length == 512
    assert info["model_id"] == "rlhf-online/policy" and info["router"] == "rlhf-online"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = make_ca(folder, "test-ca"), make_ca(folder, "rogue-ca")
    return Pki(
        ca=ca[0],
        server=make_leaf(folder, "server", ca, server=True),
        client=make_leaf(folder, "client", ca, server=False),
        rogue_client=make_leaf(folder, "rogue-client", rogue, server=False),
    )


@pytest.mark.parametrize("mutual", [False, True])
async def test_the_tgi_port_uses_the_grpc_tls_settings(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path, pki, mutual
):
    tls = {"tls_cert_file": str(pki.server.cert), "tls_key_file": str(pki.server.key)}
    if mutual:
        tls["tls_client_ca_file"] = str(pki.ca.cert)
    config = config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path, tgi_port=0, **tls)
    running = await create_server(config)
    try:
        trusting = ssl.create_default_context(cafile=str(pki.ca.cert))
        if mutual:
            trusting.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
        async with aiohttp.ClientSession() as session:
            url = f"https://127.0.0.1:{running.tgi_port}/generate"
            async with session.post(url, json=body, ssl=trusting) as response:
                assert response.status == 200 and response.headers["x-response-id"]
            with pytest.raises(aiohttp.ClientError):  # plaintext is not served
                await session.post(f"http://127.0.0.1:{running.tgi_port}/generate", json=body)
            if mutual:  # a client without a certificate from the CA fails the handshake
                anonymous = ssl.create_default_context(cafile=str(pki.ca.cert))
                rogue = ssl.create_default_context(cafile=str(pki.ca.cert))
                rogue.load_cert_chain(str(pki.rogue_client.cert), str(pki.rogue_client.key))
                for context in (anonymous, rogue):
                    with pytest.raises(aiohttp.ClientError):
                        await session.post(url, json=body, ssl=context)
    finally:
        await running.stop(grace_s=1)
