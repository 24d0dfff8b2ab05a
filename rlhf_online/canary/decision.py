"""A canary trial: ratings of the canary and of the stable version come in, one decision comes out.

The trial compares theta = p_canary - p_stable, the two versions' thumbs-up rates over the same period
(ratings accepted before the trial started are ignored), with the confidence sequence of
`rlhf_online.canary.stats`, read after every rating once both arms have `min_ratings_per_arm`. With margin
delta > 0:

1. roll back as soon as the upper bound < 0: users like the canary significantly less. A canary known to be
   worse is never promoted, even when it is worse by less than the margin;
2. promote as soon as the lower bound > -delta: the canary is significantly not worse by more than delta
   (non-inferiority). Not superiority, because the canary is there to catch regressions (reward hacking, a
   drifted reward model) that passed the trainer's reward-model gate, not to prove each PPO round's small
   gain: proving a gain of 0.02 would take tens of thousands of ratings and stall the loop. The price is that
   one promotion may lose up to delta; margin = 0 turns this into a superiority test (promote only when the
   lower bound > 0; an equal canary then times out);
3. when both hold on the same rating (the whole interval inside (-delta, 0)), roll back: significantly worse;
4. time out when the canary arm reaches `max_canary_ratings` or the trial `max_duration_s` without 1-3, with
   the `timeout_outcome`, by default roll back: a canary that could not be shown safe does not stay.

Errors (benchmarks/canary_error_rates.py measures them): a wrong promotion (of a canary worse by delta or
more) needs the lower bound above the true theta; a wrong rollback (of a canary equal or better) needs the
upper bound below it; each happens with probability <= alpha, however often the trial is read.
Between -delta and 0 either decision is acceptable (the indifference zone).
"""

import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np

from rlhf_online.canary import stats

PROMOTE = "promote"
ROLL_BACK = "roll_back"
OUTCOMES = (PROMOTE, ROLL_BACK)

# Verdict codes (integers, so that simulations can hold millions of them in an array). Only a live trial has
# a clock, so TIMED_OUT_SECONDS never comes out of `verdict`.
CONTINUE, NON_INFERIOR, INFERIOR, TIMED_OUT_RATINGS, TIMED_OUT_SECONDS = range(5)
CODE_NAMES = {
    NON_INFERIOR: "non_inferior",
    INFERIOR: "inferior",
    TIMED_OUT_RATINGS: "timed_out_ratings",
    TIMED_OUT_SECONDS: "timed_out_seconds",
}


