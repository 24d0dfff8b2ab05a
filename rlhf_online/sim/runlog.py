"""A run's records: what was served, rated, published and decided, read from the Kafka topics.

Every figure the demo and the report show comes from typed records built here, at one boundary from the
protobuf messages on the wire (events_pb2):

- `Served` from each Interaction (rlhf.interactions), `Rated` from each FeedbackEvent (rlhf.feedback);
- `ModelChange` from each ModelEvent (rlhf.models): policy and reward versions published, rollbacks, canary
  trials started (CANARY) and canaries promoted (PROMOTED);
- `Round` from each RoundEvent (rlhf.rounds): every PPO round, passed, rejected, failed or abandoned;
- `Trial` from each CanaryDecision (rlhf.canary): how a canary trial ended, with its figures;
- `Judged` from the simulator's outcomes file: the hidden judge's P(up) of each answer.

Figures inside `metrics` maps are read by their contract names (`RewardFigure`, `RoundFigure`,
`CANARY_SHARE`), never by aliases.

A version goes live for all traffic when it is PUBLISHED or, after a canary trial, PROMOTED
(`ModelChange.is_published`); a CANARY serves only a share of the users while its trial runs.
"""

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_online.broker.clients import read_topic
from rlhf_online.contract import CANARY_SHARE, RoundFigure, kind_name
from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)

# ModelChange.action (events_pb2.ModelAction's names); PROMOTED and ROLLED_BACK are also Trial.outcome.
PUBLISHED, ROLLED_BACK, CANARY, PROMOTED = "published", "rolled_back", "canary", "promoted"
LIVE_ACTIONS = (PUBLISHED, PROMOTED)  # the version now serves all traffic
PASSED, REJECTED, FAILED, ABANDONED = "passed", "rejected", "failed", "abandoned"  # Round.outcome
OUTCOMES = (PASSED, REJECTED, FAILED, ABANDONED)


def _figure(metrics: Mapping[str, float], name: str) -> float | None:
    """metrics[name] if it is there and finite (a NaN figure draws nothing)."""
    value = metrics.get(name)
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Served:
    """One served answer (from an Interaction)."""

    response_id: str
    model_version: str
    timestamp_ms: int


@dataclass(frozen=True)
class Rated:
    """One accepted rating (from a FeedbackEvent)."""

    event_id: str
    response_id: str
    model_version: str
    up: bool
    timestamp_ms: int


@dataclass(frozen=True)
class ModelChange:
    """One version change (from a ModelEvent)."""

    kind: str  # POLICY | REWARD
    action: str  # PUBLISHED | ROLLED_BACK | CANARY | PROMOTED
    version: str
    parent_version: str
    timestamp_ms: int
    metrics: Mapping[str, float] = field(default_factory=dict)  # RewardFigure / RoundFigure names

    def figure(self, name: str) -> float | None:
        return _figure(self.metrics, name)

    def is_published(self, kind: str) -> bool:
        """A version of `kind` that went live for all traffic: PUBLISHED, or a canary PROMOTED."""
        return self.kind == kind and self.action in LIVE_ACTIONS

    @property
    def is_canary(self) -> bool:
        """A policy version that starts a canary trial (serving `share` of the users beside its parent)."""
        return self.action == CANARY

    @property
    def share(self) -> float | None:
        """The canary's share of traffic (CANARY events only)."""
        return self.figure(CANARY_SHARE)


@dataclass(frozen=True)
class Round:
    """One PPO round as the trainer reported it (from a RoundEvent)."""

    round: int  # 1-based within the trainer's life
    name: str
    outcome: str  # one of OUTCOMES
    timestamp_ms: int  # when it ended
    start_version: str = ""
    published_version: str = ""  # set when PASSED
    reward_version: str = ""
    gate_code: str = ""  # "passed", "no_improvement", "kl_too_large", ...
    gate_reason: str = ""  # the gate's verdict or the error, in words
    ratings_applied: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)  # RoundFigure names

    def figure(self, name: str) -> float | None:
        return _figure(self.metrics, name)

    @property
    def reward_mean(self) -> float | None:
        return self.figure(RoundFigure.REWARD_MEAN)

    @property
    def kl(self) -> float | None:
        return self.figure(RoundFigure.KL_PER_RESPONSE)


