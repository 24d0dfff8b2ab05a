"""Promise 1 against a real broker that goes away: SubmitFeedback answers UNAVAILABLE (never OK) while the
broker is down, chat keeps serving, and once the broker is back the user's retry is accepted and the answers
served during the outage reach the interactions topic."""

import asyncio
import socket
import time

import grpc
import pytest

from rlhf_online.broker.clients import read_topic
from rlhf_online.broker.local import start_broker, stop_broker
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from rlhf_online.topics import Topics
from tests.test_inference_server import ask, config_for

pytestmark = pytest.mark.kafka


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rate(response_id: str, user: str) -> chat_pb2.FeedbackRequest:
    return chat_pb2.FeedbackRequest(response_id=response_id, rating=chat_pb2.THUMBS_UP, user_id=user)


async def test_feedback_is_unavailable_while_the_broker_is_down(tiny_model_dir, tmp_path):
    home, ports = tmp_path / "kafka", {"port": _free_port(), "controller_port": _free_port()}
    topics = Topics("outage")
    bootstrap = await asyncio.to_thread(start_broker, home, partitions=2, topics=topics, **ports)
    config = config_for(bootstrap, topics, tiny_model_dir, tmp_path, feedback_ack_timeout_s=3.0)
    running = await create_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            first = await stub.Chat(ask("before", max_new_tokens=4), timeout=30)
            acked = [(await stub.SubmitFeedback(rate(first.response_id, "a"), timeout=30)).event_id]

            await asyncio.to_thread(stop_broker, home)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitFeedback(rate(first.response_id, "b"), timeout=20)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not stored" in info.value.details()
            during = await stub.Chat(ask("during the outage", max_new_tokens=4), timeout=30)
            assert running.events.pending >= 1  # held in the outbox, not dropped

            await asyncio.to_thread(start_broker, home, partitions=2, topics=topics, **ports)
            acked.append((await stub.SubmitFeedback(rate(first.response_id, "b"), timeout=30)).event_id)
            deadline = time.monotonic() + 120
            while running.events.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert running.events.pending == 0

        interactions = await asyncio.to_thread(read_topic, bootstrap, topics.interactions, min_records=2)
        served = {events_pb2.Interaction.FromString(r.value).response_id for r in interactions}
        assert {first.response_id, during.response_id} <= served
        feedback = await asyncio.to_thread(read_topic, bootstrap, topics.feedback, min_records=2)
        # The refused attempt may still have reached the broker later; it carries the same deterministic
        # event id as the accepted retry, so the reward service counts it once.
        assert {events_pb2.FeedbackEvent.FromString(r.value).event_id for r in feedback} == set(acked)
    finally:
        await running.stop(grace_s=1)
        await asyncio.to_thread(stop_broker, home)
