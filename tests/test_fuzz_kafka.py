"""Hostile records on every topic a Kafka consumer of rlhf-online reads, through the real broker, with the
services in-process: the reward service (`rlhf.interactions`, `rlhf.feedback`), the trainer
(`rlhf.interactions` for its prompt pool, `rlhf.models` for reward checkpoints) and the inference follower
(`rlhf.models`).

Each test produces one batch: good records, then garbage (random bytes, truncated and bit-flipped protobufs,
messages of the wrong type, well-formed messages with hostile values, records with no key or no value, records
near the broker's 1 MB limit), then good records again, and checks once: nothing crashed; the reward service
dead-lettered every record it could not use with its reason and applied every good rating exactly once; the
trainer and the follower skipped and counted every bad record and still took the good event after them.
The records come from hypothesis (derandomized, no example database, no shrinking: generation only).

    .venv/bin/pytest -q tests/test_fuzz_kafka.py
"""

import asyncio
import math
import random
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from rlhf_online.bootstrap import copy_model_files
from rlhf_online.broker.clients import make_producer, read_topic
from rlhf_online.contract import (
    CANARY_SHARE,
    POLICY,
    REWARD,
    RewardFigure,
    model_event,
    model_event_key,
    now_ms,
)
from rlhf_online.inference import metrics as inference_metrics
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from rlhf_online.registry import Registry
from rlhf_online.reward import checkpoint
from rlhf_online.reward.records import BadRecord, parse_feedback, parse_interaction
from rlhf_online.reward.service import create_service as create_reward
from rlhf_online.reward.synthetic import synthetic_examples, to_events
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.service import create_service as create_trainer
from tests.test_inference_server import ask, config_for
from tests.test_reward_service import make_config as reward_config

pytestmark = pytest.mark.kafka

GENERATE = settings(  # the body only collects records: nothing to shrink, and every run is the same
    phases=[Phase.generate],
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
BAD_PER_TOPIC = 100
HUGE = 900_000  # bytes: a record the broker takes (its limit is 1 MiB)
INT64 = st.integers(-(2**63), 2**63 - 1)
TIMESTAMPS = st.one_of(INT64, st.integers(0, 2 * 10**12), st.sampled_from([0, -1, 2**63 - 1]))

# ---- records ----------------------------------------------------------------------------------------------

text = st.text(max_size=24)
version_names = st.one_of(text, st.sampled_from(["v000001", "v999999", "", "../policy/v000001", "v1"]))
messages = st.lists(st.builds(chat_pb2.Message, role=text, content=text), max_size=3)
interactions = st.builds(
    events_pb2.Interaction, response_id=text, messages=messages, prompt=text, response=text,
    model_version=text, timestamp_ms=TIMESTAMPS, user_id=text, finish_reason=text,
)  # fmt: skip
feedbacks = st.builds(
    events_pb2.FeedbackEvent, event_id=text, response_id=text, user_id=text, model_version=text,
    rating=st.one_of(st.sampled_from([1, 2]), st.integers(-(2**31), 2**31 - 1)), timestamp_ms=TIMESTAMPS,
)  # fmt: skip
figure_names = st.sampled_from([RewardFigure.RATINGS_APPLIED, CANARY_SHARE]) | text
model_events = st.builds(
    events_pb2.ModelEvent, version=version_names, parent_version=text, path=text, timestamp_ms=TIMESTAMPS,
    kind=st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1)),
    action=st.one_of(st.sampled_from(events_pb2.ModelAction.values()), st.integers(-(2**31), 2**31 - 1)),
    metrics=st.dictionaries(figure_names, st.floats()),
)  # fmt: skip
round_events = st.builds(
    events_pb2.RoundEvent, round=INT64, name=text, outcome=st.integers(0, 4), start_version=version_names,
    gate_reason=text, ratings_applied=INT64, timestamp_ms=TIMESTAMPS,
)  # fmt: skip
any_message = st.one_of(interactions, feedbacks, model_events, round_events).map(
    lambda m: m.SerializeToString()
)


