"""Fault scenario 1: the inference service SIGKILLed mid-load and started again.

Promise 1 and the join it feeds: every rating that got OK is in the feedback topic, and the Interaction of
the answer it rates is in the interactions topic (so the reward service can join it; none is dead-lettered
for a missing interaction). An Interaction waits in the process's in-memory outbox for a few milliseconds
after its answer; SubmitFeedback of that answer waits for it (events.py `wait_background`), so a rating is
never acknowledged while its Interaction can still die with the process.
"""

import asyncio

import pytest

from tests.faults.audit import Figures, audit_feedback, audit_interactions, feedback_counts, interaction_ids
from tests.faults.load import LoadDriver

pytestmark = [pytest.mark.faults, pytest.mark.kafka]


@pytest.mark.timeout(360)
async def test_inference_sigkill_loses_no_interaction_of_an_acknowledged_rating(cluster):
    a = cluster.inference("a")
    await cluster.start(a)
    driver = LoadDriver({"a": a}, clients=4, max_ratings=150)
    load = asyncio.create_task(driver.run())
    try:
        await driver.ledger.wait_for(lambda seen: seen.oks("rating") >= 25, 120, "25 acknowledged ratings")
        # The worst moment: a rating sent right after its answer, its Interaction likely still in the outbox.
        await driver.ledger.wait_for(lambda seen: seen.in_flight("rating") > 0, 60, "a rating in flight")
        await cluster.kill(a)
        await cluster.start(a)
        await driver.ledger.wait_for(
            lambda seen: seen.accepted_by("a#2") >= 25, 120, "25 ratings OK after the kill"
        )
    finally:
        driver.stop()
        ledger = await load
    assert await cluster.stop(a) == 0, a.log_tail()  # SIGTERM flushes the second incarnation's outbox

    figures = Figures("1. inference SIGKILLed mid-load", ledger)
    audit_feedback(figures, await asyncio.to_thread(feedback_counts, cluster.bootstrap, cluster.topics))
    audit_interactions(figures, await asyncio.to_thread(interaction_ids, cluster.bootstrap, cluster.topics))
    across = [r for r in ledger.ratings if r.served_by == "a#1" and r.accepted_by == "a#2"]
    figures.extra["ratings of a#1's answers OK'd by a#2 (retried across the kill)"] = len(across)
    figures.extra["ratings cut by the kill"] = sum(
        "a#1" in r.tried_on and not r.accepted_by.startswith("a#1") for r in ledger.ratings
    )
    figures.show()
    assert {r.accepted_by for r in ledger.ratings if r.ok} == {"a#1", "a#2"}
    figures.check()
