"""Every name the processes share, defined once: model kinds, event builders, figure names, the clock.

The services talk only through Kafka records and the registry, so the names on both sides must be the same
strings. They live here and nowhere else (see docs/design.md, "The public contract"):

- model kinds: `POLICY`, `REWARD` (registry folders, ModelEvent.kind, Kafka keys);
- `model_event(...)` and `model_event_key(...)`: the only way a ModelEvent is built and keyed;
- `round_event_key()`: the key of every RoundEvent on `rlhf.rounds`;
- `canary_decision_key()`: the key of every CanaryDecision on `rlhf.canary`; `CANARY_SHARE`: the figure of a
  CANARY ModelEvent that says the canary's share of traffic;
- `RewardFigure` and `RoundFigure`: the figure names that publishers write into `metrics` maps and that the
  demo, the report and the trainer read (no alias lists anywhere);
- `now_ms()`: Unix time in milliseconds, the unit of every `timestamp_ms` field.
"""

import time
from collections.abc import Mapping

from rlhf_online.proto.rlhf.v1 import events_pb2

POLICY = "policy"
REWARD = "reward"
KINDS = (POLICY, REWARD)

_KIND_ENUM = {POLICY: events_pb2.POLICY, REWARD: events_pb2.REWARD}
_KIND_NAME = {v: k for k, v in _KIND_ENUM.items()}


def now_ms() -> int:
    """Unix time in milliseconds (every `timestamp_ms` on the wire)."""
    return int(time.time() * 1000)


def check_kind(kind: str) -> str:
    """`kind` itself if it is a model kind.

    Raises:
        ValueError: naming the kinds there are.
    """
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {KINDS}, got {kind!r}")
    return kind


def kind_name(kind: int) -> str:
    """`events_pb2.POLICY` -> "policy"; unknown values -> "unknown"."""
    return _KIND_NAME.get(kind, "unknown")


def model_event(
    kind: str,
    action: int,
    version: str,
    *,
    parent_version: str | None = None,
    metrics: Mapping[str, float] | None = None,
) -> events_pb2.ModelEvent:
    """A ModelEvent for `kind`/`version` (path and timestamp filled in), the one builder every publisher uses.

    Args:
        kind: POLICY or REWARD.
        action: an `events_pb2.ModelAction` (PUBLISHED, ROLLED_BACK, CANARY, PROMOTED).
        version: the registry version, e.g. "v000003".
        parent_version: the version it was trained from (None or "" for the first).
        metrics: figures that justified it (`RewardFigure` / `RoundFigure` names).
    """
    return events_pb2.ModelEvent(
        kind=_KIND_ENUM[check_kind(kind)],
        action=action,
        version=version,
        parent_version=parent_version or "",
        path=f"{kind}/{version}",
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        timestamp_ms=now_ms(),
    )


def model_event_key(event: events_pb2.ModelEvent) -> bytes:
    """The Kafka key of a ModelEvent: its kind's name, so all events of one kind stay in order."""
    return kind_name(event.kind).encode()


def round_event_key() -> bytes:
    """The Kafka key of every RoundEvent: one policy lineage, one partition, rounds in order."""
    return POLICY.encode()


def canary_decision_key() -> bytes:
    """The Kafka key of every CanaryDecision: one policy lineage, one partition, trials in order."""
    return POLICY.encode()


CANARY_SHARE = "canary_share"  # ModelEvent.metrics of a CANARY event: the canary's share of traffic, (0, 1)


class RewardFigure:
    """Names in a reward checkpoint's `metrics` (its manifest and its ModelEvent)."""

    HELDOUT_ACCURACY = "heldout_accuracy"  # share of held-out ratings predicted right
    HELDOUT_AUC = "heldout_auc"  # ROC AUC on the held-out window
    HELDOUT_LOG_LOSS = "heldout_log_loss"  # nats
    HELDOUT_N = "heldout_n"  # held-out examples behind the three above
    RATINGS_APPLIED = "ratings_applied"  # distinct ratings this lineage has learnt from, in total
    UPDATES = "updates"  # optimizer updates in total


class RoundFigure:
    """Names in a RoundEvent's `metrics` and in a published policy version's manifest and ModelEvent."""

    REWARD_MEAN = "reward_mean"  # mean reward-model score of the round's rollouts
    REWARD_STD = "reward_std"
    KL_PER_RESPONSE = "kl_per_response"  # mean over rollouts of sum_t KL(policy || reference), nats
    KL_COEF = "kl_coef"  # beta used this round
    KL_COEF_NEXT = "kl_coef_next"  # beta after the controller's update
    GATE_CANDIDATE_SCORE = "gate_candidate_score"  # held-out mean score of the candidate
    GATE_SERVING_SCORE = "gate_serving_score"  # held-out mean score of the serving version
    GATE_IMPROVEMENT = "gate_improvement"  # candidate - serving
    GATE_KL_TO_REFERENCE = "gate_kl_to_reference"  # held-out KL of the candidate, nats per answer
    ROUND_S = "round_s"  # wall time of the whole round
