"""Fault scenario 6: the broker paused (SIGSTOP) mid-load and resumed (SIGCONT): the slow broker, at its
slowest (a broker of the matrix's own).

- Chat does not wait for the broker: its Interactions go to the outbox, so every answer during the pause is
  served (the figures show its latency against the steady state; not asserted: timings on this shared
  machine are not reproducible).
- Promise 1: a rating during the pause is refused with UNAVAILABLE, by the server, within its deadline (the
  server waits at most --feedback-ack-timeout-s, 2 s here, for a 5 s client deadline), never left to expire.
- After the resume nothing is lost: every OK rating is in the feedback topic, every Interaction arrives.
"""

import asyncio
import statistics
import time

import pytest

from tests.faults.audit import (
    Figures,
    Timeline,
    audit_feedback,
    audit_interactions,
    feedback_counts,
    interaction_ids,
)
from tests.faults.load import LoadDriver

pytestmark = [pytest.mark.faults, pytest.mark.kafka]
RATING_DEADLINE_S = 5.0
PAUSE_S = 12.0  # longer than the producers' delivery timeouts, so their expiry and recovery paths run


def latency(calls) -> str:
    """p50 and p95 of the calls' latencies, in ms."""
    ms = sorted(c.latency_s * 1000 for c in calls)
    if len(ms) < 2:
        return f"{len(ms)} calls"
    p = statistics.quantiles(ms, n=20)
    return f"p50 {statistics.median(ms):.0f} ms, p95 {p[18]:.0f} ms ({len(ms)} calls)"


def attempts_within(ledger, start: float, end: float) -> list[tuple[str, float]]:
    """(status, seconds) of the rating attempts sent and answered between `start` and `end`."""
    return [
        (code, took)
        for r in ledger.ratings
        for code, sent, took in zip(r.codes, r.sent_s, r.took_s)  # noqa: B905 - the last may be in flight
        if start <= sent and sent + took <= end
    ]


def chats_within(ledger, start: float, end: float) -> list:
    return [c for c in ledger.chats if start <= c.started_s and c.started_s + c.latency_s <= end]


def paused_long_enough(ledger, paused_at: float) -> bool:
    """PAUSE_S seconds, in which 8 rating attempts were answered and 10 chats."""
    now = time.monotonic()
    return (
        now - paused_at >= PAUSE_S
        and len(attempts_within(ledger, paused_at, now)) >= 8
        and len(chats_within(ledger, paused_at, now)) >= 10
    )


@pytest.mark.timeout(360)
async def test_paused_broker_keeps_chat_serving_and_refuses_ratings_in_time(own_cluster, own_broker):
    cluster, timeline = own_cluster, Timeline()
    a = cluster.inference("a", **{"--feedback-ack-timeout-s": "2"})
    await cluster.start(a)
    timeline.mark("serving")
    driver = LoadDriver(
        {"a": a}, clients=4, max_ratings=300, think_s=0.2, rating_timeout_s=RATING_DEADLINE_S, retry_for_s=90
    )
    load = asyncio.create_task(driver.run())
    try:
        await driver.ledger.more_oks(20, 120)
        own_broker.pause()
        paused_at = time.monotonic()
        timeline.mark("broker paused")
        try:
            await driver.ledger.wait_for(
                lambda seen: paused_long_enough(seen, paused_at), 90, "a pause long and busy enough"
            )
        finally:
            own_broker.resume()
            resumed_at = time.monotonic()
            timeline.mark("broker resumed")
        await driver.ledger.more_oks(20, 120)
        timeline.mark("20 more OK")
    finally:
        driver.stop()
        ledger = await load
        print(f"[faults] scenario 6 timeline: {timeline}")
    assert await cluster.stop(a) == 0, a.log_tail()

    figures = Figures("6. broker paused (SIGSTOP) and resumed", ledger)
    audit_feedback(figures, await asyncio.to_thread(feedback_counts, cluster.bootstrap, cluster.topics))
    audit_interactions(figures, await asyncio.to_thread(interaction_ids, cluster.bootstrap, cluster.topics))
    paused = attempts_within(ledger, paused_at, resumed_at)
    during = chats_within(ledger, paused_at, resumed_at)
    figures.extra.update(
        {
            "chat latency before the pause": latency(chats_within(ledger, 0, paused_at)),
            "chat latency during the pause": latency(during),
            "rating attempts during the pause": f"{len(paused)}, the slowest answered in "
            f"{max(t for _, t in paused):.2f} s (deadline {RATING_DEADLINE_S:.0f} s)",
            "ratings OK after UNAVAILABLE (retried after the resume)": sum(
                r.ok and "UNAVAILABLE" in r.codes for r in ledger.ratings
            ),
            "timeline": timeline,
        }
    )
    figures.show()
    assert during and all(c.code == "OK" for c in during), "chat must be served while the broker is paused"
    assert {code for code, _ in paused} == {"UNAVAILABLE"}, "ratings refused in time, never OK nor expired"
    assert figures.extra["answers without an Interaction"] == 0
    figures.check()
