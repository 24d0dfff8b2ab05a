"""Canary serving: the routing hash, the engine's two resident models, and replicas following CANARY,
PROMOTED and ROLLED_BACK events through the real broker (docs/design.md, promise 3)."""

import asyncio

import pytest

from rlhf_online.broker.clients import make_producer
from rlhf_online.contract import CANARY_SHARE, POLICY, model_event, model_event_key
from rlhf_online.engine.engine import PolicyEngine, SamplingParams, canary_route, load_policy
from rlhf_online.engine.tiny_model import write_tiny_model
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from tests.test_hot_swap import publish_policy, served, wait_for  # noqa: F401 (served is a fixture)

USERS = [f"user-{i}" for i in range(40)]


def test_route_is_stable_per_user_and_the_share_is_about_right():
    routes = [canary_route(f"u{i}", "v000002") for i in range(4000)]
    assert routes == [canary_route(f"u{i}", "v000002") for i in range(4000)]
    assert all(0.0 <= r < 1.0 for r in routes)
    share = sum(r < 0.1 for r in routes) / len(routes)
    assert 0.08 < share < 0.12  # 4000 users: sd of the share 0.005
    other_trial = [canary_route(f"u{i}", "v000003") < 0.1 for i in range(4000)]
    assert other_trial != [r < 0.1 for r in routes]  # each trial samples other users


def test_engine_routes_by_user_promotes_and_withdraws(tiny_model_dir, tmp_path):
    engine = PolicyEngine.from_pretrained(tiny_model_dir, "v000001", max_batch_size=8)
    engine.start()
    try:
        engine.start_canary(load_policy(write_tiny_model(tmp_path / "c", seed=1)), "v000002", 0.5)
        assert engine.canary == ("v000002", 0.5)

        def answer(user: str) -> str:
            ids = engine.encode_chat([("user", f"hi {user}")])
            return engine.submit(ids, SamplingParams(3, 0.0, 1.0), route_key=user).result(60).model_version

        expected = {u: "v000002" if canary_route(u, "v000002") < 0.5 else "v000001" for u in USERS}
        assert {u: answer(u) for u in USERS} == expected
        assert set(expected.values()) == {"v000001", "v000002"}
        with pytest.raises(ValueError, match="stable version"):
            engine.start_canary(load_policy(tiny_model_dir), "v000001", 0.5)
        engine.end_canary()
        assert engine.canary is None and {answer(u) for u in USERS[:8]} == {"v000001"}
        engine.start_canary(load_policy(write_tiny_model(tmp_path / "d", seed=2)), "v000003", 0.2)
        assert not engine.promote_canary("v000002") and engine.promote_canary("v000003")
        assert engine.version == "v000003" and engine.canary is None
        assert {answer(u) for u in USERS[:8]} == {"v000003"}
    finally:
        engine.stop()


def announce(kafka_bootstrap: str, topic: str, event: events_pb2.ModelEvent) -> None:
    producer = make_producer(kafka_bootstrap, client_id="test-trainer")
    producer.send(topic, key=model_event_key(event), value=event.SerializeToString()).get(timeout=30)
    producer.close()


async def versions_by_user(stub, users) -> dict[str, set[str]]:
    """Two answers per user, 16 at a time; the versions each user got."""
    limit = asyncio.Semaphore(16)

    async def one(user: str, i: int) -> tuple[str, str]:
        request = chat_pb2.ChatRequest(
            messages=[chat_pb2.Message(role="user", content=f"hello {i}")],
            user_id=user,
            params=chat_pb2.GenerationParams(max_new_tokens=3),
        )
        async with limit:
            return user, (await stub.Chat(request, timeout=60)).model_version

    seen: dict[str, set[str]] = {u: set() for u in users}
    for user, version in await asyncio.gather(*(one(u, i) for u in users for i in range(2))):
        seen[user].add(version)
    return seen


@pytest.mark.kafka
async def test_replica_follows_canary_promoted_and_rolled_back(served, kafka_bootstrap, topics, tmp_path):  # noqa: F811
    running, channel, registry = served
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    canary = publish_policy(registry, write_tiny_model(tmp_path / "c", seed=1), parent="v000001")
    registry.set_latest(POLICY, "v000001")  # a canary does not move LATEST
    start = model_event(
        POLICY, events_pb2.CANARY, canary, parent_version="v000001", metrics={CANARY_SHARE: 0.3}
    )
    announce(kafka_bootstrap, topics.models, start)
    await wait_for(lambda: running.engine.canary == (canary, 0.3), what="the canary to load")

    seen = await versions_by_user(stub, USERS)
    assert all(len(v) == 1 for v in seen.values())  # a user stays on one version
    on_canary = {u for u, v in seen.items() if v == {canary}}
    assert on_canary == {u for u in USERS if canary_route(u, canary) < 0.3}
    assert 0 < len(on_canary) < len(USERS) and running.engine.version == "v000001"

    announce(
        kafka_bootstrap,
        topics.models,
        model_event(POLICY, events_pb2.PROMOTED, canary, parent_version="v000001"),
    )
    await wait_for(lambda: running.engine.version == canary, what="the promotion")
    assert running.engine.canary is None
    assert set().union(*(await versions_by_user(stub, USERS[:10])).values()) == {canary}

    second = publish_policy(registry, write_tiny_model(tmp_path / "d", seed=2), parent=canary)
    start = model_event(POLICY, events_pb2.CANARY, second, parent_version=canary, metrics={CANARY_SHARE: 0.5})
    announce(kafka_bootstrap, topics.models, start)
    await wait_for(lambda: running.engine.canary is not None, what="the second canary")
    announce(kafka_bootstrap, topics.models, model_event(POLICY, events_pb2.ROLLED_BACK, canary))
    await wait_for(lambda: running.engine.canary is None, what="the canary to be withdrawn")
    assert running.engine.version == canary
    assert set().union(*(await versions_by_user(stub, USERS[:10])).values()) == {canary}


@pytest.mark.kafka
async def test_canary_without_a_share_is_refused(served, kafka_bootstrap, topics, tmp_path):  # noqa: F811
    running, _, registry = served
    canary = publish_policy(registry, write_tiny_model(tmp_path / "c", seed=1), parent="v000001")
    assert not running.follower.apply(model_event(POLICY, events_pb2.CANARY, canary))
    assert running.engine.canary is None and running.engine.version == "v000001"
