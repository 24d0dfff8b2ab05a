"""Canary trials on scripted rating sequences: when they decide, what, with which figures, what they ignore;
and the simulator (the benchmark's engine) agreeing with the live trial rating for rating."""

import itertools

import numpy as np
import pytest

from rlhf_online.canary import stats
from rlhf_online.canary.decision import (
    CONTINUE,
    INFERIOR,
    NON_INFERIOR,
    PROMOTE,
    ROLL_BACK,
    TIMED_OUT_RATINGS,
    CanaryConfig,
    CanaryTrial,
    verdict,
)
from rlhf_online.canary.simulate import scan, simulate_trials

STABLE, CANARY = "v000001", "v000002"
T0 = 1_700_000_000_000  # trial start, ms


def new_trial(**settings) -> CanaryTrial:
    return CanaryTrial(CanaryConfig(**settings), stable_version=STABLE, canary_version=CANARY, started_ms=T0)


def alternating(stable_thumbs, canary_thumbs, n_each: int) -> list[tuple[str, bool]]:
    """stable, canary, stable, canary, ...: each arm's thumbs repeating the given pattern."""
    s, c = itertools.cycle(stable_thumbs), itertools.cycle(canary_thumbs)
    return [item for _ in range(n_each) for item in ((STABLE, next(s)), (CANARY, next(c)))]


def feed(trial: CanaryTrial, ratings) -> tuple[int, object]:
    """Rates one per millisecond; (index of the deciding rating, its Decision), or (-1, None)."""
    for i, (version, up) in enumerate(ratings):
        decision = trial.rate(version, up, T0 + i, event_id=f"e{i}")
        if decision:
            return i, decision
    return -1, None


def first_crossing(config: CanaryConfig, ratings) -> tuple[int, int]:
    """Reference: the rules as a plain loop over the stats functions; (index, code) of the first decision."""
    n = {STABLE: 0, CANARY: 0}
    ups = {STABLE: 0, CANARY: 0}
    for i, (version, up) in enumerate(ratings):
        n[version] += 1
        ups[version] += up
        if min(n.values()) >= config.min_ratings_per_arm:
            _, lower, upper = stats.confidence_sequence(
                ups[CANARY], n[CANARY], ups[STABLE], n[STABLE], config.alpha, config.tau
            )
            if upper < 0:
                return i, INFERIOR
            if lower > -config.margin:
                return i, NON_INFERIOR
        if n[CANARY] >= config.max_canary_ratings:
            return i, TIMED_OUT_RATINGS
    return -1, CONTINUE


# ---- settings and rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"alpha": 0.0}, "alpha must be in"),
        ({"margin": -0.1}, "margin must be in"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"min_ratings_per_arm": 100, "max_canary_ratings": 50}, "or no trial could ever decide"),
        ({"max_duration_s": -1.0}, "max_duration_s must be >= 0"),
        ({"timeout_outcome": "stay"}, "timeout_outcome must be one of"),
    ],
)
def test_bad_settings_say_what_to_change(settings, message):
    with pytest.raises(ValueError, match=message):
        CanaryConfig(**settings)


def test_a_trial_needs_two_versions():
    with pytest.raises(ValueError, match="different versions"):
        CanaryTrial(CanaryConfig(), stable_version=STABLE, canary_version=STABLE, started_ms=T0)


def test_verdict_rules_on_hand_written_bounds():
    config = CanaryConfig(margin=0.05, min_ratings_per_arm=50, max_canary_ratings=1000)
    lower = np.array([-0.10, -0.04, -0.04, -0.20, -0.10, -0.04, -0.10])
    upper = np.array([+0.10, +0.06, -0.01, -0.01, +0.10, +0.06, +0.10])
    n_canary = np.array([100, 100, 100, 100, 49, 1000, 1000])
    n_stable = np.array([100, 100, 100, 100, 900, 900, 49])
    expected = [
        CONTINUE,  # straddles both thresholds
        NON_INFERIOR,  # lower > -margin
        INFERIOR,  # lower > -margin and upper < 0: significantly worse wins
        INFERIOR,
        CONTINUE,  # the canary arm is not ready
        NON_INFERIOR,  # significant on the last allowed rating: not a time-out
        TIMED_OUT_RATINGS,  # canary arm full, the stable arm never got ready
    ]
    assert verdict(config, lower, upper, n_canary, n_stable).tolist() == expected


