"""The report's PNG plots, one function each, all drawn from a `RunData` (rlhf_online.sim.runlog).

1. thumbs-up rate per model version, with 95% intervals and the number of ratings behind each;
2. thumbs-up rate over time, with the moments serving swapped versions and the canary trials shaded;
3. the reward model's held-out accuracy against the ratings it had applied;
4. PPO reward and KL per round (from the RoundEvents), marked by the gate's decision;
5. the timeline: which version served when, policy versions live (published or promoted), canary trials
   started, reward versions published, gate rejections, rollbacks;
6. one panel per canary trial: both arms' cumulative thumbs-up rates over the trial's ratings, with 95%
   intervals, where it was decided and how.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from rlhf_online.contract import POLICY, REWARD
from rlhf_online.sim import stats
from rlhf_online.sim.runlog import FAILED, OUTCOMES, PASSED, PROMOTED, REJECTED, ROLLED_BACK, Round, RunData


@dataclass(frozen=True)
class PlotOptions:
    """Settings some plots take; every plot function accepts them, so the report draws them all alike."""

    time_bin_s: float = 0.0  # width of the up-rate-over-time bins; 0: chosen from the run's length


DEFAULT_OPTIONS = PlotOptions()


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


# ------------------------------------------------------------------------------------ 1. up rate by version


def _annotate_counts(ax, x: list[int], rows: list[stats.VersionRow]) -> None:
    """n=<ratings> above each bar's interval."""
    for xi, r in zip(x, rows, strict=True):
        ax.annotate(
            f"n={r.rated}",
            (xi, r.interval[1]),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=8,
        )


def plot_up_rate_by_version(data: RunData, path: Path, options: PlotOptions = DEFAULT_OPTIONS) -> None:
    """Bars: thumbs-up rate per version with Wilson 95% intervals and n; diamonds: the hidden judge's mean."""
    rows = [r for r in stats.version_rows(data) if r.rated or r.judged]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 3), 4))
    ax.set_title("Thumbs-up rate per model version")
    if not rows:
        _empty(ax, "no ratings yet")
        return _save(fig, path)
    x = list(range(len(rows)))
    rates = [r.up_rate or 0.0 for r in rows]
    errors = [[rate - r.interval[0] for rate, r in zip(rates, rows, strict=True)]]
    errors.append([r.interval[1] - rate for rate, r in zip(rates, rows, strict=True)])
    ax.bar(x, rates, yerr=errors, capsize=3, color="tab:blue", alpha=0.8, label="thumbs-up rate (95% CI)")
    _annotate_counts(ax, x, rows)
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


# --------------------------------------------------------------------------------------- 2. up rate over time


