"""The report's figures: thumbs-up rates with intervals, per-version rows, swaps, rounds, canary trials and
the verdict.

Pure functions of a `RunData` (rlhf_online.sim.runlog); nothing here reads Kafka or draws.

A canary serves a share of the users beside the stable version while its trial runs, so its answers are not
a swap in serving: serving swaps to it when it is promoted, and never when it is rolled back
(`not_live_answer`).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from rlhf_online.contract import POLICY, REWARD, RewardFigure
from rlhf_online.sim.runlog import (
    PASSED,
    PROMOTED,
    REJECTED,
    ROLLED_BACK,
    ModelChange,
    Rated,
    RunData,
    Served,
    Trial,
)

MIN_RATINGS = 50  # a version needs this many ratings to count in the verdict
Z_LEARNING = 2.0  # |z| above this is a change (two-sided, about 95%)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (Wilson 1927); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval holds p in exact arithmetic; min/max keep it so when rounding says otherwise (k = n).
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    """z statistic of p2 - p1 under the pooled null hypothesis p1 == p2; 0 when undefined."""
    if not n1 or not n2:
        return 0.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (k2 / n2 - k1 / n1) / se if se > 0 else 0.0


@dataclass
class VersionRow:
    """Per policy version: what it served and how it was rated."""

    version: str
    first_served_ms: int | None
    served: int = 0
    rated: int = 0
    up: int = 0
    judge_sum: float = 0.0
    judged: int = 0

    @property
    def up_rate(self) -> float | None:
        return self.up / self.rated if self.rated else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.up, self.rated)

    @property
    def judge_mean(self) -> float | None:
        return self.judge_sum / self.judged if self.judged else None

    def brief(self) -> dict:
        """{"version", "up_rate", "ratings"}: how the verdict names a version."""
        return {"version": self.version, "up_rate": self.up_rate, "ratings": self.rated}


def version_rows(data: RunData) -> list[VersionRow]:
    """One row per policy version that served or was rated, in the order serving first used them."""
    rows: dict[str, VersionRow] = {}

    def row(version: str, first_served_ms: int | None = None) -> VersionRow:
        return rows.setdefault(version, VersionRow(version, first_served_ms))

    for s in data.served:
        row(s.model_version, s.timestamp_ms).served += 1
    for r in data.ratings:
        row(r.model_version).rated += 1
        row(r.model_version).up += r.up
    for j in data.judged:
        row(j.model_version).judge_sum += j.p_up
        row(j.model_version).judged += 1
    return sorted(rows.values(), key=lambda r: (r.first_served_ms is None, r.first_served_ms or 0, r.version))


@dataclass(frozen=True)
class TrialSpan:
    """One canary trial, from its start (its decision's, else its CANARY event's time) to its end."""

    canary: str
    stable: str
    started_ms: int
    share: float | None  # of the users, (0, 1); None when unknown
    ended_ms: int | None = None  # the decision or the policy event that ended it; None: still open
    outcome: str = ""  # PROMOTED | ROLLED_BACK; "" while open
    decision: Trial | None = None  # the trainer's CanaryDecision, when there was one

    @property
    def live_from_ms(self) -> int | None:
        """When the canary went live for all traffic: its promotion; None if it never did (yet)."""
        return self.ended_ms if self.outcome == PROMOTED else None


def _end_span(span: TrialSpan, event: ModelChange) -> TrialSpan:
    """`span` ended by a policy event: PROMOTED of its canary, or anything else (a rollback, a publish)."""
    promoted = event.action == PROMOTED and event.version == span.canary
    return replace(span, ended_ms=event.timestamp_ms, outcome=PROMOTED if promoted else ROLLED_BACK)


def trial_spans(models: Sequence[ModelChange], trials: Sequence[Trial] = ()) -> list[TrialSpan]:
    """Every canary trial in start order: the policy events say when each started and ended, the
    CanaryDecisions (`trials`) how it was decided; a decision without its CANARY event (read from a later
    `since_ms`) makes a span of its own."""
    spans: dict[str, TrialSpan] = {}  # by canary version: a version is on trial once
    open_canary = None
    for m in sorted((m for m in models if m.kind == POLICY), key=lambda m: m.timestamp_ms):
        if open_canary is not None:  # any policy event ends the trial before it
            spans[open_canary] = _end_span(spans[open_canary], m)
            open_canary = None
        if m.is_canary:
            spans[m.version] = TrialSpan(m.version, m.parent_version, m.timestamp_ms, m.share)
            open_canary = m.version
    for t in trials:
        span = spans.get(t.canary_version)
        if span is None:
            span = TrialSpan(t.canary_version, t.stable_version, t.started_ms, t.canary_share or None)
        ended = t.timestamp_ms if span.ended_ms is None else min(span.ended_ms, t.timestamp_ms)
        # The decision's start is the trial's own clock (its ratings count from then).
        spans[t.canary_version] = replace(
            span, started_ms=t.started_ms, ended_ms=ended, outcome=t.outcome, decision=t
        )
    return sorted(spans.values(), key=lambda s: s.started_ms)


def open_trial(spans: Sequence[TrialSpan]) -> TrialSpan | None:
    """The trial still running (the last one, if it has not ended), else None."""
    return spans[-1] if spans and spans[-1].ended_ms is None else None


def not_live_answer(spans: Sequence[TrialSpan]) -> Callable[[Served], bool]:
    """A predicate on Served: an answer of a canary before it went live for all (its trial's share)."""
    canaries = {s.canary: s.live_from_ms for s in spans}

    def test(s: Served) -> bool:
        if s.model_version not in canaries:
            return False
        live_from = canaries[s.model_version]
        return live_from is None or s.timestamp_ms < live_from

    return test


def trial_ratings(data: RunData, span: TrialSpan) -> list[Rated]:
    """The trial's ratings, in time order: of its two versions, from its start to its end (or to now)."""
    end = span.ended_ms if span.ended_ms is not None else math.inf
    versions = (span.canary, span.stable)
    ratings = [r for r in data.ratings if r.model_version in versions and span.started_ms <= r.timestamp_ms]
    return sorted((r for r in ratings if r.timestamp_ms <= end), key=lambda r: r.timestamp_ms)


def swaps(data: RunData) -> list[tuple[int, str, str]]:
    """(time, from, to) each time the served version changed, from the served answers in time order; a
    canary's answers during its trial are not a swap (serving swaps to it when it is promoted)."""
    out, current = [], None
    on_trial = not_live_answer(trial_spans(data.models, data.trials))
    for s in data.served:
        if on_trial(s):
            continue
        if current is not None and s.model_version != current:
            out.append((s.timestamp_ms, current, s.model_version))
        current = s.model_version
    return out


def published(data: RunData, kind: str) -> list[ModelChange]:
    """The versions of `kind` (POLICY or REWARD) that went live for all traffic (published, or promoted
    canaries), in time order."""
    return [m for m in data.models if m.is_published(kind)]


def reward_points(data: RunData) -> list[dict]:
    """Per reward checkpoint with a held-out accuracy: that accuracy (and AUC) against the ratings it had
    applied, and the accuracy of always voting the majority of the ratings published by then."""
    points = []
    for m in published(data, REWARD):
        accuracy, applied = m.figure(RewardFigure.HELDOUT_ACCURACY), m.figure(RewardFigure.RATINGS_APPLIED)
        if accuracy is None or applied is None:
            continue
        before = [r.up for r in data.ratings if r.timestamp_ms <= m.timestamp_ms]
        ups = sum(before)
        points.append(
            {
                "version": m.version,
                "ratings": applied,
                "accuracy": accuracy,
                "auc": m.figure(RewardFigure.HELDOUT_AUC),
                "majority": max(ups, len(before) - ups) / len(before) if before else None,
                "timestamp_ms": m.timestamp_ms,
            }
        )
    return points


@dataclass
class Verdict:
    """The closing figures and whether the loop learned."""

    learning: bool | None  # None: too little data to say
    headline: str
    first: dict | None = None  # VersionRow.brief() of the first version with enough ratings
    last: dict | None = None  # ... and of the last one
    z: float | None = None  # two_proportion_z(first, last)
    rounds: int = 0  # PPO rounds reported on the rounds topic, whatever their outcome
    rounds_published: int = 0  # of which passed the gate (published, or dropped with a rolled-back canary)
    rounds_rejected: int = 0  # of which the gate refused
    swaps: int = 0
    canary_trials: int = 0  # canary trials started (or decided), open ones included
    canary_promoted: int = 0  # of which promoted
    canary_rolled_back: int = 0  # of which rolled back
    wall_time_s: float = 0.0
    ratings: int = 0
    served: int = 0


def _counts(data: RunData) -> Verdict:
    """A Verdict with the counts filled in and no judgement yet."""
    times = [s.timestamp_ms for s in data.served] + [r.timestamp_ms for r in data.ratings]
    spans = trial_spans(data.models, data.trials)
    return Verdict(
        learning=None,
        headline="",
        rounds=len(data.rounds),
        rounds_published=sum(r.outcome == PASSED for r in data.rounds),
        rounds_rejected=sum(r.outcome == REJECTED for r in data.rounds),
        swaps=len(swaps(data)),
        canary_trials=len(spans),
        canary_promoted=sum(s.outcome == PROMOTED for s in spans),
        canary_rolled_back=sum(s.outcome == ROLLED_BACK for s in spans),
        wall_time_s=(max(times) - min(times)) / 1000 if times else 0.0,
        ratings=len(data.ratings),
        served=len(data.served),
    )


def judge(first: VersionRow, last: VersionRow) -> tuple[bool, float, str]:
    """(learning, z, headline) of the change from `first`'s thumbs-up rate to `last`'s."""
    z = two_proportion_z(first.up, first.rated, last.up, last.rated)
    change = (
        f"from {first.up_rate:.0%} ({first.version}, {first.rated} ratings) "
        f"to {last.up_rate:.0%} ({last.version}, {last.rated} ratings)"
    )
    if z > Z_LEARNING:
        return True, z, f"The loop is learning: the thumbs-up rate rose {change}; z = {z:.1f}."
    if z < -Z_LEARNING:
        return False, z, f"The thumbs-up rate fell {change}; z = {z:.1f}. Something is wrong."
    return False, z, f"No clear change in the thumbs-up rate: {change}; z = {z:.1f}."


def not_live_versions(data: RunData) -> set[str]:
    """Canaries that never served all traffic: rolled back, or still on trial."""
    return {s.canary for s in trial_spans(data.models, data.trials) if s.live_from_ms is None}


def verdict(data: RunData, min_ratings: int = MIN_RATINGS) -> Verdict:
    """Compares the first and the last version with at least `min_ratings` ratings, of those that served all
    traffic (a rolled-back canary is not where the loop got to)."""
    rows = version_rows(data)
    not_live = not_live_versions(data)
    rated = [r for r in rows if r.rated >= min_ratings and r.version not in not_live]
    v = _counts(data)
    if rated:
        v.first = rated[0].brief()
    if len(rated) < 2:
        v.headline = (
            f"Not enough data to judge: {len(rated)} version(s) have at least {min_ratings} ratings "
            f"({len(data.ratings)} ratings over {len(rows)} version(s))."
        )
        return v
    v.last = rated[-1].brief()
    v.learning, v.z, v.headline = judge(rated[0], rated[-1])
    return v