def _cut(data: bytes, share: float) -> bytes:
    return data[: int(len(data) * share)]


def _flip(data: bytes, positions: list[int]) -> bytes:
    flipped = bytearray(data)
    for p in positions:
        flipped[p % len(flipped)] ^= 1 << (p % 8)
    return bytes(flipped)


values = st.one_of(
    st.none(),  # a tombstone
    st.binary(max_size=300),
    any_message,  # of this topic's type with hostile values, or of another topic's type
    st.builds(_cut, any_message, st.floats(0, 1, exclude_max=True)),
    st.builds(_flip, any_message.filter(len), st.lists(st.integers(0, 10**6), min_size=1, max_size=4)),
)
keys = st.one_of(st.none(), st.binary(max_size=24))
records = st.tuples(keys, values).filter(lambda kv: kv != (None, None))  # kafka-python needs one of the two


def draw(strategy, n: int, batch_seed: int) -> list:
    """`n` examples of `strategy`, the same every run (another `batch_seed`: other examples)."""
    drawn = []

    @seed(batch_seed)
    @settings(GENERATE, max_examples=n)
    @given(strategy)
    def collect(example):
        drawn.append(example)

    collect()
    return drawn


def huge_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def send_all(producer, batch: list[tuple[str, bytes | None, bytes | None]]) -> list:
    """Sends (topic, key, value) in order; the RecordMetadata of each, once the broker has them all."""
    futures = [producer.send(topic, key=key, value=value) for topic, key, value in batch]
    producer.flush()
    return [f.get(timeout=30) for f in futures]


# ---- the reward service -----------------------------------------------------------------------------------


def reward_refusal(topic_side: str, value: bytes | None, timestamp_ms: int) -> str | None:
    """The reason the reward service must give for a record it cannot use, or None for a usable one."""
    parse = parse_interaction if topic_side == "interactions" else parse_feedback
    try:
        parse(value, timestamp_ms)
    except BadRecord as e:
        return str(e)
    return None


def fixed_reward_records(topics) -> list[tuple[str, bytes | None, bytes | None, str]]:
    """Bad records written by hand, with a fragment of the reason each must get: (topic, key, value, why)."""
    now = now_ms()
    ahead = events_pb2.FeedbackEvent(
        event_id="ahead/u1", response_id="ahead", rating=1, user_id="u1", timestamp_ms=2**63 - 1
    )
    ahead_interaction = events_pb2.Interaction(response_id="ahead-i", prompt="p", timestamp_ms=now + 10**9)
    long_id = events_pb2.FeedbackEvent(event_id="e" * HUGE, rating=1, timestamp_ms=now)
    # An Interaction read as a FeedbackEvent: its messages make a response_id, its prompt no rating.
    wrong_type = events_pb2.Interaction(
        response_id="r", messages=[chat_pb2.Message(role="user", content="hi")]
    )
    return [
        (topics.interactions, b"tomb", None, "empty record value"),
        (topics.interactions, None, b"\xff\x00 not a protobuf", "cannot parse rlhf.v1.Interaction"),
        (topics.interactions, None, huge_bytes(HUGE, 1), "cannot parse rlhf.v1.Interaction"),
        (topics.interactions, b"ahead-i", ahead_interaction.SerializeToString(), "ahead"),
        (topics.feedback, b"tomb", None, "empty record value"),
        (topics.feedback, None, wrong_type.SerializeToString(), "rating 0"),
        (topics.feedback, None, huge_bytes(HUGE, 2), "cannot parse rlhf.v1.FeedbackEvent"),
        (topics.feedback, b"k" * 1000, huge_bytes(1_046_000, 3), "cannot parse rlhf.v1.FeedbackEvent"),
        (topics.feedback, None, long_id.SerializeToString(), "has no response_id"),
        (topics.feedback, b"ahead", ahead.SerializeToString(), "ahead"),
    ]


