"""Fault scenario 3: the reward service SIGKILLed twice, each time inside a checkpoint publish, under live
chat and rating load through the inference service.

Promise 2: each rating is applied once per reward lineage. The checkpoint records the event ids it applied
and offsets are committed only after it, so what the killed process had applied since its last checkpoint is
replayed into the next one, and what that checkpoint already holds is skipped. The audit reads the last
checkpoint's applied events: every rating that got OK is in it exactly once; no rating was dead-lettered for
a missing interaction; every reward version verifies (the killed publishes left nothing partial).
"""

import asyncio

import pytest

from rlhf_online.contract import REWARD
from tests.faults.audit import (
    Figures,
    Timeline,
    applied_events,
    audit_applied,
    audit_feedback,
    audit_interactions,
    dead_letter_reasons,
    feedback_counts,
    interaction_ids,
    verify_all,
    wait_applied,
)
from tests.faults.cluster import kill_during_publish
from tests.faults.load import LoadDriver

pytestmark = [pytest.mark.faults, pytest.mark.kafka]


@pytest.mark.timeout(420)
async def test_reward_sigkill_during_checkpoints_applies_each_rating_once(cluster):
    timeline, kind_dir = Timeline(), cluster.registry.root / REWARD
    a, reward = cluster.inference("a"), cluster.reward()
    await cluster.start(a, reward)
    timeline.mark("serving")
    driver = LoadDriver({"a": a}, clients=4, max_ratings=600, think_s=1.0)
    load = asyncio.create_task(driver.run())
    caught, applied_at_kill = [], []
    try:
        for kill in (1, 2):
            await driver.ledger.more_oks(15, 120)  # each kill after the new process has taken ratings
            caught.append(await asyncio.to_thread(kill_during_publish, reward, kind_dir, 120))
            applied_at_kill.append(len(applied_events(cluster.registry)))
            timeline.mark(f"kill {kill} ({'LATEST' if 'LATEST' in caught[-1] else 'files'})")
            await cluster.start(reward)
            timeline.mark(f"restart {kill}")
        await driver.ledger.more_oks(20, 120)
    finally:
        driver.stop()
        ledger = await load
        print(f"[faults] scenario 3 timeline: {timeline}")
    assert await cluster.stop(a) == 0, a.log_tail()  # its outbox flushed: every Interaction is in
    ok_ids = {r.event_id for r in ledger.ratings if r.ok}
    await wait_applied(cluster.registry, ok_ids, 120)
    timeline.mark("all applied")
    assert await cluster.stop(reward) == 0, reward.log_tail()  # final checkpoint, offsets committed

    figures = Figures("3. reward service SIGKILLed twice during checkpoints", ledger)
    audit_applied(figures, applied_events(cluster.registry))
    audit_feedback(figures, await asyncio.to_thread(feedback_counts, cluster.bootstrap, cluster.topics))
    audit_interactions(figures, await asyncio.to_thread(interaction_ids, cluster.bootstrap, cluster.topics))
    dead = await asyncio.to_thread(dead_letter_reasons, cluster.bootstrap, cluster.topics)
    versions = verify_all(cluster.registry, REWARD)
    figures.extra.update(
        {
            "kills caught inside a publish": caught,
            "applied in the last whole checkpoint at each kill": applied_at_kill,
            "reward versions (all verify)": len(versions),
            "dead letters by reason": dict(dead),
            "timeline": timeline,
        }
    )
    figures.show()
    assert not dead, f"dead-lettered: {dict(dead)}"
    figures.check()
