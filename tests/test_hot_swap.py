"""Hot swap and ModelAdmin against the real broker: new versions go live without a failed request, each
response comes from one version, corrupted versions are refused, and Rollback needs the admin token."""

import asyncio
import time

import grpc
import pytest

from rlhf_online.bootstrap import copy_model_files
from rlhf_online.broker.clients import make_producer, read_topic
from rlhf_online.engine.tiny_model import write_tiny_model
from rlhf_online.inference import metrics
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import admin_pb2, admin_pb2_grpc, chat_pb2_grpc, events_pb2
from rlhf_online.registry import Registry
from tests.test_inference_server import ask, config_for

pytestmark = pytest.mark.kafka

ADMIN = (("authorization", "Bearer admin-secret"),)


def publish_policy(registry: Registry, source_dir, parent: str) -> str:
    manifest = registry.publish(
        "policy", lambda tmp: copy_model_files(source_dir, tmp), parent_version=parent
    )
    return manifest.version


def announce(kafka_bootstrap: str, topic: str, version: str, action=events_pb2.PUBLISHED) -> None:
    producer = make_producer(kafka_bootstrap, client_id="test-trainer")
    event = events_pb2.ModelEvent(
        kind=events_pb2.POLICY, version=version, action=action, path=f"policy/{version}"
    )
    producer.send(topic, key=version.encode(), value=event.SerializeToString()).get(timeout=30)
    producer.close()


async def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def served(kafka_bootstrap, topics, tiny_model_dir, tmp_path):
    config = config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path)
    running = await create_server(config)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel, Registry(config.registry_dir)
    await channel.close()
    await running.stop(grace_s=1)


async def test_swap_under_load_fails_nothing_and_switches_once_per_client(
    served, kafka_bootstrap, topics, tmp_path
):
    running, channel, registry = served
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    new_dir = write_tiny_model(tmp_path / "candidate", seed=1)
    new_version = publish_policy(registry, new_dir, parent="v000001")
    versions: dict[int, list[str]] = {i: [] for i in range(6)}
    failures: list[Exception] = []

    async def client(i: int) -> None:
        while versions[i].count(new_version) < 3:
            try:
                if i % 2:
                    versions[i].append(
                        (await stub.Chat(ask(f"c{i}", max_new_tokens=6), timeout=60)).model_version
                    )
                else:
                    chunks = [c async for c in stub.ChatStream(ask(f"s{i}", max_new_tokens=6), timeout=60)]
                    versions[i].append(chunks[-1].model_version)
            except grpc.aio.AioRpcError as e:
                failures.append(e)
                return

    clients = [asyncio.create_task(client(i)) for i in range(6)]
    await wait_for(
        lambda: all(v.count("v000001") >= 2 for v in versions.values()), what="requests on v000001"
    )
    announce(kafka_bootstrap, topics.models, new_version)
    await asyncio.wait_for(asyncio.gather(*clients), timeout=120)
    assert failures == []
    for seen in versions.values():
        switch = seen.index(new_version)
        assert switch >= 2 and set(seen[:switch]) == {"v000001"} and set(seen[switch:]) == {new_version}
    assert running.engine.version == new_version


async def test_corrupted_version_is_refused_and_serving_continues(served, kafka_bootstrap, topics, tmp_path):
    running, channel, registry = served
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    bad = publish_policy(registry, write_tiny_model(tmp_path / "bad", seed=2), parent="v000001")
    weights = registry.path("policy", bad) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    refused_before = metrics.SWAP_FAILURES._value.get()
    announce(kafka_bootstrap, topics.models, bad)
    await wait_for(lambda: metrics.SWAP_FAILURES._value.get() > refused_before, what="the swap to be refused")
    reply = await stub.Chat(ask("still serving?", max_new_tokens=3), timeout=30)
    assert reply.model_version == "v000001" and running.engine.version == "v000001"


async def test_rollback_needs_the_token_and_restores_a_version_everywhere(
    served, kafka_bootstrap, topics, tmp_path
):
    running, channel, registry = served
    admin = admin_pb2_grpc.ModelAdminStub(channel)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    new_version = publish_policy(registry, write_tiny_model(tmp_path / "v2", seed=3), parent="v000001")
    announce(kafka_bootstrap, topics.models, new_version)
    await wait_for(lambda: running.engine.version == new_version, what="the swap")
    for metadata, code in [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.Rollback(admin_pb2.RollbackRequest(version="v000001"), metadata=metadata, timeout=30)
        assert info.value.code() == code
    assert running.engine.version == new_version
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await admin.Rollback(admin_pb2.RollbackRequest(version="v000099"), metadata=ADMIN, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    listed = await admin.ListVersions(admin_pb2.ListVersionsRequest(), metadata=ADMIN, timeout=30)
    assert [v.version for v in listed.versions] == [new_version, "v000001"] and listed.versions[0].serving
    reply = await admin.Rollback(admin_pb2.RollbackRequest(version="v000001"), metadata=ADMIN, timeout=60)
    assert (reply.version, reply.previous_version) == ("v000001", new_version)
    assert (await stub.Chat(ask("which?", max_new_tokens=2), timeout=30)).model_version == "v000001"
    assert registry.latest("policy") == "v000001"
    current = await admin.GetModel(admin_pb2.GetModelRequest(), metadata=ADMIN, timeout=30)
    assert current.version == "v000001" and current.serving
    events = [
        events_pb2.ModelEvent.FromString(r.value)
        for r in await asyncio.to_thread(read_topic, kafka_bootstrap, topics.models, min_records=2)
    ]
    assert (events[-1].version, events[-1].action) == ("v000001", events_pb2.ROLLED_BACK)
