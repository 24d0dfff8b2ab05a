"""SubmitFeedback waits for the broker's acknowledgement without holding a thread (events.py): ratings are
answered while the event loop's default executor cannot run anything. The real broker and server.

Promise 1 itself (UNAVAILABLE, never OK, while the broker is down) is tested in test_feedback_outage.py.
"""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from rlhf_online.broker.clients import read_topic
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc
from tests.test_inference_server import config_for

pytestmark = pytest.mark.kafka


async def test_ratings_are_acknowledged_while_every_executor_thread_is_busy(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path
):
    config = config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path, feedback_burst=100)
    running = await create_server(config)
    loop = asyncio.get_running_loop()
    executor, release = ThreadPoolExecutor(max_workers=1), threading.Event()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            response_id = running.chat.signer.issue(running.engine.version)

            def rate(user: str):
                request = chat_pb2.FeedbackRequest(
                    response_id=response_id, rating=chat_pb2.THUMBS_UP, user_id=user
                )
                return stub.SubmitFeedback(request, timeout=60)

            await rate("first")  # the topic's metadata, fetched once in a worker thread
            loop.set_default_executor(executor)
            blocked = loop.run_in_executor(None, release.wait)  # the executor's only thread, held
            replies = await asyncio.gather(*(rate(f"user{i}") for i in range(32)))
            assert not blocked.done()  # nothing else could have run in the executor meanwhile
            assert len({r.event_id for r in replies}) == 32
    finally:
        release.set()
    records = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.feedback, min_records=33)
    assert len(records) == 33
    await running.stop(grace_s=1)