@dataclass(frozen=True)
class Trial:
    """How one canary trial ended, with the trainer's figures (from a CanaryDecision)."""

    stable_version: str
    canary_version: str
    outcome: str  # PROMOTED | ROLLED_BACK ("unknown" for a value this build does not know)
    code: str  # "non_inferior", "inferior", "timed_out_ratings", "timed_out_seconds"
    reason: str
    started_ms: int
    timestamp_ms: int  # when it was decided
    canary_ratings: int = 0
    canary_ups: int = 0
    stable_ratings: int = 0
    stable_ups: int = 0
    canary_rate: float = 0.0
    stable_rate: float = 0.0
    difference: float = 0.0  # canary_rate - stable_rate
    lower: float = 0.0  # the always-valid (1 - alpha) confidence sequence on p_canary - p_stable
    upper: float = 0.0
    alpha: float = 0.0
    margin: float = 0.0  # non-inferiority margin, thumbs-up rate
    canary_share: float = 0.0

    @property
    def ratings(self) -> int:
        """Ratings of both arms the decision rests on."""
        return self.canary_ratings + self.stable_ratings


@dataclass(frozen=True)
class Judged:
    """The hidden judge's P(up) for one served answer (from the simulator's outcomes)."""

    model_version: str
    timestamp_ms: int
    p_up: float


@dataclass
class RunData:
    """Everything a report is drawn from."""

    served: list[Served] = field(default_factory=list)
    ratings: list[Rated] = field(default_factory=list)
    models: list[ModelChange] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    judged: list[Judged] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)

    def dedup(self) -> "RunData":
        """Drops replayed ratings (same event_id) and sorts everything by time (stable: topic order kept)."""
        seen, ratings = set(), []
        for r in sorted(self.ratings, key=lambda r: r.timestamp_ms):
            if r.event_id not in seen:
                seen.add(r.event_id)
                ratings.append(r)
        return RunData(
            served=sorted(self.served, key=lambda s: s.timestamp_ms),
            ratings=ratings,
            models=sorted(self.models, key=lambda m: m.timestamp_ms),
            rounds=sorted(self.rounds, key=lambda r: r.timestamp_ms),
            judged=sorted(self.judged, key=lambda j: j.timestamp_ms),
            trials=sorted(self.trials, key=lambda t: t.timestamp_ms),
        )

    def t0(self) -> int:
        """The earliest time of any record (0 when there is none): the origin of the time axes."""
        times = [s.timestamp_ms for s in self.served] + [r.timestamp_ms for r in self.ratings]
        times += [m.timestamp_ms for m in self.models] + [j.timestamp_ms for j in self.judged]
        times += [r.timestamp_ms for r in self.rounds] + [t.started_ms for t in self.trials]
        return min(times, default=0)


# ------------------------------------------------------------------------------------- protos -> records


def _enum_name(enum, value: int) -> str:
    """events_pb2.PASSED -> "passed"; a value this build does not know -> "unknown"."""
    try:
        return enum.Name(value).lower()
    except ValueError:
        return "unknown"


def served(message: events_pb2.Interaction) -> Served:
    return Served(message.response_id, message.model_version, message.timestamp_ms)


def rated(message: events_pb2.FeedbackEvent) -> Rated | None:
    """The rating, or None for a record without a thumb (RATING_UNSPECIFIED)."""
    if message.rating not in (chat_pb2.THUMBS_UP, chat_pb2.THUMBS_DOWN):
        return None
    up = message.rating == chat_pb2.THUMBS_UP
    return Rated(message.event_id, message.response_id, message.model_version, up, message.timestamp_ms)


def model_change(message: events_pb2.ModelEvent) -> ModelChange:
    return ModelChange(
        kind_name(message.kind),
        _enum_name(events_pb2.ModelAction, message.action),
        message.version,
        message.parent_version,
        message.timestamp_ms,
        dict(message.metrics),
    )


def trial(message: events_pb2.CanaryDecision) -> Trial:
    """The decision; its outcome named as the ModelEvent that carries it out (PROMOTED, ROLLED_BACK)."""
    outcome = _enum_name(events_pb2.CanaryOutcome, message.outcome).removeprefix("canary_")
    return Trial(
        stable_version=message.stable_version,
        canary_version=message.canary_version,
        outcome=outcome if outcome in (PROMOTED, ROLLED_BACK) else "unknown",
        code=message.code,
        reason=message.reason,
        started_ms=message.started_ms,
        timestamp_ms=message.timestamp_ms,
        canary_ratings=message.canary_ratings,
        canary_ups=message.canary_ups,
        stable_ratings=message.stable_ratings,
        stable_ups=message.stable_ups,
        canary_rate=message.canary_rate,
        stable_rate=message.stable_rate,
        difference=message.difference,
        lower=message.lower,
        upper=message.upper,
        alpha=message.alpha,
        margin=message.margin,
        canary_share=message.canary_share,
    )


