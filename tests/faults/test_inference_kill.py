"""Fault scenario 1: the inference service SIGKILLed mid-load and started again; 1b: SIGKILLed while its
outbox still drains the Interactions of a broker pause.

Promise 1 and the join it feeds: every rating that got OK is in the feedback topic, and the Interaction of
every answer a client got (rated or not) is in the interactions topic, so the reward service can join it.
Two mechanisms together:
- the outbox journal (inference/journal.py, `--outbox-dir`): an Interaction is on local disk before its
  answer leaves, and the next incarnation on that journal sends what the killed one left unsent; a rating
  of such an answer, retried on the next incarnation (or on another replica), is joined once it arrives;
- SubmitFeedback of an answer still in this process's outbox waits for its Interaction's ack
  (events.py `wait_background`), so the feedback topic never runs far ahead of the interactions topic.

The kill lands while a rating is in flight, right after its answer: the worst moment. In steady state an
Interaction is sent before its rating arrives; after a broker outage the outbox backs off and drains a
backlog for seconds, and 1b kills the process in that window, with dozens of Interactions unsent.
"""

import asyncio
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


@pytest.mark.timeout(360)
async def test_inference_sigkill_loses_no_interaction_of_an_acknowledged_rating(cluster):
    timeline, a = Timeline(), cluster.inference("a")
    await cluster.start(a)
    timeline.mark("serving")
    driver = LoadDriver({"a": a}, clients=4, max_ratings=150)
    load = asyncio.create_task(driver.run())
    try:
        await driver.ledger.wait_for(lambda seen: seen.oks("rating") >= 25, 120, "25 acknowledged ratings")
        # The worst moment: a rating sent right after its answer, its Interaction likely still in the outbox.
        await driver.ledger.wait_for(lambda seen: seen.in_flight("rating") > 0, 60, "a rating in flight")
        await cluster.kill(a)
        timeline.mark("killed")
        await cluster.start(a)
        timeline.mark("restarted")
        await driver.ledger.wait_for(
            lambda seen: seen.accepted_by("a#2") >= 25, 120, "25 ratings OK after the kill"
        )
    finally:
        driver.stop()
        ledger = await load
        timeline.mark("load done")
    assert await cluster.stop(a) == 0, a.log_tail()  # SIGTERM flushes the second incarnation's outbox

    figures = Figures("1. inference SIGKILLed mid-load", ledger)
    audit_feedback(figures, await asyncio.to_thread(feedback_counts, cluster.bootstrap, cluster.topics))
    interactions = await asyncio.to_thread(interaction_ids, cluster.bootstrap, cluster.topics)
    audit_interactions(figures, interactions)
    figures.extra["ratings of a#1's answers retried and OK'd by a#2"] = sum(
        r.served_by == "a#1" and r.accepted_by == "a#2" for r in ledger.ratings
    )
    figures.extra["Interactions a#1 left in its journal, sent by a#2"] = sum(a.journal_replays())
    figures.extra["timeline"] = timeline
    figures.show()
    assert ledger.accepted_by("a#1") and ledger.accepted_by("a#2")
    figures.check()  # a#1 acknowledged no rating whose Interaction it then lost


@pytest.mark.timeout(360)
async def test_inference_sigkill_while_its_outbox_drains_loses_no_interaction_of_an_acknowledged_rating(
    own_cluster, own_broker
):
    cluster, timeline = own_cluster, Timeline()
    a = cluster.inference("a", **{"--feedback-ack-timeout-s": "2"})
    await cluster.start(a)
    timeline.mark("serving")
    driver = LoadDriver({"a": a}, clients=4, max_ratings=300, think_s=0.2, retry_for_s=60)
    load = asyncio.create_task(driver.run())
    try:
        await driver.ledger.more_oks(10, 120)
        own_broker.pause()
        paused_at = time.monotonic()
        try:  # longer than the outbox producer's delivery timeout (10 s): its records expire, it backs off
            await driver.ledger.wait_for(lambda _: time.monotonic() - paused_at > 11, 60, "an 11 s pause")
        finally:
            own_broker.resume()
            timeline.mark("broker resumed")
        resumed, oks = time.monotonic(), driver.ledger.oks("rating")
        await driver.ledger.wait_for(  # the first rating the broker takes again, or 2 s
            lambda seen: seen.oks("rating") > oks or time.monotonic() - resumed > 2, 60, "a rating"
        )
        await cluster.kill(a)  # while the outbox (in backoff, 0-5 s) still holds the pause's Interactions
        timeline.mark("killed")
        pending_at_kill = driver.ledger.oks("rating")
        await cluster.start(a)
        timeline.mark("restarted")
        await driver.ledger.more_oks(10, 120)
    finally:
        driver.stop()
        ledger = await load
        timeline.mark("load done")
    assert await cluster.stop(a) == 0, a.log_tail()

    figures = Figures("1b. inference SIGKILLed while its outbox drains a broker pause", ledger)
    audit_feedback(figures, await asyncio.to_thread(feedback_counts, cluster.bootstrap, cluster.topics))
    interactions = await asyncio.to_thread(interaction_ids, cluster.bootstrap, cluster.topics)
    audit_interactions(figures, interactions)
    figures.extra["ratings OK at the kill"] = pending_at_kill
    figures.extra["Interactions a#1 left in its journal, sent by a#2"] = sum(a.journal_replays())
    figures.extra["timeline"] = timeline
    figures.show()
    figures.check()  # a#1 acknowledged no rating whose Interaction it then lost