@dataclass(frozen=True)
class CanaryConfig:
    """Settings of one canary trial's sequential test."""

    alpha: float = field(
        default=0.05,
        metadata={
            "help": "Significance level: bound on each wrong decision (promotion, rollback), in (0, 1)."
        },
    )
    margin: float = field(
        default=0.05,
        metadata={
            "help": "Non-inferiority margin in thumbs-up rate: promote when the canary is significantly not "
            "worse than stable by more than this (0: promote only when significantly better)."
        },
    )
    tau: float = field(
        default=0.05,
        metadata={"help": "Mixture spread of the mSPRT, in thumbs-up rate: the effect size it is tuned to."},
    )
    min_ratings_per_arm: int = field(
        default=50, metadata={"help": "No decision before each arm has this many ratings (normal approx.)."}
    )
    max_canary_ratings: int = field(
        default=2000, metadata={"help": "Time out when the canary arm has this many ratings."}
    )
    max_duration_s: float = field(
        default=6 * 3600.0, metadata={"help": "Time out this many seconds after the trial started (0: off)."}
    )
    timeout_outcome: str = field(
        default=ROLL_BACK, metadata={"help": "What a time-out does: roll_back (the safe default) or promote."}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if not self.tau > 0.0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.min_ratings_per_arm < 1:
            raise ValueError(f"min_ratings_per_arm must be >= 1, got {self.min_ratings_per_arm}")
        if self.max_canary_ratings < self.min_ratings_per_arm:
            raise ValueError(
                f"max_canary_ratings ({self.max_canary_ratings}) must be >= min_ratings_per_arm "
                f"({self.min_ratings_per_arm}), or no trial could ever decide"
            )
        if self.max_duration_s < 0.0:
            raise ValueError(f"max_duration_s must be >= 0 (0: off), got {self.max_duration_s}")
        if self.timeout_outcome not in OUTCOMES:
            raise ValueError(f"timeout_outcome must be one of {OUTCOMES}, got {self.timeout_outcome!r}")


def verdict(config: CanaryConfig, lower, upper, n_canary, n_stable):
    """The decision rules 1-4 (module docstring) on the bounds now: CONTINUE, NON_INFERIOR, INFERIOR or
    TIMED_OUT_RATINGS. Works elementwise on numpy arrays, so simulations use exactly these rules."""
    ready = (np.asarray(n_canary) >= config.min_ratings_per_arm) & (
        np.asarray(n_stable) >= config.min_ratings_per_arm
    )
    code = np.where(
        ready & (upper < 0.0), INFERIOR, np.where(ready & (lower > -config.margin), NON_INFERIOR, CONTINUE)
    )
    return np.where(
        (code == CONTINUE) & (np.asarray(n_canary) >= config.max_canary_ratings), TIMED_OUT_RATINGS, code
    )


@dataclass(frozen=True)
class TrialFigures:
    """Where a trial stands: both arms and the test's figures (for the live view and in every decision)."""

    canary_ratings: int
    canary_ups: int
    stable_ratings: int
    stable_ups: int
    canary_rate: float  # 0 while the arm has no ratings
    stable_rate: float
    difference: float  # canary_rate - stable_rate (the bounds centre on stats.difference's estimate)
    lower: float  # (1 - alpha) confidence sequence on p_canary - p_stable, within [-1, 1]
    upper: float
    p_value_margin: float  # always-valid p against p_canary - p_stable = -margin (1 until both arms ready)
    p_value_equal: float  # always-valid p against p_canary = p_stable


@dataclass(frozen=True)
class Decision:
    """How a trial ended, with the figures that decided it (the payload of the proposed CanaryDecision)."""

    outcome: str  # PROMOTE | ROLL_BACK
    code: str  # "non_inferior" | "inferior" | "timed_out_ratings" | "timed_out_seconds" (a metric label)
    reason: str  # the same, in words, with the figures
    stable_version: str
    canary_version: str
    figures: TrialFigures
    config: CanaryConfig
    started_ms: int
    decided_ms: int

    def metrics(self) -> dict[str, float]:
        """Every figure and setting by name, for logs, metrics maps and reports."""
        out = {k: float(v) for k, v in asdict(self.figures).items()}
        out.update({k: float(v) for k, v in asdict(self.config).items() if not isinstance(v, str)})
        out["duration_s"] = (self.decided_ms - self.started_ms) / 1000.0
        return out


def trial_figures(
    config: CanaryConfig, n_c: int, ups_c: int, n_s: int, ups_s: int, p_margin: float, p_equal: float
) -> TrialFigures:
    """The figures for these counts; the bounds are the trivial [-1, 1] while an arm has no ratings."""
    rate_c, rate_s = ups_c / max(n_c, 1), ups_s / max(n_s, 1)
    lower, upper = -1.0, 1.0
    if n_c and n_s:
        _, lo, hi = stats.confidence_sequence(ups_c, n_c, ups_s, n_s, config.alpha, config.tau)
        lower, upper = max(float(lo), -1.0), min(float(hi), 1.0)
    return TrialFigures(
        n_c, ups_c, n_s, ups_s, rate_c, rate_s, rate_c - rate_s, lower, upper, p_margin, p_equal
    )


def reason_text(code: int, f: TrialFigures, config: CanaryConfig) -> str:
    """Why the trial ended, in words, with the figures that made it end."""
    arms = (
        f"canary {f.canary_rate:.3f} on {f.canary_ratings} ratings, stable {f.stable_rate:.3f} on "
        f"{f.stable_ratings}; {1 - config.alpha:.0%} bounds on the difference "
        f"[{f.lower:+.3f}, {f.upper:+.3f}]"
    )
    if code == INFERIOR:
        return f"canary is significantly worse than stable (upper bound < 0): {arms}"
    if code == NON_INFERIOR and config.margin == 0.0:
        return f"canary is significantly better than stable (lower bound > 0): {arms}"
    if code == NON_INFERIOR:
        return (
            f"canary is significantly not worse than stable by {config.margin} "
            f"(lower bound > -{config.margin}): {arms}"
        )
    limit = (
        f"{config.max_canary_ratings} canary ratings"
        if code == TIMED_OUT_RATINGS
        else f"{config.max_duration_s:.0f} s"
    )
    return f"no significant difference within {limit}, so {config.timeout_outcome}: {arms}"


class CanaryTrial:
    """One trial of `canary_version` against `stable_version`, fed one rating at a time, in arrival order.

    Pure: the caller passes each rating's version and time (a FeedbackEvent's model_version and timestamp_ms)
    and calls `tick` to let the clock time the trial out when no ratings come; nothing here reads a clock.
    """

    def __init__(self, config: CanaryConfig, *, stable_version: str, canary_version: str, started_ms: int):
        if stable_version == canary_version:
            raise ValueError(f"canary and stable must be different versions, both are {stable_version!r}")
        self.config = config
        self.stable_version = stable_version
        self.canary_version = canary_version
        self.started_ms = started_ms
        self.decision: Decision | None = None
        self._counts = {canary_version: [0, 0], stable_version: [0, 0]}  # version -> [ratings, ups]
        self._seen: set[str] = set()
        self._p = (1.0, 1.0)  # running always-valid p-values (margin, equal)

    def rate(
        self, model_version: str, thumbs_up: bool, timestamp_ms: int, event_id: str = ""
    ) -> Decision | None:
        """Counts one rating; returns the Decision when this rating (or the clock at its time) ends the trial.

        Ignored: ratings once decided, of other versions, accepted before the start, and repeated event ids
        (replays of the feedback topic).
        """
        if self.decision or model_version not in self._counts or timestamp_ms < self.started_ms:
            return None
        if self._clock_ran_out(timestamp_ms):
            return self._decide(TIMED_OUT_SECONDS, timestamp_ms)
        if event_id:
            if event_id in self._seen:
                return None
            self._seen.add(event_id)
        counts = self._counts[model_version]
        counts[0] += 1
        counts[1] += int(thumbs_up)
        f = self._update_p_values()
        code = int(verdict(self.config, f.lower, f.upper, f.canary_ratings, f.stable_ratings))
        return None if code == CONTINUE else self._decide(code, timestamp_ms)

    def cut_short(self, now_ms: int, within_s: float) -> None:
        """The trial times out `within_s` from now at the latest (a trainer draining); its time-out
        reason and its decision's settings say the shortened limit."""
        limit = (now_ms - self.started_ms) / 1000.0 + within_s
        if self.config.max_duration_s == 0 or limit < self.config.max_duration_s:
            self.config = dataclasses.replace(self.config, max_duration_s=limit)

    def tick(self, now_ms: int) -> Decision | None:
        """Times the trial out when its clock ran out; returns that Decision, else None."""
        if self.decision or not self._clock_ran_out(now_ms):
            return None
        return self._decide(TIMED_OUT_SECONDS, now_ms)

    def figures(self) -> TrialFigures:
        """Where the trial stands now (for a live view)."""
        (n_c, ups_c), (n_s, ups_s) = self._counts[self.canary_version], self._counts[self.stable_version]
        return trial_figures(self.config, n_c, ups_c, n_s, ups_s, *self._p)

    def _clock_ran_out(self, now_ms: int) -> bool:
        limit = self.config.max_duration_s
        return limit > 0 and now_ms - self.started_ms >= limit * 1000.0

    def _update_p_values(self) -> TrialFigures:
        """Lowers the running p-values with the current counts, once both arms are ready; the figures."""
        f = self.figures()
        if min(f.canary_ratings, f.stable_ratings) >= self.config.min_ratings_per_arm:
            theta_hat, variance = stats.difference(
                f.canary_ups, f.canary_ratings, f.stable_ups, f.stable_ratings
            )
            p_margin, p_equal = (
                float(
                    stats.always_valid_p(
                        stats.mixture_log_lr(theta_hat, variance, theta0, self.config.tau), p
                    )
                )
                for theta0, p in zip((-self.config.margin, 0.0), self._p, strict=True)
            )
            self._p = (p_margin, p_equal)
            f = self.figures()
        return f

    def _decide(self, code: int, now_ms: int) -> Decision:
        significant = {NON_INFERIOR: PROMOTE, INFERIOR: ROLL_BACK}
        f = self.figures()
        self.decision = Decision(
            outcome=significant.get(code, self.config.timeout_outcome),
            code=CODE_NAMES[code],
            reason=reason_text(code, f, self.config),
            stable_version=self.stable_version,
            canary_version=self.canary_version,
            figures=f,
            config=self.config,
            started_ms=self.started_ms,
            decided_ms=now_ms,
        )
        return self.decision
