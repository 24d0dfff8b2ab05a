"""The trainer's canary trial: a passed version serves a share of traffic until the users' thumbs decide.

    runner = CanaryRunner(config.canary_config(), config.canary_share, registry, publisher, topics, bootstrap)
    runner.start(stable="v000003", canary_event=...)   # after publish_policy(..., set_latest=False)
    while runner.active:
        runner.step(timeout_ms=1000)                    # reads ratings, checks after each one and the clock

1. `start` assigns a consumer to every partition of `rlhf.feedback` at the trial's start time (so a restart
   of the read never counts a rating twice or misses one: `CanaryTrial` skips repeated event ids), then
   publishes the CANARY ModelEvent: every replica loads the canary and routes its share of users to it.
2. `step` feeds each FeedbackEvent of the two versions into the `CanaryTrial` (rlhf_online.canary.decision),
   which checks its sequential test after every rating; with no rating it ticks the trial's clock.
3. On a decision: the CanaryDecision goes to `rlhf.canary`, then to promote LATEST moves to the canary and a
   PROMOTED event follows; to roll back, a ROLLED_BACK event names the stable version (LATEST never moved).
   If LATEST moved during the trial (an operator's Rollback), nothing is carried out: that decision stands.

The decision lives in the trainer because the trainer is the one writer of LATEST and of policy events and
starts the next round only when the trial is over, from LATEST (stable or promoted).
"""

import logging

from google.protobuf.message import DecodeError
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from rlhf_online import contract
from rlhf_online.broker.clients import make_consumer, wait_for_partitions
from rlhf_online.canary.decision import PROMOTE, CanaryConfig, CanaryTrial, Decision
from rlhf_online.contract import POLICY, now_ms
from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2
from rlhf_online.registry import Registry
from rlhf_online.topics import Topics
from rlhf_online.trainer import metrics
from rlhf_online.trainer.publish import Publisher, canary_decision

log = logging.getLogger(__name__)


class CanaryRunner:
    """Runs one canary trial at a time for the trainer's loop thread (kafka-python is not thread-safe)."""

    def __init__(
        self,
        config: CanaryConfig,
        share: float,
        registry: Registry,
        publisher: Publisher,
        topics: Topics,
        bootstrap: str,
    ) -> None:
        self.config, self.share = config, share
        self.registry, self.publisher, self.topics, self.bootstrap = registry, publisher, topics, bootstrap
        self.trial: CanaryTrial | None = None
        self.decisions: list[Decision] = []  # every trial's, in order (for tests and logs)
        self._consumer: KafkaConsumer | None = None

    @property
    def active(self) -> bool:
        return self.trial is not None

    def start(self, stable: str, canary_event: events_pb2.ModelEvent) -> None:
        """Starts reading ratings from now, then announces the canary (the CANARY event)."""
        self._open(stable, canary_event.version, now_ms())
        self.publisher.model_event(canary_event)
        log.info(
            "canary trial of %s (%.0f%% of traffic) against %s started", canary_event.version,
            100 * self.share, stable,
        )  # fmt: skip

    def resume(self, last_policy_event: events_pb2.ModelEvent | None) -> bool:
        """Carries on the trial a stopped trainer left open, if the last policy event announced one.

        The replicas still serve that plan (they follow the events, not the trainer), so the trial goes on
        from its start: the ratings since the CANARY event are read again (`CanaryTrial` counts each event
        id once) and its clock still runs from then. Returns whether a trial was resumed.
        """
        event = last_policy_event
        if event is None or event.action != events_pb2.CANARY:
            return False
        stable = event.parent_version
        if self.registry.latest(POLICY) != stable:
            log.warning(
                "not resuming the canary trial of %s: LATEST is %s, not its stable version %s",
                event.version, self.registry.latest(POLICY), stable,
            )  # fmt: skip
            return False
        self._open(stable, event.version, event.timestamp_ms)
        log.info(
            "canary trial of %s against %s resumed (started at %d ms)",
            event.version,
            stable,
            event.timestamp_ms,
        )
        return True

    def _open(self, stable: str, canary: str, started_ms: int) -> None:
        self.trial = CanaryTrial(
            self.config, stable_version=stable, canary_version=canary, started_ms=started_ms
        )
        self._consumer = self._feedback_consumer(started_ms)
        metrics.CANARY_ACTIVE.set(1)
        metrics.record_trial(self.trial.figures())

    def step(self, timeout_ms: int) -> Decision | None:
        """Feeds the ratings that came in (waiting up to `timeout_ms`) to the trial; carries out its
        decision if one came; returns it."""
        if self.trial is None:
            return None
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms)
        except KafkaError as e:
            log.warning("reading %s for the canary trial failed, retrying: %s", self.topics.feedback, e)
            batches = {}
        decision = None
        for records in batches.values():
            for record in records:
                decision = decision or self._rate(record.value)
        decision = decision or self.trial.tick(now_ms())
        metrics.record_trial(self.trial.figures())
        if decision is not None:
            self._carry_out(decision)
        return decision

    def close(self) -> None:
        """Stops reading (a trial in progress stays as it is on the replicas; see docs/design.md)."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _feedback_consumer(self, started_ms: int) -> KafkaConsumer:
        """A consumer of every feedback partition, at the first rating accepted at or after `started_ms`."""
        consumer = make_consumer(self.bootstrap, group_id=None, client_id="trainer-canary")
        partitions = wait_for_partitions(consumer, self.topics.feedback)
        consumer.assign(partitions)
        found = consumer.offsets_for_times({tp: started_ms for tp in partitions})
        ends = consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, found[tp].offset if found.get(tp) is not None else ends[tp])
        return consumer

    def _rate(self, value: bytes) -> Decision | None:
        try:
            event = events_pb2.FeedbackEvent.FromString(value)
        except DecodeError as e:  # a garbled record must not stop the trial
            log.warning("skipping an unreadable FeedbackEvent: %s", e)
            return None
        up = event.rating == chat_pb2.THUMBS_UP
        if not up and event.rating != chat_pb2.THUMBS_DOWN:
            return None
        return self.trial.rate(event.model_version, up, event.timestamp_ms, event.event_id)

    def _carry_out(self, decision: Decision) -> None:
        """The CanaryDecision, then LATEST and the ModelEvent that serving follows; the trial is over."""
        self.trial = None
        self.decisions.append(decision)
        self.close()
        metrics.CANARY_ACTIVE.set(0)
        metrics.CANARY_DECISIONS.labels(decision.outcome, decision.code).inc()
        latest = self.registry.latest(POLICY)
        if latest != decision.stable_version:
            log.warning(
                "canary %s: serving moved from %s to %s during the trial; leaving it there (%s)",
                decision.canary_version, decision.stable_version, latest, decision.reason,
            )  # fmt: skip
            return
        self.publisher.canary_decision(canary_decision(decision, self.share))
        if decision.outcome == PROMOTE:
            self.registry.set_latest(POLICY, decision.canary_version)
            event = contract.model_event(
                POLICY, events_pb2.PROMOTED, decision.canary_version, parent_version=decision.stable_version
            )
        else:
            parent = self.registry.manifest(POLICY, decision.stable_version).parent_version
            event = contract.model_event(
                POLICY, events_pb2.ROLLED_BACK, decision.stable_version, parent_version=parent
            )
        self.publisher.model_event(event)
        log.info("canary %s: %s (%s)", decision.canary_version, decision.outcome, decision.reason)
