"""Fault scenario 2: the broker SIGKILLed and started again mid-load (a broker of the matrix's own).

Promise 1: every rating that got OK is in the feedback topic (by event id); a rating refused with UNAVAILABLE
while the broker was away is retried by its client and then counts once (the retry carries the same event
id). Chat goes on through the outbox meanwhile; every answer's Interaction arrives once the broker is back.
"""

import asyncio

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


@pytest.mark.timeout(360)
async def test_broker_sigkill_and_restart_loses_no_acknowledged_rating(own_cluster, own_broker):
    cluster, timeline = own_cluster, Timeline()
    a = cluster.inference("a", **{"--feedback-ack-timeout-s": "3"})
    await cluster.start(a)
    timeline.mark("serving")
    driver = LoadDriver({"a": a}, clients=4, max_ratings=200, retry_for_s=90)
    load = asyncio.create_task(driver.run())
    try:
        await driver.ledger.wait_for(lambda seen: seen.oks("rating") >= 25, 120, "25 acknowledged ratings")
        await asyncio.to_thread(own_broker.kill)
        timeline.mark("broker killed")
        await driver.ledger.wait_for(
            lambda seen: seen.codes("rating")["UNAVAILABLE"] >= 4, 60, "ratings refused while it is down"
        )
        answered_down = driver.ledger.oks("chat")
        await asyncio.to_thread(own_broker.start)  # the same home and ports: its log is recovered
        answered_down = driver.ledger.oks("chat") - answered_down
        timeline.mark("broker back")
        await driver.ledger.more_oks(20, 120)
        timeline.mark("20 more OK")
    finally:
        driver.stop()
        ledger = await load
    timeline.mark("load done")
    assert await cluster.stop(a) == 0, a.log_tail()  # SIGTERM flushes the outbox
    timeline.mark("stopped")

    figures = Figures("2. broker SIGKILLed and restarted mid-load", ledger)
    audit_feedback(figures, await asyncio.to_thread(feedback_counts, cluster.bootstrap, cluster.topics))
    interactions = await asyncio.to_thread(interaction_ids, cluster.bootstrap, cluster.topics)
    audit_interactions(figures, interactions)
    figures.extra["answers while the broker restarted"] = answered_down
    figures.extra["ratings OK after UNAVAILABLE (retried)"] = sum(
        r.ok and "UNAVAILABLE" in r.codes for r in ledger.ratings
    )
    figures.extra["interaction copies"] = interactions.total() - len(interactions)
    figures.extra["timeline"] = timeline
    figures.show()
    assert figures.extra["ratings OK after UNAVAILABLE (retried)"] > 0
    assert figures.extra["answers without an Interaction"] == 0
    figures.check()
