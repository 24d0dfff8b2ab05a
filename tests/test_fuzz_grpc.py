"""Hostile input to every RPC of the inference server (ChatService, ModelAdmin, health, reflection), through a
real server on port 0 and real channels.

Raw bytes go through `channel.unary_unary(method)` with no serializer, so the server sees exactly what the
test sends: random bytes, mutations of valid requests, and well-formed messages with hostile field values
(hypothesis, derandomized, bounded). Every refused request must get a clear status, never UNKNOWN or
INTERNAL, and a normal Chat must still work afterwards.

    .venv/bin/pytest -q tests/test_fuzz_grpc.py

The Kafka consumers (reward, trainer) are not fuzzed here yet: they are being refactored (issue #15).
"""

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from rlhf_online.grpc_decoding import RateLimitedLog
from rlhf_online.health import HealthServer
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.server import create_server
from rlhf_online.inference.validation import ChatLimits, RequestError, sampling_params
from rlhf_online.proto.rlhf.v1 import admin_pb2, chat_pb2
from tests.test_inference_server import ask, config_for

pytestmark = pytest.mark.kafka

ADMIN = [("authorization", "Bearer admin-secret")]
UNARY = {  # path -> a valid request of its type
    "/rlhf.v1.ChatService/Chat": ask("hello", max_new_tokens=2),
    "/rlhf.v1.ChatService/SubmitFeedback": chat_pb2.FeedbackRequest(
        response_id="k0." + "0" * 32 + ".v000001." + "0" * 32, rating=chat_pb2.THUMBS_UP, user_id="u"
    ),
    "/rlhf.v1.ModelAdmin/GetModel": admin_pb2.GetModelRequest(),
    "/rlhf.v1.ModelAdmin/ListVersions": admin_pb2.ListVersionsRequest(),
    "/rlhf.v1.ModelAdmin/Rollback": admin_pb2.RollbackRequest(version="v000001"),
}
UNARY["/grpc.health.v1.Health/Check"] = health_pb2.HealthCheckRequest()
STREAM = {"/rlhf.v1.ChatService/ChatStream": ask("hello", max_new_tokens=2)}
BIDI = {  # the request stream holds one message
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": reflection_pb2.ServerReflectionRequest(
        list_services=""
    )
}
VALID = {**UNARY, **STREAM, **BIDI}
METHODS = sorted(VALID)
# Watch streams until the client leaves, so it only gets the malformed bytes, which end it at once.
WATCH = "/grpc.health.v1.Health/Watch"
# Statuses that tell the caller what is wrong with its request; UNKNOWN and INTERNAL would be our bugs.
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
FUZZ = settings(  # no shrinking: each step is an RPC, and a failing run must stay within the CI budget
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture
async def port(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    """A served inference server with a tiny generation budget, so well-formed fuzz requests are cheap."""
    config = config_for(
        kafka_bootstrap,
        topics,
        tiny_model_dir,
        tmp_path,
        default_max_new_tokens=2,
        max_new_tokens_cap=4,
        feedback_burst=100_000,
        feedback_rate_per_s=100_000.0,
    )
    running = await create_server(config)
    yield running.port
    await running.stop(grace_s=1)


def call(channel: grpc.Channel, method: str, data: bytes, metadata=()) -> tuple[grpc.StatusCode, str]:
    """Sends `data` as the request bytes of `method`; the final status and its details."""
    try:
        if method in STREAM or method == WATCH:
            for _ in channel.unary_stream(method)(data, timeout=30, metadata=metadata):
                pass
        elif method in BIDI:
            for _ in channel.stream_stream(method)(iter([data]), timeout=30, metadata=metadata):
                pass
        else:
            channel.unary_unary(method)(data, timeout=30, metadata=metadata)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def assert_clear(code: grpc.StatusCode, details: str, what: str) -> None:
    assert code in CLEAR, f"{what}: {code.name} {details!r}"
    if code != grpc.StatusCode.OK:
        assert details and len(details) < 600, f"{what}: {code.name} with details {details!r}"


def assert_still_serving(channel: grpc.Channel) -> None:
    reply = chat_pb2.ChatResponse.FromString(
        channel.unary_unary("/rlhf.v1.ChatService/Chat")(ask("still there?").SerializeToString(), timeout=60)
    )
    assert reply.response_id and reply.model_version == "v000001"


def malformed_count(method: str) -> float:
    name = method.strip("/").replace("/", ".")
    return REGISTRY.get_sample_value("rlhf_grpc_malformed_requests_total", {"method": name}) or 0.0


def run_in_thread(port: int, body):
    """Runs blocking `body(channel)` in a worker thread while the test's event loop serves."""

    def run():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            body(channel)
            assert_still_serving(channel)

    return asyncio.to_thread(run)


# ---- bytes that do not parse ------------------------------------------------------------------------------

BAD_BYTES = [  # malformed whatever the message type
    b"\x0a\x05",  # field 1, length 5, then nothing: truncated
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint tag longer than 10 bytes
    b"\x0f",  # wire type 7 does not exist
]
BAD_UTF8 = {  # a string field holding bytes that are not UTF-8 (user_id = 3, version = 1)
    "/rlhf.v1.ChatService/Chat": b"\x1a\x02\xff\xfe",
    "/rlhf.v1.ChatService/ChatStream": b"\x1a\x02\xff\xfe",
    "/rlhf.v1.ChatService/SubmitFeedback": b"\x1a\x02\xff\xfe",
    "/rlhf.v1.ModelAdmin/Rollback": b"\x0a\x02\xff\xfe",
}


async def test_unparseable_bytes_get_invalid_argument_counted_not_traced(port, caplog):
    methods = [*METHODS, WATCH]
    before = {m: malformed_count(m) for m in methods}

    sent = [(m, data) for m in methods for data in BAD_BYTES] + list(BAD_UTF8.items())

    def body(channel):
        for method, data in sent:
            code, details = call(channel, method, data, metadata=ADMIN)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, data, code, details)
            expected = "RollbackRequest" if "Rollback" in method else ""
            assert details.startswith("request is not a valid "), details
            assert expected in details and len(details) < 300

    with caplog.at_level(logging.INFO):
        await run_in_thread(port, body)
    for method in methods:
        expected = sum(m == method for m, _ in sent)
        assert malformed_count(method) - before[method] == expected, method
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    lines = [r for r in caplog.records if r.name == "rlhf_online.grpc_decoding"]
    assert len(lines) <= 1  # 31 malformed requests, at most one (rate-limited) log line


async def test_a_request_over_the_size_limit_gets_resource_exhausted(port):
    def body(channel):
        huge = ask("x" * (5 << 20)).SerializeToString()  # 5 MiB, over gRPC's 4 MiB default
        code, details = call(channel, "/rlhf.v1.ChatService/Chat", huge)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)

    await run_in_thread(port, body)


