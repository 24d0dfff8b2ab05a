"""An HTML report, with PNG plots, that shows at a glance whether the loop is learning.

    rlhf-online report --topic-prefix rlhf --out-dir runs/mine
    rlhf-online report --topic-prefix demo-20250101-120000 --outcomes-path runs/x/outcomes.jsonl

It reads the Kafka topics (served answers, ratings, model versions) and, when given, the simulator's outcomes
(the hidden judge's P(up) of every answer) and the trainer's per-round figures that the demo records, then
writes `report.html`, one PNG per plot and `summary.json` (the closing figures) into the output folder:

1. thumbs-up rate per model version, with 95% intervals and the number of ratings behind each;
2. thumbs-up rate over time, with the moments serving swapped versions;
3. the reward model's held-out accuracy against the ratings it had seen;
4. PPO reward and KL per round, with the gate's decisions;
5. the timeline: which version served when, policy and reward versions published, rollbacks.
"""

import html
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from rlhf_online.config import parse_config
from rlhf_online.sim.config import ReportConfig
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)

# Names the services may give the figures in ModelEvent.metrics, first match wins.
REWARD_ACCURACY_KEYS = ("heldout_accuracy", "heldout/accuracy", "eval_accuracy", "accuracy")
REWARD_AUC_KEYS = ("heldout_auc", "heldout/auc", "eval_auc", "auc")
REWARD_SEEN_KEYS = ("ratings_applied", "ratings_seen", "examples_seen", "applied", "train_examples")
POLICY_REWARD_KEYS = ("reward_mean", "ppo/reward_mean")
POLICY_KL_KEYS = ("kl_per_response", "kl", "ppo/kl")
MIN_RATINGS = 50  # a version needs this many ratings to count in the verdict


# ---------------------------------------------------------------------------------------------------- records


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

    kind: str  # "policy" | "reward"
    action: str  # "published" | "rolled_back"
    version: str
    parent_version: str
    timestamp_ms: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Round:
    """One PPO round as the trainer's metrics showed it (recorded by the demo)."""

    index: int
    timestamp_ms: int
    outcome: str  # "published" | "rejected" | "failed" | "abandoned"
    reward_mean: float | None = None
    kl: float | None = None


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

    def dedup(self) -> "RunData":
        """Drops replayed ratings (same event_id) and sorts everything by time."""
        seen, ratings = set(), []
        for r in sorted(self.ratings, key=lambda r: r.timestamp_ms):
            if r.event_id not in seen:
                seen.add(r.event_id)
                ratings.append(r)
        return RunData(
            served=sorted(self.served, key=lambda s: s.timestamp_ms),
            ratings=ratings,
            models=sorted(self.models, key=lambda m: m.timestamp_ms),
            rounds=sorted(self.rounds, key=lambda r: r.index),
            judged=sorted(self.judged, key=lambda j: j.timestamp_ms),
        )


# ---------------------------------------------------------------------------------------------------- loading


def from_protos(interactions: Iterable, feedback: Iterable, model_events: Iterable) -> RunData:
    """The one boundary from protobuf messages (events_pb2) to records."""
    from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2

    kinds = {events_pb2.POLICY: "policy", events_pb2.REWARD: "reward"}
    actions = {events_pb2.PUBLISHED: "published", events_pb2.ROLLED_BACK: "rolled_back"}
    return RunData(
        served=[Served(i.response_id, i.model_version, i.timestamp_ms) for i in interactions],
        ratings=[
            Rated(f.event_id, f.response_id, f.model_version, f.rating == chat_pb2.THUMBS_UP, f.timestamp_ms)
            for f in feedback
            if f.rating in (chat_pb2.THUMBS_UP, chat_pb2.THUMBS_DOWN)
        ],
        models=[
            ModelChange(
                kinds.get(m.kind, "unknown"),
                actions.get(m.action, "unknown"),
                m.version,
                m.parent_version,
                m.timestamp_ms,
                dict(m.metrics),
            )
            for m in model_events
        ],
    )


