"""What a round leaves behind: a passed candidate in the registry and its policy ModelEvent on `rlhf.models`,
and, for every round, passed or not, one RoundEvent on `rlhf.rounds`.

    manifest = publish_policy(registry, result, tokenizer, parent_version=..., reward_version=...,
                              reference_version=...)
    publisher.model_event(policy_event(manifest, result))       # every replica swaps when it reads it
    publisher.round_event(round_event(record, events_pb2.PASSED, result=result))

Order for a passed round (promises 4 and 5 in docs/design.md): 1. the registry version (atomic, checksummed,
LATEST moves); 2. its ModelEvent, acks=all and retried; 3. the RoundEvent. A RoundEvent that cannot be
published is logged and counted and the loop goes on: it is the record that progress views and reports read,
not a step that serving waits for.

With a canary share (docs/design.md, canary trials) a passed candidate goes to the registry without moving
LATEST and is announced by a CANARY ModelEvent; the trial's end is a CanaryDecision on `rlhf.canary`, then a
PROMOTED (LATEST moved to the canary) or ROLLED_BACK (LATEST stays on stable) ModelEvent.
"""

import logging
import time
from dataclasses import dataclass, field

from kafka import KafkaProducer
from transformers import PreTrainedTokenizerBase

from rlhf_online import contract
from rlhf_online.canary.decision import PROMOTE, Decision
from rlhf_online.contract import CANARY_SHARE, POLICY, RoundFigure
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import Manifest, Registry
from rlhf_online.topics import Topics
from rlhf_online.trainer import metrics
from rlhf_online.trainer.policy import VALUE_HEAD_FILE
from rlhf_online.trainer.round import RoundResult

log = logging.getLogger(__name__)

# RoundEvent.gate_code of the rounds that never reached the gate's verdict.
_CODE = {events_pb2.FAILED: "error", events_pb2.ABANDONED: "abandoned"}
NEW_RATINGS = "new_ratings"  # extra RoundEvent figure: ratings applied since the last round's reward version


@dataclass
class RoundRecord:
    """What the service knows of one round as it goes; `round_event` turns it into the RoundEvent."""

    number: int  # 1-based within this trainer's life
    start_version: str  # policy LATEST when the round began
    reward_version: str  # the reward checkpoint that scores rollouts and the gate
    ratings_applied: int  # that checkpoint's RewardFigure.RATINGS_APPLIED
    new_ratings: int  # ratings_applied minus that of the reward version the last round used
    reference_version: str = ""  # known once the reference is loaded
    published_version: str = ""  # set once a passed candidate is in the registry
    started: float = field(default_factory=time.perf_counter)

    @property
    def name(self) -> str:
        """The round's name in logs, manifests and its RoundEvent: "round-000007"."""
        return f"round-{self.number:06d}"


def publish_policy(
    registry: Registry,
    result: RoundResult,
    tokenizer: PreTrainedTokenizerBase,
    *,
    parent_version: str,
    reward_version: str | None,
    reference_version: str,
    extra: dict | None = None,
    set_latest: bool = True,
) -> Manifest:
    """Publishes a candidate that passed the gate as the next policy version (atomic, checksummed); with
    `set_latest` False (a canary) LATEST stays where it is.

    Raises:
        ValueError: the candidate did not pass the gate (nothing is written).
    """
    if not result.decision.passed:
        raise ValueError(f"refusing to publish a policy that failed the gate: {result.decision.reason}")
    return registry.publish_model(
        POLICY,
        result.model,
        tokenizer,
        extra_files={VALUE_HEAD_FILE: result.value_head},
        parent_version=parent_version,
        metrics=result.metrics(),
        extra={
            "reward_version": reward_version,
            "reference_version": reference_version,
            "gate": {"reason": result.decision.reason, **result.decision.figures()},
            **(extra or {}),
        },
        set_latest=set_latest,
    )


def policy_event(manifest: Manifest, result: RoundResult) -> events_pb2.ModelEvent:
    """The ModelEvent that announces a published policy version, with the round's figures."""
    return contract.model_event(
        POLICY,
        events_pb2.PUBLISHED,
        manifest.version,
        parent_version=manifest.parent_version,
        metrics=result.metrics(),
    )


def canary_event(manifest: Manifest, result: RoundResult, share: float) -> events_pb2.ModelEvent:
    """The CANARY ModelEvent that starts a trial of a published version beside its parent (stable)."""
    return contract.model_event(
        POLICY,
        events_pb2.CANARY,
        manifest.version,
        parent_version=manifest.parent_version,
        metrics={**result.metrics(), CANARY_SHARE: share},
    )


