"""The TGI protocol's parts that need no model or broker: request checks, the prompt round trip, the remote
version, and the HTTP front end's error format through Hugging Face's own client, with a scripted stand-in
for the engine (an in-memory fake: the real engine and broker are in test_tgi_http.py)."""

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from text_generation import AsyncClient, Client
from text_generation.errors import GenerationError, IncompleteGenerationError, OverloadedError

from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.engine import EngineStopped, Finished, QueueFull, SamplingParams, TextDelta
from rlhf_online.engine.tiny_model import build_tokenizer
from rlhf_online.inference.chat import ChatService
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.events import MemoryEvents
from rlhf_online.inference.signing import ResponseSigner
from rlhf_online.inference.tgi_backend import remote_version
from rlhf_online.inference.tgi_http import (
    TgiHttp,
    encode_prompt,
    local_model_info,
    parse_request,
    prompt_text,
)
from rlhf_online.inference.validation import ChatLimits, RequestError
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.topics import Topics

pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")
LIMITS = ChatLimits.from_config(InferenceConfig(), context_length=512)


def parsed(parameters: dict, **body):
    return parse_request({"inputs": "hi", "parameters": parameters, **body}, LIMITS)


def test_sampling_follows_tgi_greedy_unless_asked():
    assert parsed({}).params == SamplingParams(LIMITS.default_max_new_tokens, 0.0, 1.0, None)
    assert parsed({"do_sample": True, "seed": 5}).params == SamplingParams(48, 1.0, 1.0, 5)
    assert parsed({"temperature": 0.5}).params.temperature == 0.5  # a temperature alone samples
    assert parsed({"top_p": 0.9}).params == SamplingParams(48, 1.0, 0.9, None)
    assert parsed({"temperature": 1.0}).params.temperature == 0.0  # 1.0 changes nothing: still greedy
    assert parsed({"max_new_tokens": 7}).params.max_new_tokens == 7


def test_stream_comes_from_the_route_or_the_body():
    assert parse_request({"inputs": "x", "stream": True}, LIMITS).stream
    assert not parse_request({"inputs": "x", "stream": True}, LIMITS, stream=False).stream


@pytest.mark.parametrize(
    "body, fragment",
    [
        ([], "JSON object"),
        ({"inputs": ""}, "`inputs` must be a non-empty string"),
        ({"inputs": "x" * 5000}, "the limit is 4096"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 10_000}}, "from 1 to 256"),
        ({"inputs": "x", "parameters": {"max_new_tokens": True}}, "`max_new_tokens` is True"),
        ({"inputs": "x", "parameters": {"temperature": 0}}, "`temperature` is 0"),
        ({"inputs": "x", "parameters": {"top_p": 1.5}}, "`top_p` is 1.5"),
        ({"inputs": "x", "parameters": {"seed": -1}}, "`seed` is -1"),
        ({"inputs": "x", "parameters": {"top_k": 10}}, "`top_k` is not supported"),
        ({"inputs": "x", "parameters": {"stop": ["\n"]}}, "`stop` is not supported"),
        ({"inputs": "x", "parameters": {"best_of": 2}}, "`best_of` is not supported"),
        ({"inputs": "x", "parameters": {"details": "yes"}}, "`details` is 'yes'"),
        ({"inputs": "x", "stream": True, "parameters": {"decoder_input_details": True}}, "when streaming"),
    ],
)
def test_bad_requests_name_the_field(body, fragment):
    with pytest.raises(RequestError) as info:
        parse_request(body, LIMITS)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.message


def test_neutral_values_of_unsupported_parameters_are_accepted():
    # What text_generation.Client sends by default.
    request = parsed(
        {"stop": [], "watermark": False, "best_of": None, "repetition_penalty": None, "details": True}
    )
    assert request.details


def test_a_rendered_chat_prompt_survives_the_trip_to_a_tgi_server():
    tokenizer = build_tokenizer()
    prompt = render_prompt(tokenizer, [("system", "Be brief."), ("user", "Hi there")])
    ids = encode_prompt(tokenizer, prompt)
    assert prompt_text(tokenizer, ids) == prompt
    assert encode_prompt(tokenizer, prompt_text(tokenizer, ids)) == ids