def good_pairs(topics, n: int):
    """n good ratings and their interactions, stamped now, keyed by response_id; one prompt is 900 KB."""
    examples = synthetic_examples(n, seed=11, prefix="fuzz")
    pairs = []
    for i, ex in enumerate(examples):
        interaction, feedback = to_events(ex, timestamp_ms=now_ms())
        if i == 0:
            interaction.prompt = "x" * HUGE
        key = ex.response_id.encode()
        pairs.append(
            ((topics.interactions, key, interaction.SerializeToString()),
             (topics.feedback, key, feedback.SerializeToString()))
        )  # fmt: skip
    return examples, pairs


def reward_batch(topics, pairs) -> tuple[list, list[str | None], list[bool]]:
    """Good records around the garbage, both ways round (interaction before and rating after it, and the
    reverse). Returns the batch, the hand-written reason fragment of each (None: not written by hand), and
    which records are good."""
    half = len(pairs) // 2
    before = [i for i, _ in pairs[:half]] + [f for _, f in pairs[half:]]
    after = [f for _, f in pairs[:half]] + [i for i, _ in pairs[half:]]
    garbage = [
        (topic, key, value)
        for i, topic in enumerate((topics.interactions, topics.feedback))
        for key, value in draw(records, BAD_PER_TOPIC, batch_seed=i)
    ]
    fixed = fixed_reward_records(topics)
    batch = before + garbage + [r[:3] for r in fixed] + after
    why = [None] * (len(before) + len(garbage)) + [r[3] for r in fixed] + [None] * len(after)
    good = [True] * len(before) + [False] * (len(garbage) + len(fixed)) + [True] * len(after)
    return batch, why, good


def test_the_reward_service_dead_letters_every_bad_record_and_applies_every_good_one_once(
    kafka_bootstrap, topics, tmp_path, tiny_model_dir
):
    examples, pairs = good_pairs(topics, 24)
    batch, why, is_good = reward_batch(topics, pairs)
    config = reward_config(kafka_bootstrap, topics, tmp_path, tiny_model_dir, join_ttl_s=600.0)
    service = create_reward(config)
    service.start()
    try:
        producer = make_producer(kafka_bootstrap, client_id="test-fuzz-reward")
        sent = send_all(producer, batch)
        producer.close()
        side = {topics.interactions: "interactions", topics.feedback: "feedback"}
        expected = {}  # (topic, partition, offset) -> (key, value, reason)
        for (topic, key, value), meta, fragment in zip(batch, sent, why, strict=True):
            reason = reward_refusal(side[topic], value, meta.timestamp)
            if fragment is not None:
                assert reason is not None and fragment in reason, (fragment, reason)
            if reason is not None:
                expected[(topic, meta.partition, meta.offset)] = (key, value, reason)
        good_ids = {ex.event_id for ex in examples}
        done = service.wait_until(
            lambda s: all(s.learner.seen(e) for e in good_ids) and s.dead_letters >= len(expected), 120
        )
        assert done, (service.error, service.dead_letters, len(expected), service.examples_applied)
        assert service.running and service.error is None
    finally:
        service.stop()
    assert service.error is None

    # Every bad record is on the dead-letter topic, with its bytes and its reason; no good one is.
    dead = {}
    for r in read_topic(kafka_bootstrap, topics.dlq, min_records=len(expected), timeout_s=60):
        letter = events_pb2.DeadLetter.FromString(r.value)
        dead[(letter.source_topic, letter.partition, letter.offset)] = letter
    for place, (key, value, reason) in expected.items():
        letter = dead.get(place)
        assert letter is not None, (place, reason)
        assert letter.reason.startswith(reason), (letter.reason, reason)
        assert letter.key == (key or b"")
        assert letter.value == (value or b"") or (value.startswith(letter.value) and "cut" in letter.reason)
    good_places = {
        (t, m.partition, m.offset) for (t, _, _), m, g in zip(batch, sent, is_good, strict=True) if g
    }
    assert not good_places & set(dead)
    # Each good rating was applied exactly once, the 900 KB prompt's included.
    ids = Counter(checkpoint.applied_event_ids(Registry(config.registry_dir).verify(REWARD, service.version)))
    assert all(ids[e] == 1 for e in good_ids), [e for e in good_ids if ids[e] != 1]


