"""The report's figures: thumbs-up rates with intervals, per-version rows, swaps, rounds and the verdict.

Pure functions of a `RunData` (rlhf_online.sim.runlog); nothing here reads Kafka or draws.
"""

import math
from dataclasses import dataclass

from rlhf_online.contract import REWARD, RewardFigure
from rlhf_online.sim.runlog import PASSED, REJECTED, ModelChange, RunData

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


def swaps(data: RunData) -> list[tuple[int, str, str]]:
    """(time, from, to) each time the served version changed, from the served answers in time order."""
    out, current = [], None
    for s in data.served:
        if current is not None and s.model_version != current:
            out.append((s.timestamp_ms, current, s.model_version))
        current = s.model_version
    return out


def published(data: RunData, kind: str) -> list[ModelChange]:
    """The versions of `kind` (POLICY or REWARD) published, in time order."""
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
    rounds_published: int = 0  # of which passed the gate (and were published)
    rounds_rejected: int = 0  # of which the gate refused
    swaps: int = 0
    wall_time_s: float = 0.0
    ratings: int = 0
    served: int = 0


def _counts(data: RunData) -> Verdict:
    """A Verdict with the counts filled in and no judgement yet."""
    times = [s.timestamp_ms for s in data.served] + [r.timestamp_ms for r in data.ratings]
    return Verdict(
        learning=None,
        headline="",
        rounds=len(data.rounds),
        rounds_published=sum(r.outcome == PASSED for r in data.rounds),
        rounds_rejected=sum(r.outcome == REJECTED for r in data.rounds),
        swaps=len(swaps(data)),
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


def verdict(data: RunData, min_ratings: int = MIN_RATINGS) -> Verdict:
    """Compares the first and the last version with at least `min_ratings` ratings."""
    rows = version_rows(data)
    rated = [r for r in rows if r.rated >= min_ratings]
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
