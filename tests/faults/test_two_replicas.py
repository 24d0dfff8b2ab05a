"""Fault scenario 5: two inference replicas on one broker and one registry, under load whose ratings go to
the other replica than the one that answered.

- Promise 5 and 4 on every replica: both swap to each version announced, and both refuse a version whose
  weights were flipped by one bit after its publish, and keep serving the version they have.
- Promise 7 across replicas: a rating sent to replica B for an answer of replica A is accepted (the signing
  key is shared) and stored once. A second vote by the same user on replica A is accepted too, since each
  replica keeps its own vote ledger, but it carries the same deterministic event id (a hash of response id
  and user), so it collapses to one event downstream: the reward service, run here, applies it once. That is
  enough: the id needs no state shared between replicas, the reward model sees each (answer, user) once, and
  a second vote cannot be told apart from a client's retry after a lost answer, which must not be refused.
"""

import asyncio
import time
from collections import Counter

import pytest

from rlhf_online import contract
from rlhf_online.bootstrap import copy_model_files
from rlhf_online.broker.clients import make_producer
from rlhf_online.contract import POLICY
from rlhf_online.engine.tiny_model import write_tiny_model
from rlhf_online.proto.rlhf.v1 import events_pb2
from tests.faults.audit import (
    Figures,
    Timeline,
    applied_events,
    audit_applied,
    audit_feedback,
    feedback_counts,
    wait_applied,
)
from tests.faults.load import LoadDriver

pytestmark = [pytest.mark.faults, pytest.mark.kafka]
SWAP_FAILURES = "rlhf_inference_swap_failures_total"


def publish_and_announce(cluster, source_dir, parent: str, *, flip_bit: bool = False) -> str:
    """A new policy version in the registry (one bit of its weights flipped after the publish, if asked),
    then its ModelEvent, as the trainer would send it."""
    manifest = cluster.registry.publish(
        POLICY, lambda tmp: copy_model_files(source_dir, tmp), parent_version=parent
    )
    if flip_bit:
        weights = cluster.registry.path(POLICY, manifest.version) / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    event = contract.model_event(POLICY, events_pb2.PUBLISHED, manifest.version, parent_version=parent)
    producer = make_producer(cluster.bootstrap, client_id="test-trainer")
    try:
        producer.send(
            cluster.topics.models, key=contract.model_event_key(event), value=event.SerializeToString()
        ).get(30)
    finally:
        producer.close(timeout=5)
    return manifest.version


def versions_seen(ledger) -> set[tuple[str, str]]:
    """(replica, model_version) of every answer."""
    return {(c.replica.split("#")[0], c.model_version) for c in ledger.chats if c.code == "OK"}


def answers_since(ledger, since: float, replica: str) -> int:
    return sum(c.code == "OK" and c.started_s > since and c.replica[0] == replica for c in ledger.chats)


async def wait_refused(procs, timeout_s: float) -> None:
    """Until every replica's metrics count one refused version (scraped: the only signal of a refusal)."""
    deadline = time.monotonic() + timeout_s
    while not all(p.metrics().get(SWAP_FAILURES, 0) >= 1 for p in procs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every replica refused the flipped version within {timeout_s:.0f}s")
        await asyncio.sleep(0.2)


async def swap_twice_then_refuse(cluster, driver, procs, tmp_path, timeline) -> tuple[str, float]:
    """Publishes two versions and waits for answers of each from every replica, then a version with a
    flipped bit, and waits until every replica refused it; returns the last good version and when."""
    parent = "v000001"
    for seed in (1, 2):
        version = publish_and_announce(cluster, write_tiny_model(tmp_path / f"seed{seed}", seed=seed), parent)
        await driver.ledger.wait_for(
            lambda seen, v=version: {("a", v), ("b", v)} <= versions_seen(seen), 120, f"{version} on both"
        )
        timeline.mark(f"{version} on both")
        parent = version
    flipped = publish_and_announce(
        cluster, write_tiny_model(tmp_path / "seed3", seed=3), parent, flip_bit=True
    )
    await wait_refused(procs, 120)
    timeline.mark(f"{flipped} refused by both")
    return parent, time.monotonic()


def vote_figures(figures: Figures, counts: Counter, refused_at: float) -> None:
    """The cross-replica figures: first votes, second votes and how they collapsed, versions served."""
    ledger = figures.ledger
    seconds = [r for r in ledger.ratings if r.second_vote]
    after = [c for c in ledger.chats if c.started_s > refused_at]
    figures.extra.update(
        {
            "first votes OK on the other replica": sum(
                r.ok and r.accepted_by[0] != r.served_by[0] for r in ledger.ratings if not r.second_vote
            ),
            "second votes on the answering replica": dict(Counter(r.codes[-1] for r in seconds)),
            "second votes collapsed (their event id stored once per accepted vote)": sum(
                r.ok and counts[r.event_id] >= 2 for r in seconds
            ),
            "distinct event ids / OK ratings": f"{len(counts)} / {sum(r.ok for r in ledger.ratings)}",
            "versions served": sorted(versions_seen(ledger)),
            "answers after the refusal": dict(Counter((c.replica, c.model_version) for c in after)),
        }
    )


@pytest.mark.timeout(360)
async def test_two_replicas_swap_together_refuse_a_flipped_bit_and_count_a_vote_once(cluster, tmp_path):
    timeline = Timeline()
    a, b, reward = cluster.inference("a"), cluster.inference("b"), cluster.reward()
    await cluster.start(a, b, reward)
    timeline.mark("serving")
    other = {"a": "b", "b": "a"}
    driver = LoadDriver(
        {"a": a, "b": b}, clients=4, max_ratings=400, think_s=0.2, rate_on=other.get, second_vote_every=3
    )
    load = asyncio.create_task(driver.run())
    try:
        await driver.ledger.more_oks(10, 120)
        good, refused_at = await swap_twice_then_refuse(cluster, driver, (a, b), tmp_path, timeline)
        await driver.ledger.wait_for(
            lambda seen: min(answers_since(seen, refused_at, r) for r in "ab") >= 5,
            120,
            "5 answers from each",
        )
    finally:
        driver.stop()
        ledger = await load
        print(f"[faults] scenario 5 timeline: {timeline}")
    for proc in (a, b):
        assert await cluster.stop(proc) == 0, proc.log_tail()
    await wait_applied(cluster.registry, {r.event_id for r in ledger.ratings if r.ok}, 120)
    assert await cluster.stop(reward) == 0, reward.log_tail()

    figures = Figures("5. two inference replicas on one broker", ledger)
    counts = await asyncio.to_thread(feedback_counts, cluster.bootstrap, cluster.topics)
    audit_feedback(figures, counts)
    audit_applied(figures, applied_events(cluster.registry))  # a collapsed second vote is applied once
    vote_figures(figures, counts, refused_at)
    figures.extra["timeline"] = timeline
    figures.show()
    firsts = [r for r in ledger.ratings if not r.second_vote]
    assert all(r.ok and r.accepted_by[0] != r.served_by[0] for r in firsts)  # B takes ratings of A's answers
    assert any(r.second_vote for r in ledger.ratings) and all(r.ok for r in ledger.ratings)
    assert len(counts) == len({r.event_id for r in ledger.ratings if r.ok})  # one event per (answer, user)
    after = [c for c in ledger.chats if c.started_s > refused_at]
    assert {c.model_version for c in after} == {good} and all(c.code == "OK" for c in after)
    figures.check()