# ---- the trainer ------------------------------------------------------------------------------------------


def parsed(cls, value: bytes | None):
    """`value` as a `cls`, or None if it is not one."""
    if value is None:
        return None
    try:
        return cls.FromString(value)
    except Exception:
        return None


def trainer_verdict(topic: str, topics, value: bytes | None, reward_versions: set[str]) -> str:
    """What the trainer must do with a record: "bad" (skip and count), "prompt" (pool it) or "ignore"."""
    if topic == topics.interactions:
        event = parsed(events_pb2.Interaction, value)
        return "bad" if event is None or not (event.prompt or event.messages) else "prompt"
    event = parsed(events_pb2.ModelEvent, value)
    if event is None or event.kind not in (events_pb2.POLICY, events_pb2.REWARD):
        return "bad"
    if event.kind != events_pb2.REWARD or event.action != events_pb2.PUBLISHED:
        return "ignore"
    figure = event.metrics.get(RewardFigure.RATINGS_APPLIED, 0.0)
    return "reward" if event.version in reward_versions and math.isfinite(figure) else "bad"


def trainer_config(kafka_bootstrap, topics, registry: Registry) -> TrainerConfig:
    """A trainer whose ratings trigger never fires: the test watches its intake only."""
    return TrainerConfig(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=topics.prefix, registry_dir=str(registry.root),
        grpc_port=0, consumer_group=f"trainer-{topics.prefix}", min_new_ratings=10**9, round_interval_s=0,
        poll_interval_s=0.2,
    )  # fmt: skip


def trainer_batch(topics, good_event: events_pb2.ModelEvent) -> list[tuple[str, bytes | None, bytes | None]]:
    """Garbage on both of the trainer's topics, a 900 KB prompt among it, then the good reward event."""
    huge_prompt = events_pb2.Interaction(response_id="huge", prompt="y" * HUGE, timestamp_ms=now_ms())
    batch = [(topics.interactions, k, v) for k, v in draw(records, BAD_PER_TOPIC, batch_seed=2)]
    batch += [(topics.models, k, v) for k, v in draw(records, BAD_PER_TOPIC, batch_seed=3)]
    batch += [
        (topics.interactions, None, huge_bytes(HUGE, 4)),
        (topics.interactions, b"huge", huge_prompt.SerializeToString()),
        (topics.models, None, huge_bytes(HUGE, 5)),
        (topics.models, b"reward", b""),  # an empty ModelEvent: kind unspecified
        (topics.models, model_event_key(good_event), good_event.SerializeToString()),
    ]
    return batch


def test_the_trainer_skips_and_counts_bad_records_and_still_takes_the_good_ones(
    kafka_bootstrap, topics, tmp_path
):
    registry = Registry(tmp_path / "registry")
    trainer = create_trainer(trainer_config(kafka_bootstrap, topics, registry))
    counted_before = {t: bad_counted(t) for t in (topics.interactions, topics.models)}
    trainer.start()
    try:
        assert trainer.reward_version is None
        # What the reward service does: a checkpoint in the registry (no round runs: its files do not
        # matter), then its ModelEvent, here after the garbage.
        reward = registry.publish(REWARD, lambda tmp: (tmp / "weights").write_bytes(b"w")).version
        good = model_event(REWARD, events_pb2.PUBLISHED, reward, metrics={RewardFigure.RATINGS_APPLIED: 7})
        batch = trainer_batch(topics, good)
        verdicts = Counter(trainer_verdict(t, topics, v, {reward}) for t, _, v in batch)
        assert verdicts["reward"] == 1, "the hostile records must not name the good reward version"
        producer = make_producer(kafka_bootstrap, client_id="test-fuzz-trainer")
        send_all(producer, batch)
        producer.close()
        done = wait(lambda: trainer.reward_version == reward and trainer.bad_records >= verdicts["bad"], 60)
        assert done, (trainer.reward_version, trainer.bad_records, verdicts)
        assert trainer.bad_records == verdicts["bad"]
        counted = sum(bad_counted(t) - n for t, n in counted_before.items())
        assert counted == verdicts["bad"]  # for Prometheus too, by topic
        assert trainer.prompts_in_pool == verdicts["prompt"] and trainer.new_ratings == 7
        assert health(trainer.grpc_port) == health_pb2.HealthCheckResponse.SERVING
    finally:
        trainer.stop()


