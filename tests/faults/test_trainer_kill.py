"""Fault scenario 4: the trainer SIGKILLed inside a policy publish, with the whole loop running (inference,
reward service, trainer) under chat and rating load.

Promise 4: a version is whole or invisible. After the kill, every policy version the registry lists verifies
and LATEST points at one of them (a half-written version stays a hidden temp folder, which the next publish
clears); serving never stopped; the trainer started again carries on, and its next version is swapped in.
"""

import asyncio

import pytest

from rlhf_online.contract import POLICY
from rlhf_online.trainer.triggers import version_number
from tests.faults.audit import (
    Figures,
    Timeline,
    audit_feedback,
    audit_interactions,
    feedback_counts,
    interaction_ids,
    verify_all,
)
from tests.faults.cluster import kill_during_publish
from tests.faults.load import LoadDriver

pytestmark = [pytest.mark.faults, pytest.mark.kafka]


@pytest.mark.timeout(420)
async def test_trainer_sigkill_during_publish_leaves_no_partial_version(cluster):
    timeline, registry = Timeline(), cluster.registry
    a, reward, trainer = cluster.inference("a"), cluster.reward(), cluster.trainer()
    await cluster.start(a, reward, trainer)
    timeline.mark("serving")
    driver = LoadDriver({"a": a}, clients=4, max_ratings=600, think_s=0.5)
    load = asyncio.create_task(driver.run())
    try:
        caught = await asyncio.to_thread(kill_during_publish, trainer, registry.root / POLICY, 240)
        timeline.mark(f"trainer killed ({'LATEST' if 'LATEST' in caught else 'files'})")
        at_kill = verify_all(registry, POLICY)  # whole or invisible, LATEST one of them
        latest_at_kill = registry.latest(POLICY)
        await cluster.start(trainer)
        timeline.mark("trainer restarted")
        newest = version_number(at_kill[-1])
        await driver.ledger.wait_for(
            lambda seen: any(version_number(c.model_version) > newest for c in seen.chats),
            180,
            f"an answer of a version newer than {at_kill[-1]}",
        )
        timeline.mark("a newer version serving")
    finally:
        driver.stop()
        ledger = await load
        print(f"[faults] scenario 4 timeline: {timeline}")
    for proc in (trainer, reward, a):
        assert await cluster.stop(proc) == 0, proc.log_tail()

    figures = Figures("4. trainer SIGKILLed during a publish", ledger)
    audit_feedback(figures, await asyncio.to_thread(feedback_counts, cluster.bootstrap, cluster.topics))
    audit_interactions(figures, await asyncio.to_thread(interaction_ids, cluster.bootstrap, cluster.topics))
    versions = verify_all(registry, POLICY)
    served = sorted({c.model_version for c in ledger.chats if c.code == "OK"})
    figures.extra.update(
        {
            "kill caught inside a publish": caught,
            "versions at the kill (all verify)": at_kill,
            "LATEST at the kill": latest_at_kill,
            "versions at the end (all verify)": versions,
            "versions served": served,
            "timeline": timeline,
        }
    )
    figures.show()
    after = [v for v in versions if v not in at_kill]
    assert after and registry.manifest(POLICY, after[0]).parent_version == latest_at_kill  # carried on
    assert ledger.codes("chat").keys() == {"OK"}, "serving must not stop while the trainer dies"
    figures.check()