def round_record(message: events_pb2.RoundEvent) -> Round:
    return Round(
        round=message.round,
        name=message.name,
        outcome=_enum_name(events_pb2.RoundOutcome, message.outcome),
        timestamp_ms=message.timestamp_ms,
        start_version=message.start_version,
        published_version=message.published_version,
        reward_version=message.reward_version,
        gate_code=message.gate_code,
        gate_reason=message.gate_reason,
        ratings_applied=message.ratings_applied,
        metrics=dict(message.metrics),
    )


def from_protos(
    interactions: Iterable = (),
    feedback: Iterable = (),
    model_events: Iterable = (),
    rounds: Iterable = (),
    decisions: Iterable = (),
) -> RunData:
    """The one boundary from protobuf messages (events_pb2) to records; `decisions` are CanaryDecisions."""
    ratings = [r for r in (rated(f) for f in feedback) if r is not None]
    return RunData(
        served=[served(i) for i in interactions],
        ratings=ratings,
        models=[model_change(m) for m in model_events],
        rounds=[round_record(r) for r in rounds],
        trials=[trial(d) for d in decisions],
    )


# ------------------------------------------------------------------------------------------------ loading

# Each topic of a run and the message its records carry.
TOPIC_MESSAGES = (
    ("interactions", events_pb2.Interaction),
    ("feedback", events_pb2.FeedbackEvent),
    ("models", events_pb2.ModelEvent),
    ("rounds", events_pb2.RoundEvent),
    ("canary", events_pb2.CanaryDecision),
)
OPTIONAL_TOPICS = ("canary",)  # a deployment from before canary trials has no such topic


def parse_records(records: Iterable, message_type, *, topic: str = "", since_ms: int = 0) -> list:
    """The messages of Kafka records, skipping garbled ones (the DLQ's business, not the report's)."""
    out = []
    for record in records:
        try:
            message = message_type.FromString(record.value or b"")
        except Exception:  # DecodeError and the like
            log.warning("skipping unparsable record %s[%d]@%d", topic, record.partition, record.offset)
            continue
        if message.timestamp_ms >= since_ms:
            out.append(message)
    return out


def load_from_kafka(bootstrap: str, topics: Topics, *, since_ms: int = 0, timeout_s: float = 60.0) -> RunData:
    """Reads the five topics of a run from the beginning (no consumer group) into records.

    Raises:
        TimeoutError: the broker did not answer, or a topic other than OPTIONAL_TOPICS does not exist.
    """
    messages = {}
    for attr, message_type in TOPIC_MESSAGES:
        topic = getattr(topics, attr)
        try:
            records = read_topic(bootstrap, topic, timeout_s=timeout_s)
        except TimeoutError as e:
            if attr not in OPTIONAL_TOPICS:
                raise
            log.warning("reporting without %s: %s", topic, e)
            records = []
        messages[attr] = parse_records(records, message_type, topic=topic, since_ms=since_ms)
    m = messages
    return from_protos(m["interactions"], m["feedback"], m["models"], m["rounds"], m["canary"])


def load_outcomes(path: str | Path) -> list[Judged]:
    """The hidden judge's P(up) of each answer, from the simulator's JSON lines (`--outcomes-path`)."""
    judged = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("model_version") and row.get("p_up") is not None:
            judged.append(Judged(row["model_version"], int(row["started_ms"]), float(row["p_up"])))
    return judged


def save_rounds(rounds: Iterable[Round], path: str | Path) -> None:
    """The rounds as JSON lines (the fields of `Round`): a run folder keeps them past topic retention."""
    lines = [json.dumps(asdict(r)) + "\n" for r in rounds]
    Path(path).write_text("".join(lines), encoding="utf-8")


def load_rounds(path: str | Path) -> list[Round]:
    """Rounds written by `save_rounds` (the demo's rounds.jsonl)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Round(**{k: row[k] for k in Round.__dataclass_fields__ if k in row}) for row in rows]
