"""Key rotation through a real server: ratings of ids signed by the previous key are taken during its grace
period, ids of a retired key get FAILED_PRECONDITION, tampered or unknown ones INVALID_ARGUMENT.

The server runs with `signing_keys = k2 (signing), k1 (retires in an hour), k0 (retired an hour ago)`; the ids
of k1 and k0 are issued by a ResponseSigner holding only that key, as a replica not yet rotated would.
"""

import time

import grpc
import pytest

from rlhf_online.inference.server import create_server
from rlhf_online.inference.signing import ResponseSigner, SigningKey, format_time
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc
from tests.test_inference_server import ask, config_for

pytestmark = pytest.mark.kafka

SECRETS = {
    "k2": "new-secret-0123456789abcdef",
    "k1": "old-secret-0123456789abcdef",
    "k0": "older-secret-012345",
}


@pytest.fixture
async def stub(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    now = time.time()
    keys = f"k2:{SECRETS['k2']},k1:{SECRETS['k1']}@{format_time(now + 3600)},k0:{SECRETS['k0']}@{now - 3600}"
    config = config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path, signing_key="", signing_keys=keys)
    running = await create_server(config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)
    await running.stop(grace_s=1)


def signed_by(key_id: str) -> str:
    """An id as a replica still holding only `key_id` would issue it."""
    return ResponseSigner([SigningKey(key_id, SECRETS[key_id].encode())]).issue("v000001")


async def rate(stub, response_id: str, user: str = "u1"):
    return await stub.SubmitFeedback(
        chat_pb2.FeedbackRequest(response_id=response_id, rating=chat_pb2.THUMBS_UP, user_id=user), timeout=30
    )


async def test_ids_of_the_signing_key_and_of_the_previous_key_in_its_grace_period_are_accepted(stub):
    answer = await stub.Chat(ask("hello", max_new_tokens=2), timeout=30)
    assert answer.response_id.startswith("k2.")
    assert (await rate(stub, answer.response_id)).event_id
    assert (await rate(stub, signed_by("k1"))).event_id


async def test_an_id_of_a_retired_key_is_refused_with_failed_precondition(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rate(stub, signed_by("k0"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "signed with key 'k0', retired at" in info.value.details()
    assert "no longer accepted" in info.value.details()


async def test_tampered_and_unknown_key_ids_are_refused_with_invalid_argument(stub):
    good = (await stub.Chat(ask("hi", max_new_tokens=2), timeout=30)).response_id
    forged_tag = good[:-1] + ("0" if good[-1] != "0" else "1")
    other_key = "k1" + good[2:]  # the id claims the previous key; its tag is k2's
    unknown = ResponseSigner([SigningKey("k9", b"x" * 32)]).issue("v000001")
    for response_id, fragment in (
        (forged_tag, "signature check failed"),
        (other_key, "signature check failed"),
        (unknown, "unknown signing key id 'k9'"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rate(stub, response_id)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, response_id
        assert fragment in info.value.details()
    assert (await rate(stub, good)).event_id  # the genuine id is still accepted after the refusals
