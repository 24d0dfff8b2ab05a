"""Unit tests of the inference service's pure parts: response signing, request validation, limits."""

import math

import grpc
import pytest

from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.limits import TokenBucket, VoteLedger
from rlhf_online.inference.signing import InvalidResponseId, ResponseSigner, feedback_event_id
from rlhf_online.inference.validation import (
    ChatLimits,
    RequestError,
    chat_messages,
    check_feedback,
    check_prompt_fits,
    sampling_params,
)
from rlhf_online.proto.rlhf.v1 import chat_pb2

KEY = b"k" * 32
LIMITS = ChatLimits.from_config(InferenceConfig(), context_length=512)


def test_signed_id_verifies_and_carries_the_version():
    signer = ResponseSigner(KEY)
    response_id = signer.issue("v000003")
    verified = signer.verify(response_id)
    assert verified.model_version == "v000003"
    assert verified.response_id == response_id
    assert signer.issue("v000003") != response_id


@pytest.mark.parametrize(
    "mutate",
    [
        lambda rid: rid[:-1] + ("0" if rid[-1] != "0" else "1"),  # tag changed
        lambda rid: rid.replace("v000003", "v000004"),  # version changed
        lambda rid: "f" + rid[1:] if rid[0] != "f" else "e" + rid[1:],  # nonce changed
    ],
)
def test_forged_id_is_refused(mutate):
    signer = ResponseSigner(KEY)
    with pytest.raises(InvalidResponseId, match="not issued by this service"):
        signer.verify(mutate(signer.issue("v000003")))


@pytest.mark.parametrize("garbled", ["", "abc", "x" * 500, "a.b.c", "..", "\x00"])
def test_garbled_id_is_refused(garbled):
    with pytest.raises(InvalidResponseId):
        ResponseSigner(KEY).verify(garbled)


def test_other_key_refuses():
    response_id = ResponseSigner(KEY).issue("v000001")
    with pytest.raises(InvalidResponseId):
        ResponseSigner(b"z" * 32).verify(response_id)


def test_short_key_refused():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ResponseSigner(b"short")


def test_event_id_is_deterministic_per_response_and_user():
    assert feedback_event_id("r", "u") == feedback_event_id("r", "u")
    assert feedback_event_id("r", "u") != feedback_event_id("r", "v")
    assert feedback_event_id("r", "u") != feedback_event_id("s", "u")


def _request(*messages, **params):
    return chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role=r, content=c) for r, c in messages],
        params=chat_pb2.GenerationParams(**params),
    )


def _code(fn, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value.code, info.value.message


def test_valid_chat_request_passes():
    assert chat_messages(_request(("system", "be brief"), ("user", "hi")), LIMITS) == [
        ("system", "be brief"),
        ("user", "hi"),
    ]


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ((), "messages is empty"),
        ((("robot", "hi"),), "messages[0].role is 'robot'"),
        ((("user", "hi"), ("user", "   ")), "messages[1].content is empty"),
    ],
)
def test_bad_messages_are_invalid_argument(messages, fragment):
    code, message = _code(chat_messages, _request(*messages), LIMITS)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in message


def test_oversized_user_id_is_refused():
    request = _request(("user", "hi"))
    request.user_id = "u" * 1000
    code, message = _code(chat_messages, request, LIMITS)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "user_id is 1000 characters" in message


def test_sampling_defaults_and_explicit_values():
    defaults = sampling_params(chat_pb2.GenerationParams(), LIMITS)
    assert (defaults.max_new_tokens, defaults.temperature, defaults.top_p, defaults.seed) == (
        LIMITS.default_max_new_tokens,
        LIMITS.default_temperature,
        1.0,
        None,
    )
    explicit = sampling_params(
        chat_pb2.GenerationParams(max_new_tokens=5, temperature=0, top_p=0.5, seed=0), LIMITS
    )
    assert (explicit.max_new_tokens, explicit.temperature, explicit.top_p, explicit.seed) == (5, 0.0, 0.5, 0)


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"max_new_tokens": 100_000}, "at most 256"),
        ({"temperature": -0.5}, "temperature is -0.5"),
        ({"temperature": math.nan}, "temperature is nan"),
        ({"temperature": math.inf}, "temperature is inf"),
        ({"top_p": 0.0}, "top_p is 0.0"),
        ({"top_p": 1.5}, "top_p is 1.5"),
    ],
)
def test_bad_sampling_params_are_invalid_argument(params, fragment):
    code, message = _code(sampling_params, chat_pb2.GenerationParams(**params), LIMITS)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in message


def test_prompt_longer_than_context_names_limit_and_size():
    check_prompt_fits(400, 100, 512)
    code, message = _code(check_prompt_fits, 500, 48, 512)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "500 tokens" in message and "512 tokens" in message


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"rating": chat_pb2.RATING_UNSPECIFIED, "user_id": "u"}, "RATING_UNSPECIFIED"),
        ({"rating": 7, "user_id": "u"}, "rating is 7"),
        ({"rating": chat_pb2.THUMBS_UP, "user_id": ""}, "user_id is empty"),
        ({"rating": chat_pb2.THUMBS_UP, "user_id": "u" * 500}, "user_id is 500"),
        ({"rating": chat_pb2.THUMBS_UP, "user_id": "u", "comment": "c" * 5000}, "comment is 5000"),
    ],
)
def test_bad_feedback_is_invalid_argument(fields, fragment):
    code, message = _code(
        check_feedback, chat_pb2.FeedbackRequest(response_id="x", **fields), InferenceConfig()
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in message


def test_token_bucket_allows_burst_then_refills():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.try_take("u") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take("u") == pytest.approx(0.5)
    assert bucket.try_take("other") == 0.0
    now[0] = 0.5
    assert bucket.try_take("u") == 0.0


def test_vote_ledger_reserve_commit_release():
    ledger = VoteLedger()
    assert ledger.reserve("r", "u")
    assert not ledger.reserve("r", "u")
    ledger.release("r", "u")
    assert ledger.reserve("r", "u")
    ledger.commit("r", "u")
    assert not ledger.reserve("r", "u")
    assert ledger.reserve("r", "other")


def test_config_refuses_inconsistent_token_bounds():
    with pytest.raises(ValueError, match="default_max_new_tokens"):
        InferenceConfig(default_max_new_tokens=500, max_new_tokens_cap=256)