def _binned(
    times_ms: Sequence[int], values: Sequence[float], t0: int, bin_s: float
) -> dict[int, list[float]]:
    bins: dict[int, list[float]] = {}
    for t, v in zip(times_ms, values, strict=True):
        bins.setdefault(int((t - t0) / 1000 // bin_s), []).append(v)
    return bins


def _rate_line(ax, data: RunData, t0: int, bin_s: float) -> None:
    """The thumbs-up rate per bin, with its Wilson band."""
    bins = _binned([r.timestamp_ms for r in data.ratings], [float(r.up) for r in data.ratings], t0, bin_s)
    keys = sorted(bins)
    mids = [(k + 0.5) * bin_s / 60 for k in keys]
    intervals = [stats.wilson_interval(int(sum(bins[k])), len(bins[k])) for k in keys]
    ax.fill_between(
        mids,
        [i[0] for i in intervals],
        [i[1] for i in intervals],
        color="tab:blue",
        alpha=0.15,
        label="95% CI",
    )
    rates = [sum(bins[k]) / len(bins[k]) for k in keys]
    ax.plot(mids, rates, "o-", color="tab:blue", ms=3, label=f"thumbs-up rate per {bin_s:.0f}s")


def _judge_line(ax, data: RunData, t0: int, bin_s: float) -> None:
    """The hidden judge's mean P(up) per bin."""
    if not data.judged:
        return
    bins = _binned([j.timestamp_ms for j in data.judged], [j.p_up for j in data.judged], t0, bin_s)
    keys = sorted(bins)
    means = [sum(bins[k]) / len(bins[k]) for k in keys]
    ax.plot(
        [(k + 0.5) * bin_s / 60 for k in keys],
        means,
        "--",
        color="tab:orange",
        label="hidden judge's mean P(up)",
    )


def _swap_lines(ax, data: RunData, t0: int) -> None:
    """A dotted line per swap in serving, labelled with the new version (at most a dozen labels)."""
    changes = stats.swaps(data)
    label_every = max(1, math.ceil(len(changes) / 12))
    for i, (t, _, to) in enumerate(changes):
        x = _minutes(t, t0)
        ax.axvline(x, color="tab:green", ls=":", lw=1, label="serving swapped" if i == 0 else None)
        if i % label_every == label_every - 1 or i == len(changes) - 1:
            ax.text(x, 0.99, f" {to}", rotation=90, fontsize=7, va="top", ha="right", color="tab:green")


def _trial_shades(ax, data: RunData, t0: int) -> None:
    """A shaded band over each canary trial, from its start to its decision (or the last rating)."""
    end = data.ratings[-1].timestamp_ms if data.ratings else t0
    for i, span in enumerate(stats.trial_spans(data.models, data.trials)):
        stop = span.ended_ms if span.ended_ms is not None else max(end, span.started_ms)
        ax.axvspan(
            _minutes(span.started_ms, t0),
            _minutes(stop, t0),
            color="tab:orange",
            alpha=0.08,
            label="canary trial" if i == 0 else None,
        )


def plot_up_rate_over_time(data: RunData, path: Path, options: PlotOptions = DEFAULT_OPTIONS) -> None:
    """Thumbs-up rate in time bins with 95% intervals; dotted lines where serving swapped versions."""
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.set_title("Thumbs-up rate over time")
    if not data.ratings:
        _empty(ax, "no ratings yet")
        return _save(fig, path)
    t0 = data.t0()
    bin_s = options.time_bin_s or max(5.0, (data.ratings[-1].timestamp_ms - t0) / 1000 / 30)
    _rate_line(ax, data, t0, bin_s)
    _judge_line(ax, data, t0, bin_s)
    _swap_lines(ax, data, t0)
    _trial_shades(ax, data, t0)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("minutes since start")
    ax.set_ylabel("share of thumbs up")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------------------- 3. reward accuracy


def plot_reward_accuracy(data: RunData, path: Path, options: PlotOptions = DEFAULT_OPTIONS) -> None:
    """Held-out accuracy (and AUC) of each reward checkpoint against the ratings it had applied."""
    points = stats.reward_points(data)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_title("Reward model: held-out accuracy against ratings applied")
    if not points:
        _empty(ax, "no reward checkpoint with a held-out accuracy yet")
        return _save(fig, path)
    accuracy = [(p["ratings"], p["accuracy"]) for p in points]
    ax.plot(*_xy(accuracy), "o-", color="tab:purple", label="held-out accuracy")
    auc = [(p["ratings"], p["auc"]) for p in points if p["auc"] is not None]
    if auc:
        ax.plot(*_xy(auc), "s--", color="tab:gray", ms=4, label="held-out AUC")
    majority = [(p["ratings"], p["majority"]) for p in points if p["majority"] is not None]
    if majority:
        ax.plot(*_xy(majority), ":", color="tab:red", label="baseline: always the majority vote so far")
    ax.axhline(0.5, color="black", lw=0.5)
    ax.set_ylim(0.3, 1.0)
    ax.set_xlabel("ratings applied by the reward model")
    ax.set_ylabel("accuracy on held-out ratings")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- 4. PPO rounds

# Marker and colour of each round outcome, in the PPO and timeline plots.
OUTCOME_STYLE = {PASSED: ("o", "tab:green"), REJECTED: ("x", "tab:red"), FAILED: ("s", "black")}
_OTHER_STYLE = ("s", "tab:gray")


def _round_panel(ax, rounds: Sequence[Round], figure: str, ylabel: str) -> None:
    """One figure of every round in run order, marked by outcome; rounds without it (failed, abandoned)
    as thin lines, so they still show."""
    points = [(i, getattr(r, figure), r.outcome) for i, r in enumerate(rounds, start=1)]
    scored = [(i, y) for i, y, _ in points if y is not None]
    ax.plot(*_xy(scored), "-", color="lightgray", zorder=0)
    for outcome in [*OUTCOMES, *sorted({o for *_, o in points} - set(OUTCOMES))]:
        marker, colour = OUTCOME_STYLE.get(outcome, _OTHER_STYLE)
        sel = [(i, y) for i, y, o in points if o == outcome and y is not None]
        if sel:
            ax.scatter(*_xy(sel), marker=marker, color=colour, label=f"gate: {outcome}")
        unscored = [i for i, y, o in points if o == outcome and y is None]
        for k, i in enumerate(unscored):
            ax.axvline(i, color=colour, lw=0.8, ls="--", label=f"{outcome} (no figures)" if k == 0 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("PPO round, in run order")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def plot_ppo_rounds(data: RunData, path: Path, options: PlotOptions = DEFAULT_OPTIONS) -> None:
    """Mean reward-model score and KL to the reference of each round's rollouts, marked by the gate."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (
        (axes[0], "reward_mean", "mean reward-model score", "PPO: reward of each round's rollouts"),
        (axes[1], "kl", "KL(policy || reference), nats", "PPO: KL to the reference per response"),
    )
    for ax, figure, ylabel, title in panels:
        ax.set_title(title)
        if not data.rounds:
            _empty(ax, "no PPO round yet")
        else:
            _round_panel(ax, data.rounds, figure, ylabel)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ 5. timeline


def _timeline_events(ax, data: RunData, t0: int, row: dict[str, int], reward_row: int) -> None:
    """Published versions, gate rejections and rollbacks over the served answers."""
    top = len(row) - 0.5  # a version serving never used sits above the others
    policy = [(_minutes(m.timestamp_ms, t0), row.get(m.version, top)) for m in stats.published(data, POLICY)]
    if policy:
        ax.scatter(*_xy(policy), marker="^", s=60, color="tab:green", label="policy version live for all")
    canary = [(_minutes(m.timestamp_ms, t0), row.get(m.version, top)) for m in data.models if m.is_canary]
    if canary:
        ax.scatter(*_xy(canary), marker=">", s=50, color="tab:orange", label="canary trial started")
    rejected = [
        (_minutes(r.timestamp_ms, t0), row.get(r.start_version, top))
        for r in data.rounds
        if r.outcome == REJECTED
    ]
    if rejected:
        ax.scatter(*_xy(rejected), marker="x", s=40, color="tab:red", label="gate rejected a candidate of")
    reward = [(_minutes(m.timestamp_ms, t0), reward_row) for m in stats.published(data, REWARD)]
    if reward:
        ax.scatter(*_xy(reward), marker="|", s=200, color="tab:purple", label="reward version published")
    for i, m in enumerate(m for m in data.models if m.action == ROLLED_BACK):
        ax.axvline(
            _minutes(m.timestamp_ms, t0),
            color="tab:red",
            lw=1,
            label=f"rollback to {m.version}" if i == 0 else None,
        )


def plot_timeline(data: RunData, path: Path, options: PlotOptions = DEFAULT_OPTIONS) -> None:
    """Which version served each answer, when versions were published, gate rejections, rollbacks."""
    fig, ax = plt.subplots(figsize=(11, 3.5))
    ax.set_title("Timeline: served version, published versions, canaries, gate rejections, rollbacks")
    versions = [r.version for r in stats.version_rows(data) if r.first_served_ms is not None]
    if not versions:
        _empty(ax, "nothing served yet")
        return _save(fig, path)
    t0, row, reward_row = data.t0(), {v: i for i, v in enumerate(versions)}, -1
    ax.scatter(
        [_minutes(s.timestamp_ms, t0) for s in data.served],
        [row[s.model_version] for s in data.served],
        s=4,
        color="tab:blue",
        alpha=0.4,
        label="answer served by",
    )
    _timeline_events(ax, data, t0, row, reward_row)
    ax.set_yticks([*range(len(versions)), reward_row], [*versions, "reward"])
    ax.set_ylim(reward_row - 0.5, len(versions) - 0.3)
    ax.set_xlabel("minutes since start")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- 6. canary trials

MAX_TRIAL_PANELS = 12  # the canary plot shows the last this many trials
ARM_COLOURS = {"canary": "tab:orange", "stable": "tab:blue"}
_DECISION_COLOURS = {PROMOTED: "tab:green", ROLLED_BACK: "tab:red"}


def cumulative_rates(ups: Sequence[bool]) -> tuple[list[float], list[float], list[float]]:
    """(rate, Wilson low, Wilson high) after each of `ups`: the arm's cumulative thumbs-up rate so far."""
    rates, lows, highs, k = [], [], [], 0
    for n, up in enumerate(ups, start=1):
        k += up
        low, high = stats.wilson_interval(k, n)
        rates.append(k / n)
        lows.append(low)
        highs.append(high)
    return rates, lows, highs


def _arm(ax, ratings: Sequence, version: str, arm: str) -> None:
    """One arm's cumulative rate, at the trial's rating index of each of its ratings, with its band."""
    x = [i for i, r in enumerate(ratings, start=1) if r.model_version == version]
    if not x:
        return
    rates, lows, highs = cumulative_rates([r.up for r in ratings if r.model_version == version])
    colour = ARM_COLOURS[arm]
    ax.fill_between(x, lows, highs, step="post", color=colour, alpha=0.15)
    ax.step(x, rates, where="post", color=colour, label=f"{arm} {version}: {rates[-1]:.1%} of {len(x)}")


def _trial_panel(ax, data: RunData, span: stats.TrialSpan) -> None:
    """Both arms of one trial over its ratings, where it was decided, and its outcome in the title."""
    ratings = stats.trial_ratings(data, span)
    share = f", {span.share:.0%} of users" if span.share else ""
    d = span.decision
    how = f"{span.outcome} ({d.code})" if d else span.outcome or "no decision yet"
    ax.set_title(f"{span.canary}{share} vs {span.stable}: {how}", fontsize=9)
    if not ratings:
        _empty(ax, "no ratings of the trial")
        return
    _arm(ax, ratings, span.stable, "stable")
    _arm(ax, ratings, span.canary, "canary")
    if d is not None:
        ax.axvline(
            d.ratings or len(ratings),
            color=_DECISION_COLOURS.get(span.outcome, "black"),
            ls="--",
            lw=1,
            label=f"decided: {span.outcome}, difference in [{d.lower:+.3f}, {d.upper:+.3f}]",
        )
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("ratings of the trial, in time order")
    ax.set_ylabel("cumulative thumbs-up rate")
    ax.legend(loc="lower left", fontsize=7)


def plot_canary_trials(data: RunData, path: Path, options: PlotOptions = DEFAULT_OPTIONS) -> None:
    """One panel per canary trial (the last MAX_TRIAL_PANELS): both arms' cumulative thumbs-up rates over
    the trial's ratings (its two versions, from its start to its decision) with pointwise 95% Wilson bands, a
    dashed line where the trainer decided (after the ratings its decision counted), the outcome on top."""
    spans = stats.trial_spans(data.models, data.trials)[-MAX_TRIAL_PANELS:]
    columns = min(2, max(1, len(spans)))
    rows = max(1, math.ceil(len(spans) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), squeeze=False)
    if not spans:
        axes[0][0].set_title("Canary trials")
        _empty(axes[0][0], "no canary trials")
        return _save(fig, path)
    flat = [ax for row in axes for ax in row]
    for ax, span in zip(flat, spans, strict=False):
        _trial_panel(ax, data, span)
    for ax in flat[len(spans) :]:
        ax.set_axis_off()
    return _save(fig, path)


# (file name, caption, function) of every plot, in the order the page shows them.
PLOTS = (
    ("up_rate_by_version.png", "Thumbs-up rate per model version", plot_up_rate_by_version),
    ("up_rate_over_time.png", "Thumbs-up rate over time", plot_up_rate_over_time),
    ("reward_accuracy.png", "Reward model: held-out accuracy", plot_reward_accuracy),
    ("ppo_rounds.png", "PPO rounds: reward and KL", plot_ppo_rounds),
    ("timeline.png", "Timeline of swaps", plot_timeline),
    ("canary_trials.png", "Canary trials: both arms' thumbs-up rates", plot_canary_trials),
)


def draw_all(data: RunData, out_dir: Path, options: PlotOptions = DEFAULT_OPTIONS) -> list[Path]:
    """Every plot of PLOTS as a PNG in `out_dir`; returns their paths."""
    paths = []
    for name, _, plot in PLOTS:
        plot(data, out_dir / name, options)
        paths.append(out_dir / name)
    return paths