# ---- scripted trials -------------------------------------------------------------------------------------


def test_a_disliked_canary_is_rolled_back_as_soon_as_both_arms_are_ready():
    """Canary all thumbs down, stable half up: not before 50 ratings each, then at once (the 100th rating)."""
    index, decision = feed(new_trial(), alternating([True, False], [False], 200))
    assert index == 99
    assert (decision.outcome, decision.code) == (ROLL_BACK, "inferior")
    f = decision.figures
    assert (f.canary_ratings, f.canary_ups, f.stable_ratings, f.stable_ups) == (50, 0, 50, 25)
    assert (f.canary_rate, f.stable_rate, f.difference) == (0.0, 0.5, -0.5)
    # hand: p~ = 1/52 and 26/52, V = 0.005377, radius 0.3286 -> upper = -0.4808 + 0.3286
    assert f.upper == pytest.approx(-0.1522, abs=1e-4)
    assert f.p_value_equal <= 0.05
    assert "significantly worse" in decision.reason and "[-0.809, -0.152]" in decision.reason
    assert decision.decided_ms == T0 + 99


def test_an_equal_canary_is_promoted_at_the_first_crossing():
    config = CanaryConfig(margin=0.1)
    ratings = alternating([True, False, False], [False, True, False], 2000)  # both 1/3
    index, decision = feed(
        CanaryTrial(config, stable_version=STABLE, canary_version=CANARY, started_ms=T0), ratings
    )
    assert (index, NON_INFERIOR) == first_crossing(config, ratings)
    assert (decision.outcome, decision.code) == (PROMOTE, "non_inferior")
    assert decision.figures.lower > -0.1
    assert decision.figures.p_value_margin <= 0.05 < decision.figures.p_value_equal
    assert decision.metrics()["canary_ratings"] == decision.figures.canary_ratings
    assert decision.metrics()["margin"] == 0.1


def test_a_better_canary_is_promoted_by_superiority_with_margin_zero():
    config = CanaryConfig(margin=0.0)
    ratings = alternating([True, False, False, False], [True, True, False], 2000)  # 1/4 against 2/3
    index, decision = feed(
        CanaryTrial(config, stable_version=STABLE, canary_version=CANARY, started_ms=T0), ratings
    )
    assert (index, NON_INFERIOR) == first_crossing(config, ratings)
    assert decision.outcome == PROMOTE and decision.figures.lower > 0.0
    assert "significantly better than stable (lower bound > 0)" in decision.reason


@pytest.mark.parametrize("outcome", [ROLL_BACK, PROMOTE])
def test_time_out_by_ratings_takes_the_configured_outcome(outcome):
    """margin 0 and equal arms: nothing is significant, so the 80th canary rating ends the trial."""
    trial = new_trial(margin=0.0, max_canary_ratings=80, timeout_outcome=outcome)
    index, decision = feed(trial, alternating([True, False], [False, True], 500))
    assert index == 159
    assert (decision.outcome, decision.code) == (outcome, "timed_out_ratings")
    assert decision.figures.canary_ratings == 80 and decision.figures.lower < 0.0 < decision.figures.upper
    assert "no significant difference within 80 canary ratings" in decision.reason


def test_time_out_by_the_clock_on_a_late_rating_or_a_tick():
    trial = new_trial(max_duration_s=60.0)
    assert trial.rate(CANARY, True, T0 + 59_999) is None
    assert trial.tick(T0 + 59_999) is None
    decision = trial.rate(STABLE, True, T0 + 60_000)
    assert (decision.outcome, decision.code) == (ROLL_BACK, "timed_out_seconds")
    assert (decision.figures.canary_ratings, decision.figures.stable_ratings) == (
        1,
        0,
    )  # the late one not counted
    assert decision.metrics()["duration_s"] == 60.0

    quiet = new_trial(max_duration_s=60.0)
    assert quiet.tick(T0 + 61_000).code == "timed_out_seconds"
    assert quiet.figures().lower == -1.0 and quiet.figures().upper == 1.0  # no ratings: the trivial bounds