def load_from_kafka(bootstrap: str, topics: Topics, *, since_ms: int = 0, timeout_s: float = 60.0) -> RunData:
    """Reads the three topics from the beginning (no consumer group) and parses their records."""
    from rlhf_online.broker.clients import read_topic
    from rlhf_online.proto.rlhf.v1 import events_pb2

    def parse(topic: str, message_type):
        out = []
        for record in read_topic(bootstrap, topic, timeout_s=timeout_s):
            try:
                message = message_type.FromString(record.value or b"")
            except Exception:  # a garbled record is the DLQ's business, not the report's
                log.warning("skipping unparsable record %s[%d]@%d", topic, record.partition, record.offset)
                continue
            if message.timestamp_ms >= since_ms:
                out.append(message)
        return out

    return from_protos(
        parse(topics.interactions, events_pb2.Interaction),
        parse(topics.feedback, events_pb2.FeedbackEvent),
        parse(topics.models, events_pb2.ModelEvent),
    )


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


def load_rounds(path: str | Path) -> list[Round]:
    """PPO rounds recorded by the demo (JSON lines with the fields of `Round`)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Round(**{k: row.get(k) for k in Round.__dataclass_fields__}) for row in rows]


# ---------------------------------------------------------------------------------------------------- figures


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (Wilson 1927); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


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


def version_rows(data: RunData) -> list[VersionRow]:
    """One row per policy version that served or was rated, in the order serving first used them."""
    rows: dict[str, VersionRow] = {}
    for s in data.served:
        row = rows.setdefault(s.model_version, VersionRow(s.model_version, s.timestamp_ms))
        row.served += 1
    for r in data.ratings:
        row = rows.setdefault(r.model_version, VersionRow(r.model_version, None))
        row.rated += 1
        row.up += r.up
    for j in data.judged:
        row = rows.setdefault(j.model_version, VersionRow(j.model_version, None))
        row.judge_sum += j.p_up
        row.judged += 1
    return sorted(rows.values(), key=lambda r: (r.first_served_ms is None, r.first_served_ms or 0, r.version))


def swaps(data: RunData) -> list[tuple[int, str, str]]:
    """(time, from, to) each time the served version changed, from the served answers in time order."""
    out, current = [], None
    for s in data.served:
        if current is not None and s.model_version != current:
            out.append((s.timestamp_ms, current, s.model_version))
        current = s.model_version
    return out


def reward_points(data: RunData) -> list[dict[str, float]]:
    """Per published reward version: held-out accuracy (and AUC) against the ratings seen by then."""
    points = []
    rating_times = [r.timestamp_ms for r in data.ratings]
    for m in data.models:
        if m.kind != "reward" or m.action != "published":
            continue
        accuracy = first_metric(m.metrics, REWARD_ACCURACY_KEYS)
        if accuracy is None:
            continue
        seen = first_metric(m.metrics, REWARD_SEEN_KEYS)
        if seen is None:  # fall back on the ratings published before the checkpoint
            seen = float(sum(t <= m.timestamp_ms for t in rating_times))
        ups = sum(r.up for r in data.ratings if r.timestamp_ms <= m.timestamp_ms)
        total = sum(1 for r in data.ratings if r.timestamp_ms <= m.timestamp_ms)
        majority = max(ups, total - ups) / total if total else None
        points.append(
            {
                "version": m.version,
                "ratings": seen,
                "accuracy": accuracy,
                "auc": first_metric(m.metrics, REWARD_AUC_KEYS),
                "majority": majority,
                "timestamp_ms": m.timestamp_ms,
            }
        )
    return points


def round_points(data: RunData) -> list[Round]:
    """PPO rounds: the demo's record of every round if there is one, else the published versions' figures."""
    if data.rounds:
        return data.rounds
    rounds = []
    for m in data.models:
        reward = first_metric(m.metrics, POLICY_REWARD_KEYS)
        if m.kind == "policy" and m.action == "published" and reward is not None:
            kl = first_metric(m.metrics, POLICY_KL_KEYS)
            rounds.append(Round(len(rounds) + 1, m.timestamp_ms, "published", reward, kl))
    return rounds


def first_metric(metrics: Mapping[str, float], keys: Sequence[str]) -> float | None:
    for key in keys:
        if key in metrics and math.isfinite(metrics[key]):
            return float(metrics[key])
    return None


@dataclass
class Verdict:
    """The closing figures and whether the loop learned."""

    learning: bool | None  # None: too little data to say
    headline: str
    first: dict | None = None  # {"version", "up_rate", "ratings"}
    last: dict | None = None
    rounds: int = 0
    rounds_published: int = 0
    swaps: int = 0
    wall_time_s: float = 0.0
    ratings: int = 0
    served: int = 0


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    """z statistic of p2 - p1 under the pooled null hypothesis p1 == p2; 0 when undefined."""
    if not n1 or not n2:
        return 0.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (k2 / n2 - k1 / n1) / se if se > 0 else 0.0


def verdict(data: RunData, min_ratings: int = MIN_RATINGS) -> Verdict:
    """Compares the first and the last version with at least `min_ratings` ratings."""
    rows = version_rows(data)
    rated = [r for r in rows if r.rated >= min_ratings]
    times = [s.timestamp_ms for s in data.served] + [r.timestamp_ms for r in data.ratings]
    rounds = round_points(data)
    v = Verdict(learning=None, headline="", ratings=len(data.ratings), served=len(data.served))
    v.rounds, v.rounds_published = len(rounds), sum(r.outcome == "published" for r in rounds)
    v.swaps = len(swaps(data))
    v.wall_time_s = (max(times) - min(times)) / 1000 if times else 0.0
    if rated:
        v.first = {"version": rated[0].version, "up_rate": rated[0].up_rate, "ratings": rated[0].rated}
    if len(rated) < 2:
        v.headline = (
            f"Not enough data to judge: {len(rated)} version(s) have at least {min_ratings} ratings "
            f"({len(data.ratings)} ratings over {len(rows)} version(s))."
        )
        return v
    first, last = rated[0], rated[-1]
    v.last = {"version": last.version, "up_rate": last.up_rate, "ratings": last.rated}
    z = two_proportion_z(first.up, first.rated, last.up, last.rated)
    v.learning = z > 2.0
    change = (
        f"from {first.up_rate:.0%} ({first.version}, {first.rated} ratings) "
        f"to {last.up_rate:.0%} ({last.version}, {last.rated} ratings)"
    )
    if v.learning:
        v.headline = f"The loop is learning: the thumbs-up rate rose {change}; z = {z:.1f}."
    elif z < -2.0:
        v.headline = f"The thumbs-up rate fell {change}; z = {z:.1f}. Something is wrong."
    else:
        v.headline = f"No clear change in the thumbs-up rate: {change}; z = {z:.1f}."
    return v


# ---------------------------------------------------------------------------------------------------- plots


def _t0(data: RunData) -> int:
    times = [s.timestamp_ms for s in data.served] + [r.timestamp_ms for r in data.ratings]
    times += [m.timestamp_ms for m in data.models] + [j.timestamp_ms for j in data.judged]
    return min(times) if times else 0


def _minutes(ms: int, t0: int) -> float:
    return (ms - t0) / 60_000


def _xy(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_up_rate_by_version(data: RunData, path: Path) -> None:
    """Bars: thumbs-up rate per version with Wilson 95% intervals and n; diamonds: the hidden judge's mean."""
    rows = [r for r in version_rows(data) if r.rated or r.judged]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 3), 4))
    ax.set_title("Thumbs-up rate per model version")
    if not rows:
        _empty(ax, "no ratings yet")
        return _save(fig, path)
    x = list(range(len(rows)))
    rates = [r.up_rate or 0.0 for r in rows]
    errors = [
        [rate - r.interval[0] for rate, r in zip(rates, rows, strict=True)],
        [r.interval[1] - rate for rate, r in zip(rates, rows, strict=True)],
    ]
    ax.bar(x, rates, yerr=errors, capsize=3, color="tab:blue", alpha=0.8, label="thumbs-up rate (95% CI)")
    for xi, r in zip(x, rows, strict=True):
        ax.annotate(
            f"n={r.rated}",
            (xi, r.interval[1]),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=8,
        )
    judged = [(xi, r.judge_mean) for xi, r in zip(x, rows, strict=True) if r.judge_mean is not None]
    if judged:
        ax.plot(*_xy(judged), "D", color="tab:orange", label="hidden judge's mean P(up)")
    many = len(rows) > 6
    ax.set_xticks(x, [r.version for r in rows], rotation=45 if many else 0, ha="right" if many else "center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of thumbs up")
    ax.set_xlabel("policy version, in the order serving used it")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _binned(
    times_ms: Sequence[int], values: Sequence[float], t0: int, bin_s: float
) -> dict[int, list[float]]:
    bins: dict[int, list[float]] = {}
    for t, v in zip(times_ms, values, strict=True):
        bins.setdefault(int((t - t0) / 1000 // bin_s), []).append(v)
    return bins


def plot_up_rate_over_time(data: RunData, path: Path, bin_s: float = 0.0) -> None:
    """Thumbs-up rate in time bins with 95% intervals; dotted lines where serving swapped versions."""
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.set_title("Thumbs-up rate over time")
    if not data.ratings:
        _empty(ax, "no ratings yet")
        return _save(fig, path)
    t0 = _t0(data)
    bin_s = bin_s or max(5.0, (data.ratings[-1].timestamp_ms - t0) / 1000 / 30)
    bins = _binned([r.timestamp_ms for r in data.ratings], [float(r.up) for r in data.ratings], t0, bin_s)
    keys = sorted(bins)
    mids = [(k + 0.5) * bin_s / 60 for k in keys]
    intervals = [wilson_interval(int(sum(bins[k])), len(bins[k])) for k in keys]
    lo, hi = [i[0] for i in intervals], [i[1] for i in intervals]
    ax.fill_between(mids, lo, hi, color="tab:blue", alpha=0.15, label="95% CI")
    rates = [sum(bins[k]) / len(bins[k]) for k in keys]
    ax.plot(mids, rates, "o-", color="tab:blue", ms=3, label=f"thumbs-up rate per {bin_s:.0f}s")
    if data.judged:
        jb = _binned([j.timestamp_ms for j in data.judged], [j.p_up for j in data.judged], t0, bin_s)
        jmids = [(k + 0.5) * bin_s / 60 for k in sorted(jb)]
        ax.plot(
            jmids,
            [sum(jb[k]) / len(jb[k]) for k in sorted(jb)],
            "--",
            color="tab:orange",
            label="hidden judge's mean P(up)",
        )
    changes = swaps(data)
    label_every = max(1, math.ceil(len(changes) / 12))  # at most a dozen version labels
    for i, (t, _, to) in enumerate(changes):
        x = _minutes(t, t0)
        ax.axvline(x, color="tab:green", ls=":", lw=1, label="serving swapped" if i == 0 else None)
        if i % label_every == label_every - 1 or i == len(changes) - 1:
            ax.text(x, 0.99, f" {to}", rotation=90, fontsize=7, va="top", ha="right", color="tab:green")
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("minutes since start")
    ax.set_ylabel("share of thumbs up")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def plot_reward_accuracy(data: RunData, path: Path) -> None:
    """Held-out accuracy (and AUC) of each reward checkpoint against the ratings it had seen."""
    points = reward_points(data)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_title("Reward model: held-out accuracy against ratings seen")
    if not points:
        _empty(ax, "no reward checkpoint with a held-out accuracy yet")
        return _save(fig, path)
    ax.plot(
        *_xy([(p["ratings"], p["accuracy"]) for p in points]),
        "o-",
        color="tab:purple",
        label="held-out accuracy",
    )
    auc = [(p["ratings"], p["auc"]) for p in points if p["auc"] is not None]
    if auc:
        ax.plot(*_xy(auc), "s--", color="tab:gray", ms=4, label="held-out AUC")
    majority = [(p["ratings"], p["majority"]) for p in points if p["majority"] is not None]
    if majority:
        ax.plot(*_xy(majority), ":", color="tab:red", label="baseline: always the majority vote so far")
    ax.axhline(0.5, color="black", lw=0.5)
    ax.set_ylim(0.3, 1.0)
    ax.set_xlabel("ratings seen by the reward model")
    ax.set_ylabel("accuracy on held-out ratings")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


_OUTCOME_STYLE = {"published": ("o", "tab:green"), "rejected": ("x", "tab:red")}


def plot_ppo_rounds(data: RunData, path: Path) -> None:
    """Mean reward-model score and KL to the reference of each round's rollouts, marked by the gate."""
    rounds = round_points(data)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (
        (axes[0], "reward_mean", "mean reward-model score", "PPO: reward of each round's rollouts"),
        (axes[1], "kl", "KL(policy || reference), nats", "PPO: KL to the reference per response"),
    )
    for ax, attr, ylabel, title in panels:
        ax.set_title(title)
        points = [(r, getattr(r, attr)) for r in rounds if getattr(r, attr) is not None]
        if not points:
            _empty(ax, "no PPO round yet")
            continue
        ax.plot([r.index for r, _ in points], [y for _, y in points], "-", color="lightgray", zorder=0)
        for outcome in sorted({r.outcome for r, _ in points}):
            marker, colour = _OUTCOME_STYLE.get(outcome, ("s", "tab:gray"))
            sel = [(r.index, y) for r, y in points if r.outcome == outcome]
            ax.scatter(*_xy(sel), marker=marker, color=colour, label=f"gate: {outcome}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("PPO round")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_timeline(data: RunData, path: Path) -> None:
    """Which version served each answer, when policy and reward versions were published, rollbacks."""
    fig, ax = plt.subplots(figsize=(11, 3.5))
    ax.set_title("Timeline: served version, published versions, rollbacks")
    versions = [r.version for r in version_rows(data) if r.first_served_ms is not None]
    if not versions:
        _empty(ax, "nothing served yet")
        return _save(fig, path)
    t0 = _t0(data)
    row = {v: i for i, v in enumerate(versions)}
    reward_row = -1
    served_x = [_minutes(s.timestamp_ms, t0) for s in data.served]
    ax.scatter(
        served_x,
        [row[s.model_version] for s in data.served],
        s=4,
        color="tab:blue",
        alpha=0.4,
        label="answer served by",
    )
    published = [m for m in data.models if m.action == "published"]
    policy = [
        (_minutes(m.timestamp_ms, t0), row.get(m.version, len(versions) - 0.5))
        for m in published
        if m.kind == "policy"
    ]
    if policy:
        ax.scatter(*_xy(policy), marker="^", s=60, color="tab:green", label="policy version published")
    reward = [(_minutes(m.timestamp_ms, t0), reward_row) for m in published if m.kind == "reward"]
    if reward:
        ax.scatter(*_xy(reward), marker="|", s=200, color="tab:purple", label="reward version published")
    for i, m in enumerate(m for m in data.models if m.action == "rolled_back"):
        label = f"rollback to {m.version}" if i == 0 else None
        ax.axvline(_minutes(m.timestamp_ms, t0), color="tab:red", lw=1, label=label)
    ax.set_yticks([*range(len(versions)), reward_row], [*versions, "reward"])
    ax.set_ylim(reward_row - 0.5, len(versions) - 0.3)
    ax.set_xlabel("minutes since start")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- report

PLOTS = (
    ("up_rate_by_version.png", "Thumbs-up rate per model version", plot_up_rate_by_version),
    ("up_rate_over_time.png", "Thumbs-up rate over time", plot_up_rate_over_time),
    ("reward_accuracy.png", "Reward model: held-out accuracy", plot_reward_accuracy),
    ("ppo_rounds.png", "PPO rounds: reward and KL", plot_ppo_rounds),
    ("timeline.png", "Timeline of swaps", plot_timeline),
)


def write_report(
    data: RunData,
    out_dir: str | Path,
    *,
    title: str = "rlhf-online run",
    time_bin_s: float = 0.0,
    min_ratings: int = MIN_RATINGS,
    notes: Sequence[str] = (),
) -> Path:
    """Writes report.html, the PNGs and summary.json into `out_dir`; returns the path of report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = data.dedup()
    for name, _, plot in PLOTS:
        if plot is plot_up_rate_over_time:
            plot(data, out / name, time_bin_s)
        else:
            plot(data, out / name)
    result = verdict(data, min_ratings)
    rows = version_rows(data)
    summary = {
        **asdict(result),
        "versions": [
            {
                "version": r.version,
                "served": r.served,
                "ratings": r.rated,
                "up": r.up,
                "up_rate": r.up_rate,
                "judge_mean": r.judge_mean,
            }
            for r in rows
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "report.html").write_text(_html(title, result, rows, min_ratings, notes), encoding="utf-8")
    return out / "report.html"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _html(title: str, v: Verdict, rows: list[VersionRow], min_ratings: int, notes: Sequence[str]) -> str:
    colour = {True: "#d4f4dd", False: "#fde2e1", None: "#eeeeee"}[v.learning]
    esc = html.escape
    figures = [
        (
            "first version",
            f"{v.first['version']}: {_pct(v.first['up_rate'])} of {v.first['ratings']} ratings"
            if v.first
            else "-",
        ),
        (
            "last version",
            f"{v.last['version']}: {_pct(v.last['up_rate'])} of {v.last['ratings']} ratings"
            if v.last
            else "-",
        ),
        ("answers served / ratings", f"{v.served} / {v.ratings}"),
        ("PPO rounds (published)", f"{v.rounds} ({v.rounds_published})"),
        ("swaps in serving", str(v.swaps)),
        ("wall time", f"{v.wall_time_s / 60:.1f} min"),
    ]
    table = "".join(
        f"<tr><td>{esc(r.version)}</td><td>{r.served}</td><td>{r.rated}</td><td>{r.up}</td>"
        f"<td>{_pct(r.up_rate)}</td><td>{_pct(r.interval[0]) if r.rated else '-'} – "
        f"{_pct(r.interval[1]) if r.rated else '-'}</td><td>{_pct(r.judge_mean)}</td></tr>"
        for r in rows
    )
    images = "".join(
        f'<h2>{esc(caption)}</h2><img src="{name}" alt="{esc(caption)}">' for name, caption, _ in PLOTS
    )
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
.verdict {{ background: {colour}; padding: 1em; border-radius: 6px; font-size: 1.2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p class="verdict">{esc(v.headline)}</p>
<table>{"".join(f"<tr><th>{esc(k)}</th><td>{esc(val)}</td></tr>" for k, val in figures)}</table>
<h2>Per version</h2>
<table><tr><th>version</th><th>served</th><th>ratings</th><th>thumbs up</th><th>up rate</th>
<th>95% interval</th><th>hidden judge P(up)</th></tr>{table}</table>
{images}
<h2>How to read this</h2>
<ul>
<li>The thumbs-up rate counts ratings accepted by SubmitFeedback (the feedback topic), by the version
that produced the rated answer. Versions count in the verdict once they have {min_ratings} ratings.</li>
<li>The hidden judge's P(up) is the simulated users' true preference before rater noise; the system never
sees it.</li>
<li>The reward model's accuracy is on held-out ratings it never trained on; compare it with the majority
baseline.</li>
{notes_html}
</ul>
<p><small>Written {time.strftime("%Y-%m-%d %H:%M:%S")} by rlhf-online report.</small></p>
</body></html>
"""


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    config = parse_config(ReportConfig, argv, env, prog="rlhf-online report")
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    try:
        data = load_from_kafka(config.kafka_bootstrap, Topics(config.topic_prefix), since_ms=config.since_ms)
    except TimeoutError as e:
        print(f"rlhf-online report: {e}", file=sys.stderr)
        return 1
    if config.outcomes_path:
        data.judged = load_outcomes(config.outcomes_path)
    if config.rounds_path:
        data.rounds = load_rounds(config.rounds_path)
    out_dir = config.out_dir or f"runs/report-{time.strftime('%Y%m%d-%H%M%S')}"
    path = write_report(
        data, out_dir, title=config.title, time_bin_s=config.time_bin_s, min_ratings=config.min_ratings
    )
    print(path)
    return 0