@pytest.mark.parametrize(
    "info, version",
    [
        ({"model_version": "v000003", "model_id": "x"}, "v000003"),
        ({"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_sha": "abcdef0123456789"},
         "HuggingFaceTB-SmolLM2-135M-Instruct-abcdef012345"),
        ({"model_id": "org/model.v2"}, "org-model-v2"),
        ({}, "tgi"),
    ],
)  # fmt: skip
def test_remote_version_fits_a_response_id(info, version):
    assert remote_version(info) == version
    ResponseSigner(b"k" * 32).verify(ResponseSigner(b"k" * 32).issue(remote_version(info)))


class ScriptedStream:
    """Plays "Hel", "lo", then ends as `ending` says: a Finished, EngineStopped or RuntimeError."""

    def __init__(self, ending: str) -> None:
        self._events = self._play(ending)
        self.cancelled = False

    def __aiter__(self) -> "ScriptedStream":
        return self

    async def __anext__(self):
        return await anext(self._events)

    def cancel(self) -> None:
        self.cancelled = True

    async def _play(self, ending: str) -> AsyncIterator:
        yield TextDelta("Hel")
        yield TextDelta("lo")
        if ending == "stopped":
            raise EngineStopped("the engine stopped before the answer was done")
        if ending == "failed":
            raise RuntimeError("generation failed on the server: boom")
        yield Finished("Hello", "v000007", prompt_tokens=2, completion_tokens=3, finish_reason="stop")


class ScriptedEngine:
    """Stands in for PolicyEngine: refuses every request (`full`) or plays a ScriptedStream."""

    def __init__(self) -> None:
        self.tokenizer, self.context_length, self.version = build_tokenizer(), 512, "v000007"
        self.ending = "finished"

    def submit(self, prompt_ids, params):
        if self.ending == "full":
            raise QueueFull("the generation queue is full (64 requests waiting); retry later")
        return ScriptedStream(self.ending)


@pytest.fixture
async def front():
    engine, events = ScriptedEngine(), MemoryEvents()
    chat = ChatService(InferenceConfig(), engine, events, ResponseSigner(b"k" * 32), Topics("unit"))
    http = TgiHttp(chat, local_model_info("cpu"), max_concurrent_requests=72, max_batch_size=8)
    port = await http.start("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}", engine, events, http
    await http.stop()


async def test_a_scripted_answer_has_tgi_shapes_and_is_published(front):
    url, _, events, _ = front
    answer = await AsyncClient(url, timeout=30).generate("Hi", max_new_tokens=5)
    assert answer.generated_text == "Hello"
    assert answer.details.finish_reason.value == "eos_token" and answer.details.generated_tokens == 3
    assert [t.text for t in answer.details.tokens] == ["Hel", "lo", ""]
    assert (
        answer.details.tokens[-1].special and answer.details.tokens[-1].id == build_tokenizer().eos_token_id
    )
    interaction = events_pb2.Interaction.FromString(events.records[-1].value)
    assert (interaction.prompt, interaction.response, interaction.model_version) == ("Hi", "Hello", "v000007")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_full_queue_is_overloaded(front, stream):
    url, engine, _, _ = front
    engine.ending = "full"
    client = AsyncClient(url, timeout=30)
    with pytest.raises(OverloadedError, match="queue is full"):
        if stream:
            [r async for r in client.generate_stream("Hi")]
        else:
            await client.generate("Hi")
    with pytest.raises(OverloadedError):  # the sync client too, off the loop that serves it
        await asyncio.to_thread(Client(url, timeout=30).generate, "Hi")


@pytest.mark.parametrize(
    "ending, error", [("stopped", IncompleteGenerationError), ("failed", GenerationError)]
)
async def test_a_stream_that_breaks_off_ends_with_an_error_event(front, ending, error):
    url, engine, events, _ = front
    engine.ending = ending
    tokens = []
    with pytest.raises(error):
        async for response in AsyncClient(url, timeout=30).generate_stream("Hi"):
            tokens.append(response.token.text)
    assert tokens == ["Hel", "lo"]  # what came before the failure was delivered
    assert not events.records  # an unfinished answer is not published


async def test_health_turns_unhealthy_when_the_front_end_stops_serving(front):
    url, _, _, http = front
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as response:
            assert response.status == 200
        http.serving = False
        async with session.get(f"{url}/health") as response:
            assert response.status == 503
            assert await response.json() == {"error": "unhealthy", "error_type": "healthcheck"}