def test_ignores_other_versions_early_ratings_replays_and_ratings_after_the_decision():
    trial = new_trial()
    trial.rate("v000000", True, T0 + 1)  # neither arm
    trial.rate(STABLE, True, T0 - 1)  # before the trial: not the same period
    trial.rate(CANARY, True, T0 + 2, event_id="a")
    trial.rate(CANARY, True, T0 + 3, event_id="a")  # a replay of the feedback topic
    f = trial.figures()
    assert (f.canary_ratings, f.canary_ups, f.stable_ratings) == (1, 1, 0)

    decided = new_trial()
    _, decision = feed(decided, alternating([True], [False], 200))
    assert decided.rate(CANARY, True, T0 + 10_000) is None
    assert decided.decision is decision and decided.figures() == decision.figures


# ---- the simulator is the same test ----------------------------------------------------------------------


def as_arrays(ratings) -> tuple[np.ndarray, np.ndarray]:
    canary = np.array([[v == CANARY for v, _ in ratings]])  # (1, T)
    up = np.array([[u for _, u in ratings]])  # (1, T)
    return canary, up


@pytest.mark.parametrize("seed", range(4))
def test_scan_decides_where_the_live_trial_does(seed):
    """Random streams, a 20% canary share: the same deciding rating and code, whole or split into blocks."""
    rng = np.random.default_rng(seed)
    config = CanaryConfig(margin=0.1, max_canary_ratings=400)
    n = 3000
    arms = rng.random(n) < 0.2
    thumbs = rng.random(n) < np.where(arms, 0.2 + 0.1 * seed, 0.4)
    ratings = [(CANARY if a else STABLE, bool(u)) for a, u in zip(arms, thumbs, strict=True)]
    index, decision = feed(
        CanaryTrial(config, stable_version=STABLE, canary_version=CANARY, started_ms=T0), ratings
    )

    canary, up = as_arrays(ratings)
    code, step, counts = scan(config, canary, up, np.zeros((1, 4), dtype=np.int64))
    assert (int(code[0]), int(step[0])) == (first_crossing(config, ratings)[1], index)
    f = decision.figures
    assert counts[0].tolist() == [f.canary_ratings, f.canary_ups, f.stable_ratings, f.stable_ups]

    cut = index // 2  # the first block ends before the decision; the second carries its counts
    first = scan(config, canary[:, :cut], up[:, :cut], np.zeros((1, 4), dtype=np.int64))
    assert first[0][0] == CONTINUE
    second = scan(config, canary[:, cut:], up[:, cut:], first[2])
    assert (int(second[0][0]), int(second[1][0]) + cut) == (int(code[0]), index)


def test_simulated_trials_end_and_a_much_worse_canary_is_always_rolled_back():
    config = CanaryConfig()
    o = simulate_trials(config, 0.5, 0.1, 0.5, 200, np.random.default_rng(0), block=64)
    assert np.all(o.code == INFERIOR)
    assert np.all(o.canary_ratings >= config.min_ratings_per_arm)
    assert np.all(o.ratings >= 2 * config.min_ratings_per_arm)
    with pytest.raises(ValueError, match="canary_share"):
        simulate_trials(config, 0.5, 0.5, 1.0, 10, np.random.default_rng(0))


def test_a_trial_cut_short_times_out_then_and_says_so():
    trial = new_trial(max_duration_s=3600.0)
    trial.cut_short(T0 + 10_000, within_s=5.0)  # 10 s in: at most 5 s more
    assert trial.tick(T0 + 14_000) is None
    decision = trial.tick(T0 + 15_000)
    assert (decision.outcome, decision.code) == ("roll_back", "timed_out_seconds")
    assert "within 15 s" in decision.reason and decision.config.max_duration_s == 15.0
    longer = new_trial(max_duration_s=20.0)
    longer.cut_short(T0 + 10_000, within_s=60.0)  # never lengthened
    assert longer.config.max_duration_s == 20.0