def test_rate_limited_log_says_how_many_lines_it_left_out(caplog):
    clock = Clock()
    lines = RateLimitedLog(logging.getLogger("test.ratelimited"), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.ratelimited"):
        logged = [lines.warning("bad request %d", i) for i in range(5)]
        clock.now = 10.0
        logged.append(lines.warning("bad request %d", 5))
    assert logged == [True, False, False, False, False, True]
    assert [r.getMessage() for r in caplog.records] == [
        "bad request 0 (0 more not logged since the last such line)",
        "bad request 5 (4 more not logged since the last such line)",
    ]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


# ---- random and mutated bytes -----------------------------------------------------------------------------


async def test_random_bytes_to_every_rpc_get_a_clear_status(port):
    @settings(FUZZ, max_examples=250)
    @given(method=st.sampled_from(METHODS), data=st.binary(max_size=300), with_token=st.booleans())
    def fuzz(channel, method, data, with_token):
        code, details = call(channel, method, data, metadata=ADMIN if with_token else ())
        assert_clear(code, details, f"{method} {data!r}")

    await run_in_thread(port, fuzz)


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Applies (kind, position, byte) edits: 0 flips bits, 1 deletes, 2 inserts, 3 truncates."""
    out = bytearray(data)
    for kind, position, value in edits:
        i = position % (len(out) + 1)
        if kind == 0 and i < len(out):
            out[i] ^= value or 1
        elif kind == 1 and i < len(out):
            del out[i]
        elif kind == 2:
            out.insert(i, value)
        elif kind == 3:
            del out[i:]
    return bytes(out)


async def test_mutated_valid_requests_get_a_clear_status(port):
    edit = st.tuples(st.integers(0, 3), st.integers(0, 1000), st.integers(0, 255))

    @settings(FUZZ, max_examples=250)
    @given(method=st.sampled_from(METHODS), edits=st.lists(edit, min_size=1, max_size=6))
    def fuzz(channel, method, edits):
        data = mutate(VALID[method].SerializeToString(), edits)
        code, details = call(channel, method, data, metadata=ADMIN)
        assert_clear(code, details, f"{method} {data!r}")

    await run_in_thread(port, fuzz)


# ---- well-formed messages with hostile values -------------------------------------------------------------

# Odd unicode (any code point UTF-8 can carry: controls, combining marks, RTL, emoji), and huge strings.
odd_text = st.text(st.characters(codec="utf-8"), max_size=40)
huge_text = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(1000, 300_000))
text = st.one_of(odd_text, huge_text, st.sampled_from(["", " ", "\x00", "user", "\u202e", "😀" * 50]))
ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)  # metadata values
# Any float32 (NaN, ±inf, -0.0, huge), and the subnormals, where dividing by them overflows.
float32 = st.one_of(st.floats(width=32), st.floats(0, 2.0**-126, width=32))


def optional(strategy):
    return st.one_of(st.none(), strategy)


ROLE = st.sampled_from(["system", "user", "assistant"])
# Half the requests have a valid conversation, so hostile sampling parameters reach the engine.
conversation = st.lists(
    st.tuples(ROLE, st.text(st.characters(codec="ascii"), min_size=1, max_size=20)), min_size=1, max_size=3
)
hostile_conversation = st.lists(st.tuples(st.one_of(ROLE, odd_text, huge_text), text), max_size=70)


@st.composite
def chat_requests(draw) -> chat_pb2.ChatRequest:
    messages = draw(st.one_of(conversation, hostile_conversation))
    params = chat_pb2.GenerationParams(max_new_tokens=draw(st.integers(0, 2**32 - 1) | st.integers(0, 5)))
    for name, strategy in (
        ("temperature", float32),
        ("top_p", float32),
        ("seed", st.integers(0, 2**64 - 1)),
    ):
        value = draw(optional(strategy))
        if value is not None:
            setattr(params, name, value)
    return chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role=r, content=c) for r, c in messages],
        params=params if draw(st.integers(0, 4)) else None,
        user_id=draw(text),
    )


def response_ids(genuine: str):
    at = st.integers(0, len(genuine))
    tampered = st.builds(lambda i, c: genuine[:i] + c + genuine[i + 1 :], at, odd_text)
    return st.one_of(st.just(genuine), tampered, odd_text, st.just(genuine + "x" * 1000))


@st.composite
def feedback_requests(draw, genuine: str) -> chat_pb2.FeedbackRequest:
    request = chat_pb2.FeedbackRequest(
        response_id=draw(response_ids(genuine)),
        rating=draw(st.sampled_from([1, 2]) | st.integers(-(2**31), 2**31 - 1)),
        user_id=draw(text),
    )
    comment = draw(optional(text))
    if comment is not None:
        request.comment = comment
    return request


async def test_well_formed_hostile_chat_requests_get_a_clear_status(port):
    @settings(FUZZ, max_examples=200)
    @given(request=chat_requests(), stream=st.booleans())
    def fuzz(channel, request, stream):
        method = "/rlhf.v1.ChatService/ChatStream" if stream else "/rlhf.v1.ChatService/Chat"
        code, details = call(channel, method, request.SerializeToString())
        assert_clear(code, details, f"{method} {str(request)[:500]}")

    await run_in_thread(port, fuzz)


async def test_well_formed_hostile_feedback_and_admin_requests_get_a_clear_status(port):
    def body(channel):
        answer = chat_pb2.ChatResponse.FromString(
            channel.unary_unary("/rlhf.v1.ChatService/Chat")(ask("rate me").SerializeToString(), timeout=60)
        )

        @settings(FUZZ, max_examples=150)
        @given(feedback=feedback_requests(answer.response_id), version=text, token=optional(ascii_text))
        def fuzz(feedback, version, token):
            code, details = call(channel, "/rlhf.v1.ChatService/SubmitFeedback", feedback.SerializeToString())
            assert_clear(code, details, f"SubmitFeedback {str(feedback)[:500]}")
            rollback = admin_pb2.RollbackRequest(version=version).SerializeToString()
            metadata = ADMIN if token is None else [("authorization", token)]
            code, details = call(channel, "/rlhf.v1.ModelAdmin/Rollback", rollback, metadata=metadata)
            assert_clear(code, details, f"Rollback {version[:100]!r}")

        fuzz()

    await run_in_thread(port, body)


def test_subnormal_temperature_is_refused_before_the_engine():
    """The fuzz's first find: temperature 1e-45 overflowed the sampler and failed its batch (INTERNAL)."""
    limits = ChatLimits.from_config(InferenceConfig(), context_length=512)
    for temperature in (1e-45, 2.45e-39, 1e-5):
        with pytest.raises(RequestError, match="use 0 for greedy decoding"):
            sampling_params(chat_pb2.GenerationParams(temperature=temperature), limits)
    low = sampling_params(chat_pb2.GenerationParams(temperature=1e-3), limits)
    assert low.temperature == pytest.approx(1e-3)


def test_the_health_server_of_reward_and_trainer_refuses_malformed_bytes_too():
    server = HealthServer(0, host="127.0.0.1")
    server.set_serving(True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for method in ("/grpc.health.v1.Health/Check", WATCH, *BIDI):
                code, details = call(channel, method, BAD_BYTES[0])
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
                assert details.startswith("request is not a valid grpc.")
            code, _ = call(channel, "/grpc.health.v1.Health/Check", b"")
            assert code == grpc.StatusCode.OK
    finally:
        server.stop(grace_s=0.5)
