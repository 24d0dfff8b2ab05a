"""Simulated users over TGI's HTTP protocol (`simulate --protocol tgi`) against a real inference server (tiny
model, gRPC and TGI ports 0, the real broker): answers through /generate and /generate_stream, ratings of
them accepted over gRPC, every acknowledged rating in the feedback topic."""

import asyncio

import pytest

from rlhf_online.broker.clients import read_topic
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.sim.config import SimulateConfig
from rlhf_online.sim.simulate import simulate
from rlhf_online.sim.tgi_chat import TgiChat
from tests.test_inference_server import config_for

pytestmark = pytest.mark.kafka


@pytest.fixture
async def served(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    running = await create_server(config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path, tgi_port=0))
    yield running
    await running.stop(grace_s=1)


async def test_users_chat_over_tgi_and_rate_over_grpc(served, kafka_bootstrap, topics, tiny_model_dir):
    config = SimulateConfig(
        target=f"127.0.0.1:{served.port}", protocol="tgi", tgi_target=f"http://127.0.0.1:{served.tgi_port}",
        tokenizer_dir=str(tiny_model_dir), judge="contains", max_requests=12, duration_s=0,
        concurrency=3, users=5, stream_share=0.5, max_new_tokens=8, seed=3,
    )  # fmt: skip
    summary = await simulate(config)

    assert summary.requests == 12 and summary.errors == {}, summary.to_json()
    assert summary.rated == 12 and summary.feedback_refused == 0
    records = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.feedback, min_records=12)
    events = [events_pb2.FeedbackEvent.FromString(r.value) for r in records]
    assert len({e.event_id for e in events}) == 12
    assert {e.model_version for e in events} == {"v000001"}
    interactions = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.interactions, min_records=12)
    prompts = [events_pb2.Interaction.FromString(r.value).prompt for r in interactions]
    # the users rendered the chat template themselves, as a TGI client must
    assert all(p.startswith("<|user|>\n") and p.endswith("<|assistant|>\n") for p in prompts)


async def test_tgi_chat_refusal_is_an_error_not_a_rating(served):
    chat = TgiChat(f"http://127.0.0.1:{served.tgi_port}")
    try:
        with pytest.raises(Exception, match="HTTP 422"):
            await chat.answer("hello", "u1", {"max_new_tokens": 10_000}, stream=False)
        got = await chat.answer("hello", "u1", {"max_new_tokens": 4, "do_sample": False}, stream=True)
        assert got["response_id"] and got["model_version"] == "v000001"
        assert got["finish_reason"] in ("stop", "length") and got["completion_tokens"] <= 4
    finally:
        await chat.close()