def canary_decision(decision: Decision, share: float) -> events_pb2.CanaryDecision:
    """The CanaryDecision record of a trial's Decision (rlhf_online.canary.decision)."""
    f = decision.figures
    outcome = events_pb2.CANARY_PROMOTED if decision.outcome == PROMOTE else events_pb2.CANARY_ROLLED_BACK
    return events_pb2.CanaryDecision(
        stable_version=decision.stable_version, canary_version=decision.canary_version, outcome=outcome,
        code=decision.code, reason=decision.reason, canary_ratings=f.canary_ratings, canary_ups=f.canary_ups,
        stable_ratings=f.stable_ratings, stable_ups=f.stable_ups, canary_rate=f.canary_rate,
        stable_rate=f.stable_rate, difference=f.difference, lower=f.lower, upper=f.upper,
        p_value_margin=f.p_value_margin, p_value_equal=f.p_value_equal, alpha=decision.config.alpha,
        margin=decision.config.margin, started_ms=decision.started_ms, timestamp_ms=decision.decided_ms,
        canary_share=share,
    )  # fmt: skip


def round_event(
    record: RoundRecord, outcome: int, *, result: RoundResult | None = None, reason: str = ""
) -> events_pb2.RoundEvent:
    """The RoundEvent of a round that ended with `outcome`.

    Args:
        outcome: an `events_pb2.RoundOutcome`.
        result: the finished round (PASSED, REJECTED): its gate code, verdict and figures go in.
        reason: FAILED: the error; ABANDONED: why it was dropped.
    """
    figures = result.metrics() if result is not None else {}
    figures.setdefault(RoundFigure.ROUND_S, time.perf_counter() - record.started)
    figures[NEW_RATINGS] = float(record.new_ratings)
    return events_pb2.RoundEvent(
        round=record.number,
        name=record.name,
        outcome=outcome,
        start_version=record.start_version,
        published_version=record.published_version,
        reward_version=record.reward_version,
        reference_version=record.reference_version,
        gate_code=result.decision.code if result is not None else _CODE[outcome],
        gate_reason=result.decision.reason if result is not None else reason,
        metrics=figures,
        ratings_applied=record.ratings_applied,
        timestamp_ms=contract.now_ms(),
    )


class Publisher:
    """Sends the trainer's events with acks=all (the producer of `broker.clients.make_producer`)."""

    def __init__(self, producer: KafkaProducer, topics: Topics, *, timeout_s: float = 15.0) -> None:
        self.producer = producer
        self.topics = topics
        self.timeout_s = timeout_s

    def model_event(self, event: events_pb2.ModelEvent, attempts: int = 5) -> bool:
        """Publishes a ModelEvent, retrying; False when it gave up (the version is LATEST in the registry
        all the same, and replicas load it at their next start or the next event)."""
        for attempt in range(1, attempts + 1):
            try:
                self._send(self.topics.models, contract.model_event_key(event), event)
                return True
            except Exception as e:  # KafkaError, or a timeout of the future: retry
                log.warning(
                    "publishing ModelEvent %s failed (attempt %d/%d): %s", event.version, attempt, attempts, e
                )
                if attempt < attempts:
                    time.sleep(min(2.0 * attempt, 10.0))
        log.error("gave up publishing ModelEvent %s; it is LATEST in the registry", event.version)
        return False

    def canary_decision(self, event: events_pb2.CanaryDecision, attempts: int = 5) -> bool:
        """Publishes a CanaryDecision, retrying; False when it gave up (logged; the decision is carried out
        all the same: it is the record for views and reports, serving follows the ModelEvent)."""
        for attempt in range(1, attempts + 1):
            try:
                self._send(self.topics.canary, contract.canary_decision_key(), event)
                return True
            except Exception as e:  # KafkaError, or a timeout of the future: retry
                log.warning("publishing the CanaryDecision of %s failed (attempt %d/%d): %s",
                            event.canary_version, attempt, attempts, e)  # fmt: skip
                if attempt < attempts:
                    time.sleep(min(2.0 * attempt, 10.0))
        log.error("gave up publishing the CanaryDecision of %s", event.canary_version)
        return False

    def round_event(self, event: events_pb2.RoundEvent) -> bool:
        """Publishes a RoundEvent once; a failure is logged and counted, never raised."""
        try:
            self._send(self.topics.rounds, contract.round_event_key(), event)
            return True
        except Exception as e:  # the loop must go on whatever the broker does
            metrics.ROUND_EVENT_FAILURES.inc()
            log.warning(
                "could not publish the RoundEvent of %s (%s) to %s: %s",
                event.name,
                events_pb2.RoundOutcome.Name(event.outcome),
                self.topics.rounds,
                e,
            )
            return False

    def _send(self, topic: str, key: bytes, event) -> None:
        self.producer.send(topic, key=key, value=event.SerializeToString()).get(timeout=self.timeout_s)