def bad_counted(topic: str) -> float:
    return REGISTRY.get_sample_value("rlhf_trainer_bad_records_total", {"topic": topic}) or 0.0


def wait(predicate, timeout_s: float) -> bool:
    """Polls `predicate` until it holds; False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


# ---- the inference follower -------------------------------------------------------------------------------


def follower_verdict(value: bytes | None, serving: str, new: str) -> str:
    """ "bad" (skipped and counted), "refused" (a policy event it cannot serve: SWAP_FAILURES), "ignore", or
    "new" (the good event)."""
    event = parsed(events_pb2.ModelEvent, value)
    if event is None or event.kind not in (events_pb2.POLICY, events_pb2.REWARD):
        return "bad"
    if event.kind == events_pb2.REWARD:
        return "ignore"
    if event.version == new:
        return "new"
    # A CANARY of the serving version, with a share not in (0, 1), or of a version not in the registry.
    if event.action == events_pb2.CANARY:
        return "refused"
    return "ignore" if event.version == serving else "refused"


async def test_the_follower_skips_and_counts_bad_records_and_still_swaps_to_the_good_version(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path
):
    config = config_for(kafka_bootstrap, topics, tiny_model_dir, tmp_path)
    running = await create_server(config)
    try:
        registry = Registry(config.registry_dir)
        new = registry.publish(POLICY, lambda tmp: copy_model_files(tiny_model_dir, tmp)).version
        good = model_event(POLICY, events_pb2.PUBLISHED, new)
        huge_version = events_pb2.ModelEvent(
            kind=events_pb2.POLICY, action=events_pb2.PUBLISHED, version="v" * HUGE
        )
        batch = [(k, v) for k, v in draw(records, BAD_PER_TOPIC, batch_seed=4)]
        batch += [
            (None, huge_bytes(HUGE, 6)),
            (b"policy", b""),
            (None, huge_version.SerializeToString()),
            (model_event_key(good), good.SerializeToString()),
        ]
        verdicts = Counter(follower_verdict(v, "v000001", new) for _, v in batch)
        assert verdicts["new"] == 1
        refused_before = inference_metrics.SWAP_FAILURES._value.get()
        bad_before = inference_metrics.FOLLOWER_BAD_RECORDS._value.get()
        producer = make_producer(kafka_bootstrap, client_id="test-fuzz-follower")
        send_all(producer, [(topics.models, k, v) for k, v in batch])
        producer.close()
        follower = running.follower
        await wait_async(
            lambda: running.engine.version == new and follower.bad_records >= verdicts["bad"], 60
        )
        assert follower.bad_records == verdicts["bad"]
        assert inference_metrics.FOLLOWER_BAD_RECORDS._value.get() - bad_before == verdicts["bad"]
        assert inference_metrics.SWAP_FAILURES._value.get() - refused_before == verdicts["refused"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            reply = await chat_pb2_grpc.ChatServiceStub(channel).Chat(
                ask("still there?", max_new_tokens=2), timeout=60
            )
        assert reply.model_version == new
    finally:
        await running.stop(grace_s=1)


async def wait_async(predicate, timeout_s: float) -> None:
    """Polls `predicate` until it holds; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)
